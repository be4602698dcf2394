"""The reference funnel's dead-letter queue and its retry worker.

A webhook delivery that failed is parked in Redis as a JSON entry::

    {"id", "queue", "payload", "error", "attempt", "max_attempts", "created_at", "last_attempt_at"}

and ``DlqWorker`` retries it: first ``retry_interval`` after ``created_at``, then with
exponential ``backoff``. A failed retry re-parks the entry with ``attempt + 1``; once ``attempt``
reaches ``max_attempts`` the entry moves to ``<key>:dead`` and stays there for inspection.

Production DLQs come in three shapes, and the collector watches all three, so the worker speaks
each of them (this is the ground truth the collector's tests measure against):

``list``    LPUSH to ``key``; the worker scans it, claims a due entry by moving it to
            ``<key>:processing`` in one Lua call, and re-parks / dead-letters / drops it from
            there, again atomically (the reliable-queue pattern: an entry is never nowhere).
``zset``    ZADD to ``key`` scored by the next retry time (epoch seconds, Sidekiq-style); the
            worker takes members with ``score <= now``. Claim/finish as for lists.
``stream``  XADD to ``key`` (flat fields, ``payload`` JSON-encoded); the worker reads it through a
            consumer group, holds delivered entries pending until due, then XACK + XDEL (plus
            the XADD of the re-parked or dead entry) in one MULTI.

Knobs (``retry_interval``, ``backoff``, ``retry_fail_rate``, ``max_attempts``) are plain
attributes and may be changed while the worker runs. For ``zset`` the retry time is frozen into
the score when an entry is parked, as a real scheduled set does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from tracer import clock
from tracer.sandbox import telemetry

log = logging.getLogger(__name__)

Shape = Literal["list", "zset", "stream"]
Handler = Callable[[dict[str, Any]], Awaitable[None]]

# KEYS: dlq, processing. ARGV: member. Claim only if the entry is still parked (another worker
# may have taken it), and never leave it in neither place.
_CLAIM_LIST = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
_CLAIM_ZSET = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  return 1
end
return 0
"""
# KEYS: processing, destination (dlq or dead). ARGV: old member, new member ('' = resolved), score.
# Only what is still in processing is finished, so a finish whose reply was lost (Redis restarted)
# can be sent again without parking the entry twice.
_FINISH_LIST = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 and ARGV[2] ~= '' then
  redis.call('LPUSH', KEYS[2], ARGV[2])
end
return 1
"""
_FINISH_ZSET = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 and ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
end
return 1
"""
# KEYS: stream, destination. ARGV: group, entry id, then the new entry's field/value pairs (none
# = resolved). Same rule: only an entry still in the stream is finished.
_FINISH_STREAM = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if redis.call('XDEL', KEYS[1], ARGV[2]) == 1 and #ARGV > 2 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
end
return 1
"""
SCAN_LIMIT = 1000  # list: entries looked at per tick
FINISH_TRIES = 5  # a finish interrupted by a Redis outage is sent again this many times


class RetryFailed(Exception):
    """Raised for a retry the ``retry_fail_rate`` knob decided to fail."""


@dataclass(frozen=True)
class RetryRecord:
    """Ground truth: one retry the worker made."""

    entry_id: str
    attempt: int  # the entry's attempt count before this retry
    started: float  # monotonic, when the worker claimed the entry
    ok: bool
    dead: bool = False


def new_entry(
    queue: str, payload: Any, error: str, *, max_attempts: int, now: float | None = None
) -> dict[str, Any]:
    """A freshly parked entry in the funnel's own format (attempt 1: the delivery that failed)."""
    stamp = clock.iso(time.time() if now is None else now)
    return {
        "id": uuid.uuid4().hex,
        "queue": queue,
        "payload": payload,
        "error": error,
        "attempt": 1,
        "max_attempts": max_attempts,
        "created_at": stamp,
        "last_attempt_at": stamp,
    }


def to_fields(entry: dict[str, Any]) -> dict[str, str]:
    """Stream fields: strings stay, everything else is JSON (so ``payload`` round-trips)."""
    return {k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in entry.items()}


