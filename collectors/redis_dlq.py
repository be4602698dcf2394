"""Redis dead-letter-queue collector: when a probe's entry landed in the DLQ, when the retry worker
first took it, and whether that ended in success (``resolved``) or in the dead key (``dead``).

Shapes: ``list`` (LPUSH + LREM/LMOVE), ``zset`` (scored by next retry, Sidekiq-style) and
``stream`` (XADD, consumer groups, XDEL when done). A hop names one ``event``:

``entry``     an entry carrying the trace id is in the DLQ key (``sink_time``: its own timestamp)
``retry``     the first retry began: the entry left the DLQ key (popped / claimed / deleted), or
              came back with a higher attempt, or reached the processing or dead key
``resolved``  it is gone from the DLQ, the processing key and the dead key, in one snapshot
``dead``      it is in ``dead_key``

How it sees. A *look* reads every key of a hop in one MULTI/EXEC, so "gone from all three" is
one instant's truth, never two reads stitched together. In ``push`` mode, keyspace notifications
(``CONFIG SET notify-keyspace-events``, merged into what is set already) trigger a look within a
round trip of each write, and streams are also read with ``XREAD BLOCK``; a safety-net look runs
every ``poll_interval``. Without permission to use notifications (managed Redis), or in ``poll``
mode, a look runs every ``poll_interval``.

An entry that comes and goes between two looks (retried within milliseconds) is the one thing a
look cannot show. It is either still caught or reported, never silently lost:
- streams: a blocked ``XREAD`` is handed every added entry at once, even one deleted right after;
  and each look compares the stream's ``entries-added`` counter with the entries we received,
  so an entry added and deleted unseen (while we were not blocked) is counted as missed;
- lists and zsets, push: each look counts the removal notifications since the previous look
  against the removals it can see (entries gone since then). A removal it cannot account for
  removed something it never saw;
- lists and zsets, poll: the keys are WATCHed (on two alternating connections, so the watch
  always spans the interval between two snapshots); a key that changed at all might have held
  an entry we never saw.
A possible miss while some probe's entry is still unseen marks ``(previous look, this look]``
blind in ``coverage`` (``Coverage(retroactive=False)``: a retry of an entry we never saw cannot
be found later), so the verdict is ``unknown``, not ``lost``. Redis down is blind too, from the
last certified moment until the next good look, and while it reconnects with backoff. In push
mode a good look is not enough to certify: a PING on the listener's connection is answered only
after every notification published before it, so coverage is certified through the earlier of
the last good look and the last answered PING, and a dead or lagging listener certifies nothing.

Assumptions worth knowing: ``resolved`` requires that the worker moves an entry atomically (the
reliable-queue pattern: claim into ``processing_key``, re-park or dead-letter in the same MULTI or
Lua call); a worker that holds an entry only in memory while retrying looks resolved until it
re-parks it. The first look of a hop's keys happens on the first watch for it, so a probe retried
within that first round trip is not guaranteed to be caught. A key or glob pattern's keys are read
up to ``max_scan`` entries; a longer key makes the look partial, reported as blind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError, WatchError

from tracer import clock
from tracer.net import check_redis_url, redact_url
from tracer.net import short_redis_error as short_error
from tracer.payload import value_at
from tracer.plugins import SinkPlugin
from tracer.probe import TRACE_ID
from tracer.schema import Duration, Model, Secret
from tracer.watch import Coverage, Observation, Watch, WatchIndex

log = logging.getLogger(__name__)

_PATH = r"^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*$"
_GLOB = re.compile(r"(?<!\\)[*?\[]")
Event = Literal["entry", "retry", "resolved", "dead"]

# Keyspace-notification classes we need: K keyspace, g generic (del, rename, expire), l list,
# z zset, t stream, h hash (meta_hash), x expired, e evicted. 'A' is redis' alias for g$lshzxetd.
_NOTIFY = "Kglzthxe"
# Events that cannot remove an element. Anything else on a list/zset key counts as a removal
# (conservative: an unknown event can only make us report blindness, never hide it).
_ADDS = {"lpush", "rpush", "linsert", "zadd", "zincr", "xadd"}
_NEUTRAL = {"expire", "persist", "new", "hset", "hdel", "hincrby", "hincrbyfloat"}
# Subscribed first, so the listener's connection exists before any hop is known. Nobody publishes.
_CONTROL = "funnel-tracer:redis_dlq"


class RedisDlqConfig(Model):
    url: Secret = Field(description="redis:// URL of the DLQ's Redis; may carry a password (never logged)")
    mode: Literal["push", "poll"] = Field("push", description="push: keyspace notifications + XREAD BLOCK")
    poll_interval: Duration = Field(0.5, gt=0, description="poll mode: look interval; push: safety-net look")
    reconnect_backoff: Duration = Field(
        0.2, gt=0, description="first reconnect delay; doubles up to max_backoff"
    )
    max_backoff: Duration = Field(5.0, gt=0)
    timeout: Duration = Field(2.0, gt=0, description="connect and command timeout")
    max_scan: int = Field(10_000, gt=0, description="entries read per key per look")
    max_keys: int = Field(1_000, gt=0, description="keys a glob pattern may match")
    configure_notifications: bool = Field(True, description="allow CONFIG SET notify-keyspace-events")

    _url = field_validator("url")(check_redis_url)


class RedisDlqHop(Model):
    key: str = Field(min_length=1, description="the DLQ key, or a glob pattern such as dlq:*")
    shape: Literal["list", "zset", "stream"] = "list"
    event: Event = "entry"
    trace_path: str | None = Field(
        None, pattern=_PATH, description="dotted path to the trace id; default: anywhere"
    )
    attempt_field: str = Field("attempt", pattern=_PATH)
    first_attempt: int = Field(
        1, description="attempt of a freshly parked entry; higher on first sight = retried"
    )
    timestamp_field: str | None = Field("created_at", pattern=_PATH, description="the entry's own timestamp")
    processing_key: str | None = Field(None, description="where the worker keeps claimed entries (list/zset)")
    dead_key: str | None = None
    meta_hash: str | None = Field(None, description="hash of entry id -> JSON metadata; members are ids")

    @model_validator(mode="after")
    def _consistent(self) -> RedisDlqHop:
        if self.event == "dead" and self.dead_key is None:
            raise ValueError("event 'dead' needs dead_key")
        if self.shape == "stream" and (self.processing_key or self.meta_hash):
            raise ValueError(
                "a stream keeps claimed entries in its consumer group: no processing_key or meta_hash"
            )
        for name in ("processing_key", "dead_key", "meta_hash"):
            value = getattr(self, name)
            if value is not None and _GLOB.search(value):
                raise ValueError(f"{name} must be a single key, not a pattern")
        return self


# -- what the collector knows ---------------------------------------------------


@dataclass(frozen=True)
class _Info:
    """What one entry says, parsed once per distinct entry text."""

    traces: tuple[str, ...]
    attempt: int | None
    sink_time: float | None
    entry_id: str | None


@dataclass(frozen=True)
class _Hit:
    key: str
    info: _Info
    handle: str | None = None  # stream entry id


@dataclass(frozen=True)
class _When:
    """Where a look places what it found: in ``(not_before, at]``."""

    at: float
    not_before: float | None
    source: str


@dataclass(frozen=True)
class _Seen:
    when: _When
    hit: _Hit | None


@dataclass
class _Trace:
    """One probe's entry on one hop's keys."""

    seen: dict[str, _Seen] = field(default_factory=dict)
    attempt0: int | None = None  # attempt at first sight
    lost: bool = False  # Redis restarted since it was present: its absence is no evidence


@dataclass
class _Key:
    """One concrete DLQ key."""

    members: Counter[str] | None = None  # list/zset contents at the last look
    removes: int = 0  # list/zset: removal notifications since the last look
    last_op: str = ""
    credit: int = 0  # visible removals whose notification had not arrived yet
    cursor: str | None = None  # stream: last id read
    added: int | None = None  # stream: entries-added at the last look
    last_generated: str = "0-0"
    fresh: list[str] = field(default_factory=list)  # stream ids accepted since the last look

    def note(self, op: str) -> None:
        # An LREM/ZREM that empties a key is followed by an implicit 'del': one removal, not two.
        implicit = op == "del" and self.last_op not in ("", *_ADDS, *_NEUTRAL)
        if op not in _ADDS and op not in _NEUTRAL and not implicit:
            self.removes += 1
        self.last_op = op


class _Guard:
    """Poll mode: did any of ``keys`` change between two snapshots? WATCH on two connections that
    take turns, so a watch is always armed before the previous snapshot and checked by the next."""

    def __init__(self, r: Redis) -> None:
        self._pipes = [r.pipeline(transaction=True), r.pipeline(transaction=True)]
        self._turn = 0
        self._keys: tuple[str, ...] = ()

    async def snapshot(self, r: Redis, keys: tuple[str, ...], build: Any) -> tuple[list[Any], bool | None]:
        cur, nxt = self._pipes[self._turn], self._pipes[1 - self._turn]
        armed = self._keys == keys and bool(keys) and cur.watching
        was_armed = bool(self._keys)
        await nxt.reset()
        if keys:
            await nxt.watch(*keys)
        changed: bool | None = None
        result: list[Any] | None = None
        if armed:
            cur.multi()
            build(cur)
            try:
                result = await cur.execute(raise_on_error=False)
                changed = False
            except WatchError:
                changed = True
        await cur.reset()
        if result is None:
            async with r.pipeline(transaction=True) as p:
                build(p)
                result = await p.execute(raise_on_error=False)
        self._turn = 1 - self._turn
        if changed is None and was_armed and self._keys != keys:
            changed = True  # the set of matching keys itself changed
        self._keys = keys
        return result, changed

    async def close(self) -> None:
        for p in self._pipes:
            with contextlib.suppress(Exception):
                await p.reset()


class _Target:
    """Everything watched on one set of keys (one hop's keys; hops differing only in event share it).

    A look only ever touches the probes its snapshot names, plus those it must see leave
    (``present``, ``leaving``): work bounded by the keys' contents, never by probes in flight."""

    def __init__(self, spec: RedisDlqHop) -> None:
        self.spec = spec
        self.index = WatchIndex()
        self.events: Counter[str] = Counter()  # events of the watches in ``index``
        self.traces: dict[str, _Trace] = {}
        self.awaiting: set[str] = set()  # probes whose entry has not shown yet
        self.present: set[str] = set()  # in a DLQ key at the last look
        self.leaving: set[str] = set()  # left the DLQ; resolved or dead still to be seen
        self.handles: dict[tuple[str, str], str] = {}  # stream (key, entry id) -> trace id
        self.glob = bool(_GLOB.search(spec.key))
        self.keys: dict[str, _Key] = {} if self.glob else {spec.key: _Key()}
        self.aux = {k for k in (spec.processing_key, spec.dead_key, spec.meta_hash) if k}
        self.parsed: dict[str, _Info] = {}
        self.prev_issue: float | None = None
        self.first_note: float | None = None
        self.last_note: float | None = None
        self.dirty = True
        self.rescan = True  # glob: SCAN for matching keys at the next look
        self.guard: _Guard | None = None

    def matches(self, key: str) -> str | None:
        """The role ``key`` plays for this target: main, aux or None."""
        if key in self.aux:
            return "aux"
        if key == self.spec.key or (self.glob and fnmatchcase(key, self.spec.key)):
            return "main"
        return None

    def needs_aux(self) -> bool:
        return bool(self.events["resolved"] or self.events["dead"])

    def add(self, w: Watch) -> _Trace:
        self.index.add(w)
        self.events[w.sink_spec.event] += 1
        tr = self.traces.get(w.trace_id)
        if tr is None:
            tr = self.traces[w.trace_id] = _Trace()
            self.awaiting.add(w.trace_id)
        return tr

    def drop(self, w: Watch) -> None:
        """Stop looking for ``w``; forget its probe once none of its hops is awaited here."""
        tid = w.trace_id
        if w not in self.index.get(tid):
            return
        self.index.discard(w)
        self.events[w.sink_spec.event] -= 1
        if not self.index.get(tid):
            self.traces.pop(tid, None)
            self.awaiting.discard(tid)
            self.present.discard(tid)
            self.leaving.discard(tid)
            for k in [k for k, v in self.handles.items() if v == tid]:
                del self.handles[k]


class RedisDlqCollector:
    sink: ClassVar[str] = "redis_dlq"

    def __init__(self, config: RedisDlqConfig) -> None:
        self.config = config
        self.coverage = Coverage(retroactive=False)
        self._url = config.url.get_secret_value()
        self._targets: dict[RedisDlqHop, _Target] = {}
        self._routes: dict[str, list[tuple[_Target, str]]] = {}
        self._subscribed: set[str] = set()
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._run_id: str | None = None
        self._db = 0
        self._push = False  # keyspace notifications active in this session
        self._session_ok = False
        # Certified = min(last good look, last PING answered on the listener's connection): the
        # PONG comes after every notification published before the PING, so a dead or lagging
        # listener cannot certify anything.
        self._looked_through = -math.inf
        self._notes_through = -math.inf
        self._ping_sent: float | None = None
        self._failed_at = -math.inf  # the latest failure: nothing certifies back past it
        self._closing = False
        self.notifications = "not tried"
        self.looks = 0
        self.failed_looks = 0
        self.reconnects = 0
        self.possible_misses = 0
        self.last_error: str | None = None

    # -- Collector protocol -------------------------------------------------
    @property
    def error_bar(self) -> float:
        return 0.0 if self._push else self.config.poll_interval

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis-dlq-collector")
        # Return once the first look is done (or failed), so coverage means something.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ready.wait(), self.config.timeout * 2 + 1)

    async def close(self) -> None:
        # The flag too: a cancellation landing inside a redis-py call can be swallowed there.
        self._closing = True
        self._wake.set()
        if self._task:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=self.config.timeout + 1)

    def watch(self, w: Watch) -> None:
        t = self._target(w.sink_spec)
        tr = t.add(w)
        done = tr.seen.get(w.sink_spec.event)
        if done is not None:  # a hop registered after its event happened
            self._deliver(t, w, done)
        self._wake.set()

    def unwatch(self, w: Watch) -> None:
        t = self._targets.get(_identity(w.sink_spec))
        if t is not None:
            t.drop(w)

    def health(self) -> dict[str, Any]:
        return {
            "up": not self.coverage.blind_now and self._ready.is_set() and self._failure is None,
            "url": redact_url(self._url),
            "mode": self.config.mode,
            "push_active": self._push,
            "notifications": self.notifications,
            "looks": self.looks,
            "failed_looks": self.failed_looks,
            "reconnects": self.reconnects,
            "possible_misses": self.possible_misses,
            "in_flight": sum(len(t.index) for t in self._targets.values()),
            "last_error": self.last_error,
        }

    # -- targets ------------------------------------------------------------
    def _target(self, spec: RedisDlqHop) -> _Target:
        ident = _identity(spec)
        t = self._targets.get(ident)
        if t is None:
            t = self._targets[ident] = _Target(ident)
            self._routes.clear()
        return t

    def _route(self, key: str) -> list[tuple[_Target, str]]:
        routes = self._routes.get(key)
        if routes is None:
            routes = [(t, role) for t in self._targets.values() if (role := t.matches(key))]
            self._routes[key] = routes
        return routes

    # -- connection lifecycle -----------------------------------------------
    async def _run(self) -> None:
        backoff = self.config.reconnect_backoff
        while not self._closing:
            self._failure = None
            self._session_ok = False
            try:
                await self._session()
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                self._down(exc)
            except Exception as exc:  # a bug must not end the collector silently
                log.exception("redis_dlq: unexpected error")
                self._down(exc)
            finally:
                self._push = False
            if self._session_ok:
                backoff = self.config.reconnect_backoff  # it had been up: start over gently
            delay = backoff * (0.8 + 0.4 * random.random())
            backoff = min(self.config.max_backoff, backoff * 2)
            self.reconnects += 1
            await asyncio.sleep(delay)

    def _down(self, exc: BaseException) -> None:
        self._fail(clock.now())
        self.failed_looks += 1
        error = short_error(exc, self._url)
        if error != self.last_error:
            log.warning("redis_dlq %s: %s; reconnecting", redact_url(self._url), error)
        self.last_error = error
        self._ready.set()

    def _client(self, decode: bool = True) -> Redis:
        return Redis.from_url(
            self._url,
            decode_responses=decode,
            encoding_errors="replace",
            socket_timeout=self.config.timeout,
            socket_connect_timeout=self.config.timeout,
            retry=Retry(NoBackoff(), 0),  # an outage must surface here, not be papered over
        )

    async def _session(self) -> None:
        r = self._client()
        listener = self._client(decode=False)  # redis-py parses a subscribed PING's reply only as bytes
        ps: PubSub | None = None
        helpers: list[asyncio.Task[None]] = []
        try:
            info = await r.info("server")
            self._db = int(r.connection_pool.connection_kwargs.get("db") or 0)
            self._resync(str(info.get("run_id", "")))
            self._looked_through = self._notes_through = -math.inf
            self._ping_sent = None
            if self.config.mode == "push":
                self._push = await self._enable_notifications(r)
                self._notify_checked = clock.now()
                if self._push:
                    ps = listener.pubsub()
                    await ps.subscribe(_CONTROL)
                    helpers.append(
                        asyncio.create_task(self._helper(self._listen(ps)), name="redis-dlq-listen")
                    )
                    await self._subscribe(ps)
                    await self._ping(ps)
                helpers.append(asyncio.create_task(self._helper(self._xread(r)), name="redis-dlq-xread"))
            await self._loop(r, ps)
        finally:
            for h in helpers:
                h.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            for t in self._targets.values():
                if t.guard is not None:
                    await t.guard.close()
                    t.guard = None
            if ps is not None:
                with contextlib.suppress(Exception):
                    await ps.aclose()
            for client in (r, listener):
                with contextlib.suppress(Exception):
                    await client.aclose()

    def _resync(self, run_id: str) -> None:
        """After a (re)connect: notification counts restart; after a server restart, what we
        believed present may simply be gone with the server's memory, so absence proves nothing."""
        restarted = self._run_id is not None and run_id != self._run_id
        self._run_id = run_id
        self._subscribed.clear()
        for t in self._targets.values():
            t.dirty = t.rescan = True
            t.first_note = t.last_note = None
            for ks in t.keys.values():
                ks.removes, ks.credit, ks.last_op = 0, 0, ""
                if restarted:
                    ks.members, ks.cursor, ks.added, ks.fresh = None, None, None, []
            if restarted:
                for tid in t.present | set(t.handles.values()):
                    t.traces[tid].lost = True
                t.present.clear()
                t.handles.clear()
        if restarted:
            log.warning(
                "redis_dlq %s: server restarted; entries seen before may be gone", redact_url(self._url)
            )

    async def _enable_notifications(self, r: Redis) -> bool:
        try:
            current = (await r.config_get("notify-keyspace-events")).get("notify-keyspace-events", "")
        except ResponseError as exc:
            self.notifications = f"off: CONFIG GET refused ({type(exc).__name__}); polling"
            log.warning(
                "redis_dlq: keyspace notifications unavailable, polling every %gs", self.config.poll_interval
            )
            return False
        have = set(current.replace("A", "g$lshzxetd"))
        missing = [c for c in _NOTIFY if c not in have]
        if not missing:
            self.notifications = f"on ({current})"
            return True
        if not self.config.configure_notifications:
            self.notifications = f"off: notify-keyspace-events is {current!r}; polling"
            return False
        try:
            await r.config_set("notify-keyspace-events", current + "".join(missing))
        except ResponseError as exc:
            self.notifications = f"off: CONFIG SET refused ({type(exc).__name__}); polling"
            log.warning(
                "redis_dlq: cannot enable keyspace notifications, polling every %gs",
                self.config.poll_interval,
            )
            return False
        self.notifications = f"on (enabled {''.join(missing)})"
        return True

    # -- push: notifications and XREAD --------------------------------------
    async def _helper(self, work: Any) -> None:
        """Run a helper task; whatever ends it early ends the session (and so reconnects)."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, (RedisError, OSError)):
                log.exception("redis_dlq: helper task failed")
            self._failure = exc
            self._wake.set()

    async def _ping(self, ps: PubSub) -> None:
        self._ping_sent = clock.now()
        await ps.ping()

    def _certify(self) -> None:
        through = min(self._looked_through, self._notes_through) if self._push else self._looked_through
        if through > self._failed_at:
            self.coverage.looked(through)

    def _fail(self, at: float) -> None:
        self._failed_at = max(self._failed_at, at)
        self.coverage.failed(at)

    async def _listen(self, ps: PubSub) -> None:
        """Read keyspace notifications; each marks its hop dirty and wakes the look loop."""
        prefix = f"__keyspace@{self._db}__:"
        while not self._closing:
            msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None:
                continue
            if msg["type"] == "pong":
                if self._ping_sent is not None:
                    self._notes_through = self._ping_sent
                    self._certify()
                continue
            if msg["type"] != "pmessage":
                continue
            now = clock.now()
            key = msg["channel"].decode(errors="replace").removeprefix(prefix)
            op = msg["data"].decode(errors="replace")
            for t, role in self._route(key):
                if role == "main":
                    ks = t.keys.get(key)
                    if ks is None and len(t.keys) < self.config.max_keys:
                        ks = t.keys[key] = _Key(members=Counter() if t.spec.shape != "stream" else None)
                    if ks is not None:
                        ks.note(op)
                t.first_note = t.first_note if t.first_note is not None else now
                t.last_note = now
                t.dirty = True
            self._wake.set()

    async def _subscribe(self, ps: PubSub | None) -> None:
        if ps is None:
            return
        want: set[str] = set()
        for t in self._targets.values():
            want.add(t.spec.key)
            want.update(t.aux)
        new = [f"__keyspace@{self._db}__:{k}" for k in sorted(want) if k not in self._subscribed]
        if new:
            await ps.psubscribe(*new)
            self._subscribed.update(want)

    async def _xread(self, r: Redis) -> None:
        """Streams: a blocked XREAD is handed each new entry as it is added."""
        while not self._closing:
            ids: dict[str, str] = {}  # per key, the oldest cursor of the hops reading it
            for t in self._targets.values():
                if t.spec.shape == "stream":
                    for key, ks in t.keys.items():
                        if ks.cursor is not None and (key not in ids or _id(ks.cursor) < _id(ids[key])):
                            ids[key] = ks.cursor
            if not ids:
                await asyncio.sleep(0.05)
                continue
            try:
                resp = await r.xread(ids, count=1000, block=250)
            except ResponseError:  # e.g. WRONGTYPE: the hop's looks report it (blind); no reconnect
                await asyncio.sleep(self.config.poll_interval)
                continue
            got = clock.now()
            for key, entries in resp or []:
                for t, role in self._route(key):
                    if role == "main" and t.spec.shape == "stream":
                        self._arrivals(t, key, entries, _When(got, got, "push"))

    def _arrivals(self, t: _Target, key: str, entries: list[Any], when: _When) -> None:
        ks = t.keys.get(key)
        if ks is None or ks.cursor is None:
            return
        for entry_id, fields in entries:
            if _id(entry_id) <= _id(ks.cursor):
                continue
            ks.cursor = entry_id
            ks.fresh.append(entry_id)
            for tid, hits in self._stream_hits(t, key, [(entry_id, fields)]).items():
                self._digest(t, {tid: hits[0]}, set(), None, when, complete=False)

    # -- the look loop ------------------------------------------------------
    async def _loop(self, r: Redis, ps: PubSub | None) -> None:
        """Look when notified (push) and every ``poll_interval``; a hop seen for the first time
        gets its first look at once, so its baseline predates the probe's injection."""
        interval = self.config.poll_interval
        next_full = clock.now()
        while not self._closing:
            if self._failure is not None:
                raise self._failure
            self._wake.clear()
            wait = next_full - clock.now()
            if wait > 0 and not self._urgent():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                if self._failure is not None:
                    raise self._failure
            await self._subscribe(ps)
            full = clock.now() >= next_full
            targets = [
                t
                for t in self._targets.values()
                if full or (t.dirty and (self._push or t.prev_issue is None))
            ]
            if not targets and not full:
                continue
            # Poll mode certifies only full cycles; push certifies every cycle, since a hop that
            # had no notification is as it was at its last look.
            await self._cycle(r, targets, certify=full or self._push)
            if full:
                next_full = clock.now() + interval
                if ps is not None:
                    await self._recheck_notifications(r)
                    sent = self._ping_sent
                    if sent is None or self._notes_through >= sent:
                        await self._ping(ps)  # the last one was answered: certify further
                    elif clock.now() - sent > self.config.timeout:
                        raise ConnectionError("keyspace listener stopped answering")

    async def _recheck_notifications(self, r: Redis) -> None:
        """Someone may reset notify-keyspace-events under us: then removals went uncounted since
        the last check, so that window is blind, and the flags are set again (or we reconnect
        and fall back to polling)."""
        checked, self._notify_checked = self._notify_checked, clock.now()
        try:
            current = (await r.config_get("notify-keyspace-events")).get("notify-keyspace-events", "")
        except ResponseError:
            return  # not readable: nothing to compare with
        have = set(current.replace("A", "g$lshzxetd"))
        if all(c in have for c in _NOTIFY):
            return
        self.coverage.mark_blind(checked, self._notify_checked)
        if not await self._enable_notifications(r):
            raise ConnectionError("keyspace notifications were switched off")

    _notify_checked: float = 0.0

    def _urgent(self) -> bool:
        return any(t.dirty and (self._push or t.prev_issue is None) for t in self._targets.values())

    async def _cycle(self, r: Redis, targets: list[_Target], certify: bool) -> None:
        start = clock.now()
        ok = True
        for t in targets:
            ok = await self._look(r, t) and ok
        self.looks += 1
        if ok and certify:
            self._looked_through = start
            self._certify()
            self.last_error = None
            self._session_ok = True
        self._ready.set()

    async def _look(self, r: Redis, t: _Target) -> bool:
        """One atomic snapshot of a hop's keys, turned into events. False if it was not a good look."""
        spec, cfg = t.spec, self.config
        if t.glob and (t.rescan or not self._push):
            await self._discover(r, t)
        keys = tuple(sorted(t.keys))
        aux = t.needs_aux()
        checks: dict[str, list[tuple[str, str]]] = {k: [] for k in keys}
        for (k, entry_id), tid in t.handles.items():
            if k in checks:
                checks[k].append((tid, entry_id))
        notes = (t.first_note, t.last_note)
        removes = {k: ks.removes for k, ks in t.keys.items()}
        for ks in t.keys.values():
            ks.removes = 0
        t.first_note = t.last_note = None
        t.dirty = False

        def build(p: Pipeline) -> None:
            for k in keys:
                _read_main(p, spec.shape, k, t.keys[k].cursor, checks.get(k, []), cfg.max_scan)
            if aux:
                for k in (spec.processing_key, spec.dead_key):
                    if k:
                        _read_aux(p, spec.shape, k, cfg.max_scan)

        issued = clock.now()
        changed: bool | None = None
        if spec.shape != "stream" and not self._push:
            if t.guard is None:
                t.guard = _Guard(r)
            res, changed = await t.guard.snapshot(r, keys, build)
        else:
            async with r.pipeline(transaction=True) as p:
                build(p)
                res = await p.execute(raise_on_error=False)
        done = clock.now()
        if self._push and notes[0] is not None and notes[1] is not None:
            when = _When(notes[1], notes[0], "push")  # the writes we were told about
        else:
            when = _When(done, t.prev_issue, "poll")  # sometime since the previous look
        prev_issue, t.prev_issue = t.prev_issue, issued
        try:
            main, proc, dead, partial, missed = await self._parse(r, t, keys, res, aux, removes, checks)
        except _LookError as exc:
            self.failed_looks += 1
            if str(exc) != self.last_error:
                log.warning("redis_dlq %s: %s", redact_url(self._url), exc)
            self.last_error = str(exc)
            self._fail(issued)
            return False
        self._digest(t, main, proc, dead, when, complete=True)
        if changed and prev_issue is not None:
            missed = True  # poll: the key changed at all since the last snapshot
        if missed and prev_issue is not None and t.awaiting:
            # Something came and went unseen while a probe's entry is still awaited: it may have
            # been that entry. (previous look, this look] is blind.
            self.possible_misses += 1
            self.coverage.mark_blind(prev_issue, issued)
        if partial:
            self.failed_looks += 1
            self.last_error = f"{partial} holds more than max_scan={cfg.max_scan} entries; look is partial"
            self._fail(issued)
            return False
        return True

    async def _discover(self, r: Redis, t: _Target) -> None:
        """Keys matching a glob pattern (bounded SCAN), minus the hop's own aux keys."""
        found: set[str] = set()
        async for key in r.scan_iter(match=t.spec.key, count=1000, _type=t.spec.shape):
            if key not in t.aux:
                found.add(key)
            if len(found) >= self.config.max_keys:
                break
        for key in found - set(t.keys):
            t.keys[key] = _Key(members=Counter() if t.spec.shape != "stream" else None)
        held = {k for k, _ in t.handles}
        for key in set(t.keys) - found:
            if not t.keys[key].members and key not in held:
                del t.keys[key]
        t.rescan = False

    # -- reading what a look returned ----------------------------------------
    async def _parse(
        self,
        r: Redis,
        t: _Target,
        keys: tuple[str, ...],
        res: list[Any],
        aux: bool,
        removes: dict[str, int],
        checks: dict[str, list[tuple[str, str]]],
    ) -> tuple[dict[str, _Hit], set[str], dict[str, _Hit] | None, str | None, bool]:
        spec = t.spec
        it = iter(res)
        main: dict[str, _Hit] = {}
        partial: str | None = None
        missed = False
        if spec.shape == "stream":
            live: dict[tuple[str, str], str] = {}
            for k in keys:
                stream_info, new = next(it), next(it)
                found = [next(it) for _ in checks[k]]
                hits, lost = self._stream_look(t, k, stream_info, new, checks[k], found)
                missed = missed or lost
                for tid, key_hits in hits.items():
                    live.update({(h.key, h.handle or ""): tid for h in key_hits})
                    best = max(key_hits, key=lambda h: h.info.attempt or 0)  # a re-parked copy wins
                    if tid not in main or (best.info.attempt or 0) > (main[tid].info.attempt or 0):
                        main[tid] = best
            t.handles = live  # the entries we follow that exist now
        else:
            for k in keys:
                ks = t.keys[k]
                size, raw = next(it), next(it)
                _raise_if_error(size, k, spec.shape)
                _raise_if_error(raw, k, spec.shape)
                members = _members(raw)
                if size > len(members):
                    partial = k
                now = Counter(members)
                visible = sum((ks.members - now).values()) if ks.members is not None else 0
                # Removal notifications this look cannot pin on an entry it saw leave. A negative
                # balance (the removal seen before its notification arrived) is credit for one look.
                unexplained = removes.get(k, 0) - visible + ks.credit
                ks.credit = min(0, removes.get(k, 0) - visible)
                missed = missed or (self._push and ks.members is not None and unexplained > 0)
                ks.members = now
                for info in (await self._infos(r, t, members)).values():
                    for tid in info.traces:
                        if tid in t.traces:
                            main.setdefault(tid, _Hit(k, info))
        proc: set[str] = set()
        dead: dict[str, _Hit] | None = None
        if aux:
            if spec.processing_key:
                raw = next(it)
                _raise_if_error(raw, spec.processing_key, spec.shape)
                infos = await self._infos(r, t, _members(raw))
                proc = {tid for info in infos.values() for tid in info.traces if tid in t.traces}
            dead = {}
            if spec.dead_key:
                raw = next(it)
                _raise_if_error(raw, spec.dead_key, spec.shape)
                if spec.shape == "stream":
                    for tid, key_hits in self._stream_hits(t, spec.dead_key, raw).items():
                        dead[tid] = key_hits[0]
                else:
                    for info in (await self._infos(r, t, _members(raw))).values():
                        for tid in info.traces:
                            if tid in t.traces:
                                dead.setdefault(tid, _Hit(spec.dead_key, info))
        return main, proc, dead, partial, missed

    def _stream_look(
        self,
        t: _Target,
        key: str,
        stream_info: Any,
        new: Any,
        checks: list[tuple[str, str]],
        found: list[Any],
    ) -> tuple[dict[str, list[_Hit]], bool]:
        """One stream key: new entries since our cursor, which tracked entries still exist, and
        whether entries were added that we never received (``entries-added`` accounting)."""
        ks = t.keys[key]
        if isinstance(stream_info, ResponseError) and "no such key" in str(stream_info).lower():
            added, last_generated = 0, "0-0"
        else:
            _raise_if_error(stream_info, key, "stream")
            added, last_generated = (
                int(stream_info.get("entries-added") or 0),
                str(stream_info["last-generated-id"]),
            )
        _raise_if_error(new, key, "stream")
        first = ks.cursor is None
        if first:
            ks.cursor = "0-0"
        for entry_id, _ in new:
            if _id(entry_id) > _id(ks.cursor):
                ks.cursor = entry_id
                ks.fresh.append(entry_id)
        hits = self._stream_hits(t, key, new)
        for (tid, handle), rows in zip(checks, found, strict=True):
            _raise_if_error(rows, key, "stream")
            if rows and tid in t.traces:
                hits.setdefault(tid, []).append(_Hit(key, self._stream_info(t, rows[0][1]), handle))
        missed = False
        if not first and ks.added is not None:
            got = sum(1 for i in ks.fresh if _id(ks.last_generated) < _id(i) <= _id(last_generated))
            missed = added - ks.added > got or added < ks.added
        ks.fresh = [i for i in ks.fresh if _id(i) > _id(last_generated)]
        ks.added, ks.last_generated = added, last_generated
        if _id(ks.cursor) < _id(last_generated) and len(new) < self.config.max_scan:
            ks.cursor = last_generated  # entries between were deleted before anyone could read them
        return hits, missed

    def _stream_hits(self, t: _Target, key: str, entries: list[Any]) -> dict[str, list[_Hit]]:
        hits: dict[str, list[_Hit]] = {}
        for entry_id, fields in entries:
            if not fields:
                continue
            info = self._stream_info(t, fields)
            for tid in info.traces:
                if tid in t.traces:
                    hits.setdefault(tid, []).append(_Hit(key, info, entry_id))
        return hits

    def _stream_info(self, t: _Target, fields: dict[str, str]) -> _Info:
        text = json.dumps(fields, sort_keys=True)
        info = t.parsed.get(text)
        if info is None:
            obj: Any = {k: _maybe_json(v) for k, v in fields.items()}
            if len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
                obj = next(iter(obj.values()))  # one field holding the whole entry as JSON
            info = _extract(t.spec, text, obj)
            if len(t.parsed) > 4 * self.config.max_scan:
                t.parsed.clear()
            t.parsed[text] = info
        return info

    async def _infos(self, r: Redis, t: _Target, members: list[str]) -> dict[str, _Info]:
        """Parse list/zset members (cached by text). With ``meta_hash`` the members are ids and
        the entry is the hash's value, re-read for ids of probes in flight (attempts change)."""
        spec = t.spec
        out: dict[str, _Info] = {}
        if spec.meta_hash is None:
            for m in members:
                info = t.parsed.get(m)
                if info is None:
                    info = t.parsed[m] = _extract(spec, m, _maybe_json(m))
                out[m] = info
            if len(t.parsed) > 4 * self.config.max_scan:
                t.parsed = dict(out)
            return out
        # Re-read ids we have no metadata for yet, and ids of probes in flight.
        stale = [
            m
            for m in members
            if (i := t.parsed.get(m)) is None or i is _NO_META or any(x in t.traces for x in i.traces)
        ]
        if stale:
            for m, text in zip(stale, await r.hmget(spec.meta_hash, stale), strict=True):
                t.parsed[m] = _extract(spec, text, _maybe_json(text)) if text else _NO_META
        if len(t.parsed) > 4 * self.config.max_scan:
            t.parsed = {m: t.parsed[m] for m in members}
        return {m: t.parsed[m] for m in members}

    # -- what it means --------------------------------------------------------
    def _digest(
        self,
        t: _Target,
        main: dict[str, _Hit],
        proc: set[str],
        dead: dict[str, _Hit] | None,
        when: _When,
        complete: bool,
    ) -> None:
        """Turn one look (or one XREAD batch, ``complete=False``) into events per probe.

        Only probes the snapshot names, or that were in the DLQ (``present``) or on their way out
        (``leaving``) at the previous look, can have changed: nothing else is visited."""
        first = t.spec.first_attempt
        names = {*main, *proc, *(dead or ())}
        for tid in names | t.present | t.leaving if complete else names:
            tr = t.traces.get(tid)
            if tr is None:
                continue
            hit = main.get(tid)
            if hit is not None:
                attempt = hit.info.attempt
                if hit.handle is not None:
                    t.handles[(hit.key, hit.handle)] = tid
                if "entry" not in tr.seen:
                    tr.attempt0 = attempt
                    self._emit(t, tid, "entry", when, hit)
                    if attempt is not None and attempt > first:  # retried before we first saw it
                        self._emit(t, tid, "retry", when, hit)
                elif attempt is not None and tr.attempt0 is not None and attempt > tr.attempt0:
                    self._emit(t, tid, "retry", when, hit)
                if tid in t.traces:
                    t.present.add(tid)
                    t.leaving.discard(tid)
                    tr.lost = False
                continue
            if not complete:
                continue
            was = tid in t.present
            t.present.discard(tid)
            in_proc = tid in proc
            gone = dead.get(tid) if dead else None
            if (in_proc or gone) and "entry" not in tr.seen:  # taken before we saw it parked
                tr.attempt0 = (gone.info.attempt if gone else None) or first
                self._emit(t, tid, "entry", when, gone)
            if "entry" in tr.seen and ((was and not tr.lost) or in_proc or gone):
                self._emit(t, tid, "retry", when, gone)
            if gone is not None:
                self._emit(t, tid, "dead", when, gone)
            elif dead is not None and not in_proc and "retry" in tr.seen and not tr.lost:
                self._emit(t, tid, "resolved", when, None)
            elif "retry" in tr.seen and tid in t.traces and t.needs_aux():
                t.leaving.add(tid)  # in processing, or gone before a look read the aux keys
                continue
            t.leaving.discard(tid)

    def _emit(self, t: _Target, tid: str, event: str, when: _When, hit: _Hit | None) -> None:
        tr = t.traces.get(tid)
        if tr is None or event in tr.seen:
            return  # forgotten (every hop of it done) or already reported
        seen = tr.seen[event] = _Seen(when, hit)
        if event == "entry":
            t.awaiting.discard(tid)
        for w in list(t.index.get(tid)):
            if w.sink_spec.event == event:
                self._deliver(t, w, seen)

    def _deliver(self, t: _Target, w: Watch, seen: _Seen) -> None:
        when, hit = seen.when, seen.hit
        not_before = when.not_before if when.not_before is not None else w.since
        if w.since <= when.at:
            not_before = max(not_before, w.since)  # nothing of this probe before its watch began
        detail: dict[str, Any] = {"event": w.sink_spec.event}
        if hit is not None:
            detail.update(key=hit.key, attempt=hit.info.attempt, entry_id=hit.info.entry_id)
            if hit.handle:
                detail["stream_id"] = hit.handle
        w.observe(
            Observation(
                at=when.at,
                not_before=min(not_before, when.at),
                source=when.source,
                sink_time=hit.info.sink_time if hit is not None and w.sink_spec.event == "entry" else None,
                detail=detail,
            )
        )
        t.drop(w)


