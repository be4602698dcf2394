"""The canary's ledger of probes in flight: in memory, or in Redis so that

(a) a canary killed (SIGKILL, OOM, node loss) and restarted resumes watching the probes it had
    injected and still reports them, spans included (span ids are fixed on ``Probe`` up front, so
    the restarted process exports the very trace the funnel received in ``traceparent``);
(b) several canary instances can share receivers behind a load balancer: a push receiver that
    gets a sighting of a probe injected by *another* instance publishes it, and the owner
    claims it from its own queue, atomically, exactly once.

Redis layout (``<ns>`` is ``canary.ledger.namespace``, ``<me>`` the instance id)::

    <ns>:rec:<me>          HASH   trace id -> probe record (JSON, see ``record_of``)
    <ns>:owner:<trace id>  STRING instance that owns the probe (expires after a day: orphans go)
    <ns>:alive:<me>        STRING stamp of the instance's last heartbeat (restart: blind since then)
    <ns>:lock:<me>         STRING the running process holding the id <me> (a token; expires after
                                  ``lock_ttl`` unless refreshed, so a SIGKILLed run frees it soon)
    <ns>:sight:<me>        LIST   sightings made by other instances, for <me> (capped)
    <ns>:sightproc:<me>    LIST   sightings being applied (reliable queue: BLMOVE, then LREM)
    <ns>:blind             STREAM blind notices: an instance could not publish (Redis unreachable
                                  from it, or its bounded outbox overflowed) between two moments

Honesty with shared receivers: while this instance's ledger is down it cannot receive sightings
made by others, so its routed push collectors are *held* blind (``Coverage.hold``) until it is
back: an unseen probe is then ``unknown``, never ``lost``. An instance that could not publish
for a while tells the others with a blind notice, and they mark that window blind too.

Writes are write-behind and coalesced per probe, so a Redis outage never blocks or drops a probe:
the canary keeps running from memory, the ledger reports itself down, and on reconnect it writes
every record in flight again (a restarted Redis may have lost them) before anything else.
Two processes must never run as one instance id: the second would resume the first's live
probes as its own (reporting them twice) and rewrite its record hash. The lock makes the second
wait one ``lock_ttl`` (a predecessor killed without ``close`` frees it by then) and, if the id is
still held, refuse to start.
Timestamps cross process boundaries as ``clock.stamp``: exact monotonic on the same boot, wall
time otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tracer import clock
from tracer.inject import Injection
from tracer.probe import Probe
from tracer.verdict import HopResult

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from tracer.engine import InFlight
    from tracer.spec import LedgerSpec

log = logging.getLogger(__name__)

RECORD_VERSION = 1
LOCK_TTL_MIN = 3.0  # seconds: the instance lock lives this long (at least) without a refresh
OWNER_TTL = 24 * 3600


# -- records --------------------------------------------------------------------------------
class InstanceBusy(Exception):
    """The instance lock is held by another process (maybe one just killed: wait and retry)."""


def record_of(inflight: InFlight, instance: str) -> dict[str, Any]:
    """Everything needed to finish a probe in another process, JSON-ready."""
    p = inflight.probe
    inj = inflight.injection
    rec: dict[str, Any] = {
        "v": RECORD_VERSION,
        "instance": instance,
        "step": p.step,
        "trace_id": p.trace_id,
        "probe_id": p.probe_id,
        "root_span_id": p.root_span_id,
        "inject_span_id": p.inject_span_id,
        "created": clock.stamp(p.created_at),
        "captures": p.captures,  # for the matchers and cleanup of a resumed probe
        "injection": None,
        "done": {name: _hop_to_json(r) for name, r in inflight.done.items()},
    }
    if inj is not None and not inflight.injection_unknown:
        rec["injection"] = _injection_to_json(inj)
        if inj.requests:
            rec["injection"]["requests"] = [_injection_to_json(r) for r in inj.requests]
            rec["injection"]["start_index"] = inj.start_index
    return rec


def _injection_to_json(inj: Injection) -> dict[str, Any]:
    return {
        "sent": clock.stamp(inj.sent_at),
        "done": clock.stamp(inj.done_at),
        "ok": inj.ok,
        "status": inj.status,
        "error": inj.error,
        "attributes": inj.attributes,
    }


def _injection_from_json(i: dict[str, Any]) -> Injection:
    return Injection(
        sent_at=clock.from_stamp(i["sent"]),
        done_at=clock.from_stamp(i["done"]),
        ok=bool(i["ok"]),
        status=i.get("status"),
        error=i.get("error"),
        attributes=dict(i.get("attributes") or {}),
        requests=[_injection_from_json(r) for r in i.get("requests") or []],
        start_index=int(i.get("start_index") or 0),
    )


def restore(rec: dict[str, Any]) -> tuple[Probe, Injection | None, dict[str, HopResult]]:
    probe = Probe(
        step=rec["step"],
        trace_id=rec["trace_id"],
        probe_id=rec["probe_id"],
        created_at=clock.from_stamp(rec["created"]),
        root_span_id=rec["root_span_id"],
        inject_span_id=rec["inject_span_id"],
        captures=dict(rec.get("captures") or {}),
    )
    injection = _injection_from_json(rec["injection"]) if rec.get("injection") else None
    done = {name: _hop_from_json(d) for name, d in (rec.get("done") or {}).items()}
    return probe, injection, done


def _hop_to_json(r: HopResult) -> dict[str, Any]:
    d = dataclasses.asdict(r)
    d["start"], d["end"] = clock.stamp(r.start), clock.stamp(r.end)
    return d


def _hop_from_json(d: dict[str, Any]) -> HopResult:
    d = dict(d)
    d["start"], d["end"] = clock.from_stamp(d["start"]), clock.from_stamp(d["end"])
    return HopResult(**d)


@dataclass
class Sighting:
    """A push receiver saw a trace id it does not own: published for the owning instance."""

    trace_id: str
    sink: str
    path: str | None
    at: dict[str, Any]  # clock.stamp of the moment the body was read
    via: str  # instance that received it
    json_paths: list[str] = field(default_factory=list)  # hop json_paths at which the id was found

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Sighting:
        return cls(**json.loads(raw))


OnPending = Callable[[list[dict[str, Any]], "float | None"], None]
OnSighting = Callable[[Sighting], bool]
OnState = Callable[[bool, float], None]  # (up, at): the ledger went down / came back
OnBlind = Callable[[str, float, float], None]  # (sink, start, end): another instance's blind notice
OnAlive = Callable[[float], None]  # (at): a Redis round trip succeeded at ``at``


class MemoryLedger:
    """In-flight records in this process only: nothing survives a restart, nothing is shared."""

    kind = "memory"
    durable = False
    shared = False

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.records: dict[str, str] = {}
        self.on_pending: OnPending | None = None
        self.on_sighting: OnSighting | None = None
        self.on_state: OnState | None = None
        self.on_blind: OnBlind | None = None
        self.on_alive: OnAlive | None = None
        self.last_ok: float | None = None  # monotonic: start of the last successful Redis round trip
        self.counters: dict[str, int] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def put(self, inflight: InFlight) -> None:
        self.records[inflight.probe.trace_id] = ""

    def done(self, trace_id: str) -> None:
        self.records.pop(trace_id, None)

    def offer(self, sighting: Sighting) -> None:
        return None

    @property
    def up(self) -> bool:
        return True

    def health(self) -> dict[str, Any]:
        return {"kind": self.kind, "up": True, "instance": self.instance, "records": len(self.records)}


class RedisLedger(MemoryLedger):
    kind = "redis"
    durable = True
    shared = True

    # Publish sightings to their owners' queues. Only trace ids that are probes in flight of some
    # *other* instance are queued, so a flood of unrelated ids costs a lookup each, never memory.
    # Returns the ids that had no owner (yet): the caller may retry those once.
    _PUBLISH = """