def from_fields(fields: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = dict(fields)
    for k in ("payload", "attempt", "max_attempts"):
        if k in entry:
            with contextlib.suppress(ValueError, TypeError):
                entry[k] = json.loads(entry[k])
    return entry


class DlqWorker:
    """A dead-letter queue plus the worker that retries it, on a private Redis."""

    def __init__(
        self,
        redis_url: str,
        key: str = "dlq:webhooks",
        *,
        shape: Shape = "list",
        retry_interval: float = 2.0,
        backoff: float = 2.0,
        max_attempts: int = 5,
        retry_fail_rate: float = 0.0,
        handler: Handler | None = None,
        tick: float = 0.005,
        group: str = "retry-workers",
        consumer: str = "worker-1",
    ) -> None:
        if shape not in ("list", "zset", "stream"):
            raise ValueError(f"unknown DLQ shape {shape!r}")
        self.key = key
        self.processing_key = f"{key}:processing"
        self.dead_key = f"{key}:dead"
        self.shape: Shape = shape
        self.retry_interval = retry_interval
        self.backoff = backoff
        self.max_attempts = max_attempts
        self.retry_fail_rate = retry_fail_rate
        self.handler = handler
        self.tick = tick
        self.group = group
        self.consumer = consumer
        self.history: list[RetryRecord] = []
        self.parked_at: dict[str, float] = {}  # entry id -> monotonic time park() wrote it
        # Someone else's binary member must not stop the worker: it is read as replaced text.
        self._redis = Redis.from_url(redis_url, decode_responses=True, encoding_errors="replace")
        self._logged: set[str] = set()  # unexpected error kinds logged already (once each)
        self.skipped = 0  # members that are not an entry of ours (not a JSON object): left alone
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._pending: dict[str, dict[str, Any]] = {}  # stream: delivered, not yet retried
        self._claimed: set[str] = set()
        self._closing = False

    # -- the DLQ ------------------------------------------------------------
    def retry_delay(self, attempt: int) -> float:
        """Seconds from an entry's last attempt to its next retry."""
        return self.retry_interval * self.backoff ** max(0, attempt - 1)

    def due_at(self, entry: dict[str, Any]) -> float:
        """Epoch seconds when ``entry`` should next be retried."""
        last = clock.parse_iso(str(entry.get("last_attempt_at") or entry.get("created_at") or "")) or 0.0
        return last + self.retry_delay(_count(entry.get("attempt"), 1))

    async def park(self, queue: str, payload: Any, error: str) -> dict[str, Any]:
        """Write a new entry, as the funnel does when a delivery fails."""
        entry = new_entry(queue, payload, error, max_attempts=self.max_attempts)
        trace = telemetry.carrier()  # the failed delivery's trace, so its retry joins it
        if trace:
            entry["trace"] = trace
        await self.put(entry)
        return entry

    async def put(self, entry: dict[str, Any]) -> None:
        """Write ``entry`` as-is (the injector's path: a synthetic entry in the funnel's format).
        A connection dropped by a Redis restart is retried a few times, as a funnel would."""
        for attempt in range(3):
            self.parked_at[str(entry.get("id"))] = clock.now()
            try:
                if self.shape == "list":
                    await self._redis.lpush(self.key, _dump(entry))
                elif self.shape == "zset":
                    await self._redis.zadd(self.key, {_dump(entry): self.due_at(entry)})
                else:
                    await self._redis.xadd(self.key, to_fields(entry))
                return
            except RedisConnectionError:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.05)

    async def entries(self, key: str | None = None) -> list[dict[str, Any]]:
        """Current entries of ``key`` (default: the DLQ itself), for tests and the demo."""
        key = key or self.key
        kind = await self._redis.type(key)
        if kind == "list":
            return [json.loads(m) for m in await self._redis.lrange(key, 0, -1)]
        if kind == "zset":
            return [json.loads(m) for m in await self._redis.zrange(key, 0, -1)]
        if kind == "stream":
            return [from_fields(f) for _, f in await self._redis.xrange(key)]
        return []

    async def dead(self) -> list[dict[str, Any]]:
        return await self.entries(self.dead_key)

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> DlqWorker:
        if self.shape == "stream":
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
                await self._redis.xgroup_create(self.key, self.group, id="0", mkstream=True)
            self._tasks.append(asyncio.create_task(self._read_stream(), name="dlq-stream-reader"))
        self._tasks.append(asyncio.create_task(self._schedule(), name="dlq-retry-worker"))
        return self

    async def close(self) -> None:
        # The flag as well as cancel(): a cancellation landing inside a redis-py call can be
        # swallowed there, and a loop that only relied on it would run on.
        self._closing = True
        for t in [*self._tasks, *self._inflight]:
            t.cancel()
        tasks = [*self._tasks, *self._inflight]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self._tasks.clear()
        await self._redis.aclose()

    async def __aenter__(self) -> DlqWorker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the worker ---------------------------------------------------------
    async def _schedule(self) -> None:
        while not self._closing:
            try:
                for member in await self._due():
                    if await self._claim(member):
                        task = asyncio.create_task(self._retry(member))
                        self._inflight.add(task)
                        task.add_done_callback(self._inflight.discard)
            except RedisError as exc:  # Redis restarting: keep trying, like a real worker
                log.warning("dlq worker: %s", type(exc).__name__)
                await asyncio.sleep(0.2)
            except Exception as exc:  # a bug or a hostile entry must not stop the worker silently
                if type(exc).__name__ not in self._logged:
                    self._logged.add(type(exc).__name__)
                    log.exception("dlq worker: unexpected error; going on")
                await asyncio.sleep(0.2)
            await asyncio.sleep(self.tick)

    async def _due(self) -> list[str]:
        now = time.time()
        if self.shape == "list":
            due = []
            # The oldest SCAN_LIMIT entries (LPUSH parks at the head): a huge DLQ must not stall us.
            for m in await self._redis.lrange(self.key, -SCAN_LIMIT, -1):
                entry = self._entry(m)
                if entry is not None and self.due_at(entry) <= now:
                    due.append(m)
            return due
        if self.shape == "zset":
            members = await self._redis.zrangebyscore(self.key, "-inf", now, start=0, num=100)
            return [m for m in members if self._entry(m) is not None]
        return [i for i, e in self._pending.items() if i not in self._claimed and self.due_at(e) <= now]

    def _entry(self, member: str) -> dict[str, Any] | None:
        """The entry a member holds, or None for someone else's member (left where it is)."""
        try:
            entry = json.loads(member)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            self.skipped += 1
            return None
        return entry

    async def _claim(self, member: str) -> bool:
        if self.shape == "list":
            return bool(await self._redis.eval(_CLAIM_LIST, 2, self.key, self.processing_key, member))
        if self.shape == "zset":
            return bool(
                await self._redis.eval(_CLAIM_ZSET, 2, self.key, self.processing_key, member, time.time())
            )
        self._claimed.add(member)  # stream: delivered to us already; pending in the group
        return True

    async def _read_stream(self) -> None:
        """Consumer-group reader: first our own pending entries (after a restart), then new ones."""
        cursor = "0"
        while not self._closing:
            try:
                resp = await self._redis.xreadgroup(
                    self.group, self.consumer, {self.key: cursor}, count=100, block=100
                )
            except ResponseError as exc:  # NOGROUP: the stream was deleted under us
                if "NOGROUP" not in str(exc):
                    log.warning("dlq stream reader: %s", str(exc)[:120])  # e.g. WRONGTYPE
                    await asyncio.sleep(0.2)
                    continue
                with contextlib.suppress(ResponseError):
                    await self._redis.xgroup_create(self.key, self.group, id="0", mkstream=True)
                continue
            except RedisError:
                await asyncio.sleep(0.2)
                continue
            batch = resp[0][1] if resp else []
            for entry_id, fields in batch:
                if fields:
                    self._pending[entry_id] = from_fields(fields)
            if cursor == "0" and not batch:
                cursor = ">"

    async def _retry(self, member: str) -> None:
        entry = self._pending[member] if self.shape == "stream" else json.loads(member)
        started = clock.now()
        error = None
        try:
            if random.random() < self.retry_fail_rate:
                raise RetryFailed("retry failed (injected)")
            if self.handler is not None:
                with telemetry.continued(
                    "dlq retry", entry.get("trace"), **{"dlq.attempt": _count(entry.get("attempt"), 1)}
                ):
                    await self.handler(entry)
        except Exception as exc:  # the handler's failure is the retry's failure
            error = f"{type(exc).__name__}: {exc}"[:200]
        attempt = _count(entry.get("attempt"), 1)
        new: dict[str, Any] | None = None
        dead = False
        if error is not None:
            now = time.time()
            new = {**entry, "attempt": attempt + 1, "last_attempt_at": clock.iso(now), "error": error}
            if attempt + 1 >= _count(entry.get("max_attempts"), self.max_attempts):
                new["dead_at"] = clock.iso(now)
                dead = True
        self.history.append(RetryRecord(str(entry.get("id")), attempt, started, ok=error is None, dead=dead))
        for n in range(FINISH_TRIES):  # as a real worker would: the entry is never left half done
            try:
                await self._finish(member, new, dead)
                return
            except (RedisError, OSError) as exc:
                if n == FINISH_TRIES - 1:
                    log.warning(
                        "dlq worker: could not finish %s (%s); it stays in processing",
                        entry.get("id"),
                        type(exc).__name__,
                    )
                    return
                await asyncio.sleep(0.2 * 2**n)

    async def _finish(self, member: str, new: dict[str, Any] | None, dead: bool) -> None:
        dest = self.dead_key if dead else self.key
        if self.shape == "list":
            await self._redis.eval(
                _FINISH_LIST, 2, self.processing_key, dest, member, _dump(new) if new else "", 0
            )
        elif self.shape == "zset":
            score = time.time() if dead or new is None else self.due_at(new)
            await self._redis.eval(
                _FINISH_ZSET, 2, self.processing_key, dest, member, _dump(new) if new else "", score
            )
        else:
            pairs = [x for kv in to_fields(new).items() for x in kv] if new is not None else []
            await self._redis.eval(_FINISH_STREAM, 2, self.key, dest, self.group, member, *pairs)
            self._pending.pop(member, None)
            self._claimed.discard(member)


def _count(value: Any, default: int) -> int:
    """An attempt counter as someone else may have written it ("2", 2.0, "many", null)."""
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _dump(entry: dict[str, Any]) -> str:
    return json.dumps(entry, separators=(",", ":"), sort_keys=True)