# -- helpers ----------------------------------------------------------------------


_NO_META = _Info((), None, None, None)


class _LookError(Exception):
    """A look that returned an error for one key (wrong shape, ACL): blind, but no reconnect."""


def _identity(spec: RedisDlqHop) -> RedisDlqHop:
    """Hops that differ only in ``event`` watch the same keys the same way: one target."""
    return spec.model_copy(update={"event": "entry"})


def _read_main(
    p: Pipeline, shape: str, key: str, cursor: str | None, checks: list[tuple[str, str]], max_scan: int
) -> None:
    if shape == "list":
        p.llen(key)
        p.lrange(key, 0, max_scan - 1)
    elif shape == "zset":
        p.zcard(key)
        p.zrange(key, 0, max_scan - 1)
    else:
        p.xinfo_stream(key)
        p.xrange(key, "-" if cursor is None else f"({cursor}", "+", count=max_scan)
        for _, handle in checks:  # do the entries we are following still exist?
            p.xrange(key, handle, handle)


def _read_aux(p: Pipeline, shape: str, key: str, max_scan: int) -> None:
    if shape == "list":
        p.lrange(key, 0, max_scan - 1)
    elif shape == "zset":
        p.zrevrange(key, 0, max_scan - 1)  # newest by score first
    else:
        p.xrevrange(key, "+", "-", count=max_scan)