local ns, me, cap = ARGV[1], ARGV[2], tonumber(ARGV[3])
local unowned = {}
for i = 4, #ARGV, 2 do
  local owner = redis.call('GET', ns .. ':owner:' .. ARGV[i])
  if not owner then
    table.insert(unowned, ARGV[i])
  elseif owner ~= me then
    local q = ns .. ':sight:' .. owner
    redis.call('RPUSH', q, ARGV[i + 1])
    redis.call('LTRIM', q, -cap, -1)
  end
end
return unowned
"""

    # Take or refresh the instance lock: ours if free or already ours.
    _LOCK = """
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
    _UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

    def __init__(self, spec: LedgerSpec, instance: str) -> None:
        super().__init__(instance)
        assert spec.redis_url is not None
        self.spec = spec
        self._url = spec.redis_url.get_secret_value()
        ns = spec.namespace
        self.k_rec = f"{ns}:rec:{instance}"
        self.k_alive = f"{ns}:alive:{instance}"
        self.k_sight = f"{ns}:sight:{instance}"
        self.k_proc = f"{ns}:sightproc:{instance}"
        self.k_owner = f"{ns}:owner:"
        self.k_blind = f"{ns}:blind"
        self.k_lock = f"{ns}:lock:{instance}"
        self._token = uuid.uuid4().hex
        self.lock_ttl = max(3 * spec.heartbeat, LOCK_TTL_MIN)
        self._lock_busy_since: float | None = None
        self.conflict: str | None = None  # another running process holds this instance id
        self._ready = asyncio.Event()  # connected, or refused by the lock
        self._blind_last_id: str | None = None
        self._unpublished: tuple[float, float, set[str]] | None = None  # window we failed to publish
        self._dirty: dict[str, str | None] = {}
        self._wake = asyncio.Event()
        self._outbox: deque[Sighting] = deque(maxlen=spec.max_sightings)
        self._retry: deque[tuple[float, Sighting]] = deque(maxlen=1000)
        self._outbox_wake = asyncio.Event()
        self._up = False
        self._resync = True
        self._resumed = False
        self._connected = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self.last_error: str | None = None
        self.counters = dict.fromkeys(
            (
                "write_failures",
                "reconnects",
                "published",
                "unowned",
                "dropped",
                "received",
                "applied",
                "unmatched",
                "blind_notices_sent",
                "blind_notices_received",
            ),
            0,
        )
        self._r: Redis | None = None
        self._rb: Redis | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        common = {"socket_connect_timeout": 1.0, "retry": Retry(NoBackoff(), 0), "health_check_interval": 0}
        self._r = Redis.from_url(self._url, socket_timeout=2.0, **common)
        self._rb = Redis.from_url(self._url, socket_timeout=4.0, **common)  # BLMOVE blocks up to 1 s
        self._publish = self._r.register_script(self._PUBLISH)
        self._lock = self._r.register_script(self._LOCK)
        self._unlock = self._r.register_script(self._UNLOCK)
        self._tasks = [
            asyncio.create_task(self._writer(), name="ledger-writer"),
            asyncio.create_task(self._consumer(), name="ledger-sightings"),
            asyncio.create_task(self._publisher(), name="ledger-publisher"),
        ]

    async def wait_connected(self, timeout: float) -> bool:
        """Connected, or ``False`` on timeout or when the instance id is taken (``conflict``)."""
        await wait_event(self._ready, timeout)
        return self._connected.is_set()

    async def close(self, flush_timeout: float = 3.0) -> None:
        """Write what is pending (records resolved during shutdown) and stop."""
        if self._dirty and self._up:
            self._wake.set()
            end = clock.now() + flush_timeout
            while self._dirty and self._up and clock.now() < end:
                await asyncio.sleep(0.02)
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._r is not None and self.conflict is None:
            with contextlib.suppress(Exception):  # a graceful stop frees the id at once
                await self._unlock(keys=[self.k_lock], args=[self._token])
        for client in (self._r, self._rb):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    # -- records ------------------------------------------------------------------------------
    def put(self, inflight: InFlight) -> None:
        raw = json.dumps(record_of(inflight, self.instance), separators=(",", ":"))
        tid = inflight.probe.trace_id
        self.records[tid] = raw
        self._dirty[tid] = raw
        self._wake.set()

    def done(self, trace_id: str) -> None:
        self.records.pop(trace_id, None)
        self._dirty[trace_id] = None
        self._wake.set()

    @property
    def up(self) -> bool:
        return self._up

    def health(self) -> dict[str, Any]:
        p = urlsplit(self._url)
        return {
            "kind": self.kind,
            "up": self._up,
            "instance": self.instance,
            "redis": f"{p.hostname}:{p.port or 6379}",  # no userinfo, no query: never a secret
            "records": len(self.records),
            "pending_writes": len(self._dirty),
            "outbox": len(self._outbox),
            "last_error": self.last_error,
            **self.counters,
        }

    async def _writer(self) -> None:
        backoff = 0.1
        while not self._closing:
            try:
                if not await self._hold_lock():  # another process runs as this instance
                    self._mark_down(InstanceBusy(self.conflict or ""))  # held receivers go blind
                    return  # and nothing more is written
                await self._connect_once()
                await self._flush()
                self._mark_up()
                await self._read_blind_notices()
                backoff = 0.1
                await wait_event(self._wake, self.spec.heartbeat)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis errors, OSError: keep running from memory
                self._mark_down(exc)
                await asyncio.sleep(backoff * (0.8 + 0.4 * random.random()))
                backoff = min(1.0, backoff * 2)

    async def _hold_lock(self) -> bool:
        """Take or refresh the instance lock. Held by another process: wait one ``lock_ttl``
        (a killed predecessor's lock expires by then), then give up: ``conflict`` says why."""
        assert self._r is not None
        if await self._lock(keys=[self.k_lock], args=[self._token, int(self.lock_ttl * 1000)]):
            self._lock_busy_since = None
            return True
        now = clock.now()
        if self._lock_busy_since is None:
            self._lock_busy_since = now
        if now - self._lock_busy_since < self.lock_ttl + 0.5:
            raise InstanceBusy(f"instance id {self.instance!r} is held by another process")
        self.conflict = (
            f"another running canary uses the instance id {self.instance!r} on this ledger "
            f"(namespace {self.spec.namespace!r}); give each instance its own canary.ledger.instance "
            "(or --instance)"
        )
        log.error("ledger: %s; this process writes nothing to the ledger", self.conflict)
        self._ready.set()
        return False

    async def _connect_once(self) -> None:
        """After (re)connecting: on the first connection hand the previous process's records to
        the canary (it resumes them); then write every record in flight again."""
        if not self._resync:
            return
        assert self._r is not None
        if not self._resumed:
            raw = await self._r.hgetall(self.k_rec)
            alive = await self._r.get(self.k_alive)
            mine = set(self.records)
            recs = []
            for tid, value in raw.items():
                tid = tid.decode() if isinstance(tid, bytes) else tid
                if tid in mine:
                    continue
                try:
                    rec = json.loads(value)
                except ValueError:
                    rec = None
                if isinstance(rec, dict):
                    recs.append(rec)
                else:  # truncated, or not ours: dropped (the hash is rewritten below)
                    log.warning("ledger: unreadable record for trace %s dropped", tid[:64])
            try:
                last_alive = clock.from_stamp(json.loads(alive)) if alive else None
            except (ValueError, TypeError, KeyError, AttributeError):
                log.warning("ledger: unreadable heartbeat of the previous run ignored")
                last_alive = None
            # Sightings a dead run was applying go back to the queue (applying one twice is
            # harmless: a watch keeps one sighting per source).
            while await self._r.lmove(self.k_proc, self.k_sight, "RIGHT", "LEFT"):
                pass
            last = await self._r.xrevrange(self.k_blind, count=1)
            self._blind_last_id = _s(last[0][0]) if last else "0-0"
            self._resumed = True
            if recs and self.on_pending is not None:
                try:
                    self.on_pending(recs, last_alive)  # registers their watches, then put()s them again
                except Exception:  # a resume bug must not keep the ledger down forever
                    log.exception("ledger: resuming the previous run's records failed")
            elif recs:
                log.warning("ledger: %d record(s) of an earlier run not resumed", len(recs))
        pending = dict(self._dirty)
        pipe = self._r.pipeline(transaction=False)
        pipe.delete(self.k_rec)
        for tid, raw in self.records.items():
            pipe.hset(self.k_rec, tid, raw)
            pipe.set(self.k_owner + tid, self.instance, ex=OWNER_TTL)
        for tid, raw in pending.items():
            if raw is None:
                pipe.delete(self.k_owner + tid)
        pipe.set(self.k_alive, json.dumps(clock.stamp(clock.now())))
        await pipe.execute()
        for tid, raw in pending.items():  # written above, unless changed meanwhile
            if self._dirty.get(tid, 0) is raw:
                del self._dirty[tid]
        self._resync = False
        if not self._connected.is_set():
            self._connected.set()
            self._ready.set()

    async def _flush(self) -> None:
        assert self._r is not None
        self._wake.clear()
        batch, self._dirty = self._dirty, {}
        pipe = self._r.pipeline(transaction=False)
        for tid, raw in batch.items():
            if raw is None:
                pipe.hdel(self.k_rec, tid)
                pipe.delete(self.k_owner + tid)
            else:
                pipe.hset(self.k_rec, tid, raw)
                pipe.set(self.k_owner + tid, self.instance, ex=OWNER_TTL)
        pipe.set(self.k_alive, json.dumps(clock.stamp(clock.now())))
        try:
            await pipe.execute()
        except BaseException:
            for tid, raw in batch.items():  # newer writes made meanwhile win
                self._dirty.setdefault(tid, raw)
            raise

    def _mark_up(self) -> None:
        if not self._up:
            if self.last_error is not None:
                log.warning("ledger: Redis reachable again; every record in flight rewritten")
            self._up = True
            self.last_error = None
            if self.on_state is not None:
                self.on_state(True, clock.now())

    def _mark_down(self, exc: BaseException) -> None:
        self.counters["write_failures"] += 1
        self._resync = True
        err = _short_error(exc)
        if self._up or self.last_error is None:
            self.counters["reconnects"] += 1
            log.warning("ledger: Redis unavailable (%s); probes continue from memory, records pending", err)
            if self.on_state is not None:
                # Blind since the last moment we know every sighting for us had been applied.
                self.on_state(False, self.last_ok if self.last_ok is not None else clock.now())
        self._up = False
        self.last_error = err

    async def _read_blind_notices(self) -> None:
        assert self._r is not None
        if self._blind_last_id is None or self.on_blind is None:
            return
        got = await self._r.xread({self.k_blind: self._blind_last_id}, count=100)
        for _stream, entries in got or []:
            for entry_id, fields in entries:
                self._blind_last_id = _s(entry_id)
                f = {_s(k): _s(v) for k, v in fields.items()}
                if f.get("via") == self.instance:
                    continue
                self.counters["blind_notices_received"] += 1
                start, end = clock.from_stamp(json.loads(f["start"])), clock.from_stamp(json.loads(f["end"]))
                log.warning(
                    "ledger: instance %s could not publish sightings for %.1fs; that window is blind here",
                    f.get("via"),
                    end - start,
                )
                for sink in f.get("sinks", "").split(","):
                    if sink:
                        self.on_blind(sink, start, end)

    def _note_unpublished(self, sightings: list[Sighting]) -> None:
        """Remember the window of sightings we failed to deliver (for a blind notice)."""
        if not sightings:
            return
        times = [clock.from_stamp(s.at) for s in sightings]
        lo, hi, sinks = self._unpublished or (min(times), max(times), set())
        self._unpublished = (
            min(lo, *times),
            max(hi, *times, clock.now()),
            sinks | {s.sink for s in sightings},
        )

    # -- sightings ----------------------------------------------------------------------------
    def offer(self, sighting: Sighting) -> None:
        """Queue a sighting for its owner (bounded: the oldest is dropped when full)."""
        if len(self._outbox) == self._outbox.maxlen:
            self.counters["dropped"] += 1
            self._note_unpublished([self._outbox[0]])  # the others are told that window is blind
        self._outbox.append(sighting)
        self._outbox_wake.set()

    async def _publisher(self) -> None:
        backoff = 0.1
        while not self._closing:
            if not self._outbox and not self._retry:
                self._outbox_wake.clear()
                await self._outbox_wake.wait()
            elif not self._outbox:
                await wait_event(self._outbox_wake, 0.5)
                self._outbox_wake.clear()
            now = clock.now()
            batch: list[tuple[Sighting, bool]] = []
            while self._retry and self._retry[0][0] <= now and len(batch) < 200:
                batch.append((self._retry.popleft()[1], True))
            while self._outbox and len(batch) < 500:
                batch.append((self._outbox.popleft(), False))
            if not batch:
                continue
            args: list[Any] = [self.spec.namespace, self.instance, self.spec.max_sightings]
            for s, _ in batch:
                args += [s.trace_id, s.to_json()]
            try:
                unowned = await self._publish(args=args)
                backoff = 0.1
                if self._unpublished is not None:
                    await self._send_blind_notice()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Keep them, in order, for when Redis is back, and remember the window: they may
                # reach their owners only after those gave up on them.
                self._note_unpublished([s for s, _ in batch])
                for s, retried in reversed(batch):
                    if not retried and len(self._outbox) < (self._outbox.maxlen or 0):
                        self._outbox.appendleft(s)
                self.last_error = _short_error(exc)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            missing = {u.decode() if isinstance(u, bytes) else u for u in unowned}
            for s, retried in batch:
                if s.trace_id not in missing:
                    self.counters["published"] += 1
                elif not retried:
                    # No owner yet: the owner's ledger may be catching up after an outage. One retry.
                    self._retry.append((now + 2.0, s))
                else:
                    self.counters["unowned"] += 1

    async def _send_blind_notice(self) -> None:
        assert self._r is not None and self._unpublished is not None
        lo, hi, sinks = self._unpublished
        fields = {
            "via": self.instance,
            "sinks": ",".join(sorted(sinks)),
            "start": json.dumps(clock.stamp(lo)),
            "end": json.dumps(clock.stamp(hi)),
        }
        await self._r.xadd(self.k_blind, fields, maxlen=1000, approximate=True)
        self._unpublished = None
        self.counters["blind_notices_sent"] += 1

    async def _consumer(self) -> None:
        await self._connected.wait()
        assert self._rb is not None and self._r is not None
        backoff = 0.1
        while not self._closing:
            try:
                asked = clock.now()
                raw = await self._r.lmove(self.k_sight, self.k_proc, "LEFT", "RIGHT")
                if raw is None:
                    # The queue was empty when asked: every sighting published for us before
                    # then has been applied. That is how far our push sinks are certified.
                    self.last_ok = asked
                    if self.on_alive is not None:
                        self.on_alive(asked)
                    raw = await self._rb.blmove(self.k_sight, self.k_proc, 0.5, "LEFT", "RIGHT")
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            if raw is None:
                continue
            self.counters["received"] += 1
            try:
                sighting = Sighting.from_json(raw)
                applied = self.on_sighting(sighting) if self.on_sighting is not None else False
                self.counters["applied" if applied else "unmatched"] += 1
            except Exception:
                log.exception("ledger: could not apply a sighting")
            with contextlib.suppress(Exception):
                await self._r.lrem(self.k_proc, 1, raw)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` up to ``timeout`` seconds. Not ``asyncio.wait_for``: on Python 3.11 a
    timeout racing a cancellation can swallow the cancellation, and a task that loops around
    it then never stops."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=max(0.0, timeout))
    finally:
        waiter.cancel()
    return event.is_set()


def _s(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _short_error(exc: BaseException) -> str:
    """Secret-free: the exception type and, for connection problems, nothing that could echo a URL."""
    name = type(exc).__name__
    if isinstance(exc, (ConnectionError, OSError)) or "Connection" in name:
        return "connection refused or lost"
    if "Timeout" in name:
        return "timeout"
    if "Authentication" in name:
        return "authentication failed"
    return name


def build(spec: LedgerSpec, instance: str) -> MemoryLedger:
    if spec.redis_url is None:
        return MemoryLedger(instance)
    return RedisLedger(spec, instance)