def _raise_if_error(value: Any, key: str, shape: str) -> None:
    if isinstance(value, ResponseError):
        text = str(value)
        if text.startswith("WRONGTYPE"):
            raise _LookError(f"key {key!r} is not a {shape}")
        raise _LookError(f"reading {key!r}: {text[:120]}")


def _members(raw: Any) -> list[str]:
    return [str(m) for m in raw]


def _id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _maybe_json(text: str) -> Any:
    if text[:1] in ("{", "["):
        with contextlib.suppress(ValueError):
            return json.loads(text)
    return text


def _dig(obj: Any, path: str | None) -> Any:
    # payloads are often JSON inside a string field
    return None if path is None else value_at(obj, path, json_strings=True)


def _extract(spec: RedisDlqHop, text: str, obj: Any) -> _Info:
    if spec.trace_path is not None:
        value = _dig(obj, spec.trace_path)
        traces = (str(value).lower(),) if value else ()
    else:
        traces = tuple(dict.fromkeys(TRACE_ID.findall(text.lower())))
    attempt = _dig(obj, spec.attempt_field)
    try:
        attempt = int(attempt) if attempt is not None else None
    except (TypeError, ValueError):
        attempt = None
    entry_id = _dig(obj, "id")
    return _Info(
        traces, attempt, _epoch(_dig(obj, spec.timestamp_field)), str(entry_id) if entry_id else None
    )


def _epoch(value: Any) -> float | None:
    """Epoch seconds from an ISO string or an epoch number in seconds or milliseconds."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return clock.parse_iso(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value / 1000.0 if value > 1e11 else float(value)
    return None


plugin = SinkPlugin(
    name="redis_dlq",
    config=RedisDlqConfig,
    hop=RedisDlqHop,
    factory=RedisDlqCollector,
    summary="a Redis dead-letter queue (list, sorted set or stream): entries, retries, resolution",
)
