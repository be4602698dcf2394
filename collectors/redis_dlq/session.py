"""The Redis session: connect, enable keyspace notifications, listen, XREAD, and look.

Everything here is about *when* and *whether* the collector could see: it reconnects with
backoff, resyncs after a reconnect or a server restart, decides when to look (notified, or every
``poll_interval``), takes each look as one MULTI/EXEC through the hop's shape, and keeps
``coverage`` honest (a failed, partial or possibly-missing look is blind). What a look *means*
for each probe is the target's business (``target.py``).

Coverage is certified through the earlier of the last good look and, in push mode, the last
PING answered on the listener's connection: the PONG comes after every notification published
before the PING, so a dead or lagging listener certifies nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, InvalidResponse, RedisError, ResponseError

from collectors.redis_dlq.config import RedisDlqConfig
from collectors.redis_dlq.entries import Hit
from collectors.redis_dlq.members import Guard
from collectors.redis_dlq.shape import Checks, LookError, raise_if_error
from collectors.redis_dlq.stream_shape import STREAM, stream_id
from collectors.redis_dlq.target import Target, Targets, When
from tracer import clock
from tracer.net import is_redis_failure, redact_url
from tracer.net import short_redis_error as short_error
from tracer.supervise import Supervisor
from tracer.watch import Coverage

log = logging.getLogger(__name__)

# Keyspace-notification classes we need: K keyspace, g generic (del, rename, expire), l list,
# z zset, t stream, h hash (meta_hash), x expired, e evicted. 'A' is redis' alias for g$lshzxetd.
NOTIFY = "Kglzthxe"
# Subscribed first, so the listener's connection exists before any hop is known. Nobody publishes.
CONTROL = "funnel-tracer:redis_dlq"


class Session:
    """One collector's Redis connection over time, and the looks taken through it."""

    def __init__(self, config: RedisDlqConfig, coverage: Coverage, targets: Targets) -> None:
        self.config = config
        self.coverage = coverage
        self.supervisor = Supervisor("redis-dlq-collector", coverage)
        self._targets = targets
        self._url = config.url.get_secret_value()
        self._subscribed: set[str] = set()
        self.wake = asyncio.Event()
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        self._run_id: str | None = None
        self._db = 0
        self.push = False  # keyspace notifications active in this session
        self._session_ok = False
        self._looked_through = -math.inf
        self._notes_through = -math.inf
        self._ping_sent: float | None = None
        self._pings: dict[bytes, float] = {}  # PING token on the listener -> when it was sent
        self._ping_seq = 0
        self._pong_seq = 0  # the latest token answered
        self._pong = asyncio.Event()
        self._ps: PubSub | None = None
        self._flush_stats = False  # INFO commandstats readable: flushes are counted per look
        self._failed_at = -math.inf  # the latest failure: nothing certifies back past it
        self._closing = False
        self.notifications = "not tried"
        # The notify-keyspace-events flags this collector added (removed again on close unless
        # ``keep_notifications``): Redis is left as it was found.
        self.added_flags = ""
        self.looks = 0
        self.failed_looks = 0
        self.reconnects = 0
        self.possible_misses = 0
        self.wipes = 0  # looks that found a watched entry wiped (flushed, deleted) rather than retried
        self.last_error: str | None = None

    async def start(self) -> None:
        self._task = self.supervisor.start(self._run)
        # Return once the first look is done (or failed), so coverage means something.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.ready.wait(), self.config.timeout * 2 + 1)

    async def close(self) -> None:
        # The flag too: a cancellation landing inside a redis-py call can be swallowed there.
        self._closing = True
        self.wake.set()
        if self._task:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=self.config.timeout + 1)
        if self.added_flags and not self.config.keep_notifications:
            await self._restore_notifications()

    async def _restore_notifications(self) -> None:
        """Remove the flags we added from notify-keyspace-events (anything another client set
        since is kept). A failure is logged, never raised: exit must not hang on it."""
        added, self.added_flags = self.added_flags, ""
        r = self._client()
        try:
            current = (await r.config_get("notify-keyspace-events")).get("notify-keyspace-events", "")
            current = current.replace("A", "g$lshzxetd")  # spelled out, so each flag can be removed
            restored = "".join(c for c in current if c not in added)
            if restored != current:
                await r.config_set("notify-keyspace-events", restored)
            log.info("redis_dlq: notify-keyspace-events restored to %r", restored)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.warning(
                "redis_dlq %s: could not restore notify-keyspace-events (%s); it still has %r added",
                redact_url(self._url),
                short_error(exc, self._url),
                added,
            )
        finally:
            with contextlib.suppress(Exception):
                await r.aclose()

    # -- connection lifecycle -----------------------------------------------
    async def _run(self) -> None:
        backoff = self.config.reconnect_backoff
        while not self._closing:
            self.failure = None
            self._session_ok = False
            try:
                await self._session()
            except Exception as exc:
                if not is_redis_failure(exc):  # a bug must not end the collector silently
                    log.exception("redis_dlq: unexpected error")
                self._down(exc)
            finally:
                self.push = False
            if self._session_ok:
                backoff = self.config.reconnect_backoff  # it had been up: start over gently
            delay = backoff * (0.8 + 0.4 * random.random())
            backoff = min(self.config.max_backoff, backoff * 2)
            self.reconnects += 1
            await asyncio.sleep(delay)

    def _down(self, exc: BaseException) -> None:
        error = short_error(exc, self._url)
        if isinstance(exc, AuthenticationError):
            # Retrying cannot fix a wrong password: waits end now, hops become unknown with it.
            self._failed_at = max(self._failed_at, clock.now())
            self.coverage.broke(clock.now(), f"Redis {error}")
        else:
            self._fail(clock.now(), error)
        self.failed_looks += 1
        if error != self.last_error:
            log.warning("redis_dlq %s: %s; reconnecting", redact_url(self._url), error)
        self.last_error = error
        self.ready.set()

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
            self._db = int(r.connection_pool.connection_kwargs.get("db") or 0)
            self._resync(await self._server_run(r))
            self._looked_through = self._notes_through = -math.inf
            self._ping_sent = None
            self._pings.clear()
            self._flush_stats = await self._can_count_flushes(r)
            if self.config.mode == "push":
                self.push = await self._enable_notifications(r)
                self._notify_checked = clock.now()
                if self.push:
                    ps = self._ps = listener.pubsub()
                    await ps.subscribe(CONTROL)
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
            for t in self._targets:
                if t.guard is not None:
                    await t.guard.close()
                    t.guard = None
            self._ps = None
            if ps is not None:
                with contextlib.suppress(Exception):
                    await ps.aclose()
            for client in (r, listener):
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _server_run(self, r: Redis) -> str:
        """The server's run_id: a new one means it restarted and lost what it held (unless it
        persisted it). Without permission to run INFO, every reconnect counts as a restart."""
        try:
            info = await r.info("server")
        except ResponseError:
            if not self._info_warned:
                self._info_warned = True
                log.warning(
                    "redis_dlq %s: INFO refused: each reconnect is taken as a possible restart",
                    redact_url(self._url),
                )
            return f"unknown-{self.reconnects}"
        if not isinstance(info, dict):
            raise InvalidResponse("INFO did not answer as Redis does")
        return str(info.get("run_id", ""))

    _info_warned = False

    def _resync(self, run_id: str) -> None:
        """After a (re)connect: notification counts restart; after a server restart, what we
        believed present may simply be gone with the server's memory, so absence proves nothing."""
        restarted = self._run_id is not None and run_id != self._run_id
        self._run_id = run_id
        self._subscribed.clear()
        for t in self._targets:
            t.dirty = t.rescan = True
            t.first_note = t.last_note = None
            for ks in t.keys.values():
                ks.removes, ks.credit, ks.last_op = 0, 0, ""
                ks.unnoted = 0
                if restarted:
                    ks.members, ks.cursor, ks.added, ks.fresh = None, None, None, []
            if restarted:
                t.flushes = None  # the counters restart with the server
                for tid in t.present | set(t.handles.values()):
                    t.traces[tid].lost = "Redis restarted and its data was lost"
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
        missing = [c for c in NOTIFY if c not in have]
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
        self.added_flags += "".join(c for c in missing if c not in self.added_flags)
        return True

    # -- push: notifications and XREAD --------------------------------------
    async def _helper(self, work: Any) -> None:
        """Run a helper task; whatever ends it early ends the session (and so reconnects)."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not is_redis_failure(exc):
                log.exception("redis_dlq: helper task failed")
            self.failure = exc
            self.wake.set()

    async def _ping(self, ps: PubSub, certify: bool = True) -> int:
        """PING on the listener's connection; its PONG comes after every notification published
        before it. Each carries a token, so a PONG certifies its own PING's time, no later one."""
        self._ping_seq += 1
        token = str(self._ping_seq).encode()
        sent = clock.now()
        self._pings[token] = sent
        if certify:
            self._ping_sent = sent
        await ps.ping(token)
        return self._ping_seq

    async def _barrier(self) -> bool:
        """Wait until every notification published before now has been read (push only): a look
        that found a watched entry gone needs all the events about it before judging how it went."""
        if self._ps is None:
            return False
        seq = await self._ping(self._ps, certify=False)
        end = clock.now() + self.config.timeout
        while self._pong_seq < seq:
            left = end - clock.now()
            if left <= 0 or self.failure is not None:
                return False
            self._pong.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._pong.wait(), left)
        return True

    async def _can_count_flushes(self, r: Redis) -> bool:
        """FLUSHALL, FLUSHDB and SWAPDB send no keyspace event; their call counts in INFO
        commandstats, read inside every look, are how a look knows one happened since the last."""
        try:
            await r.info("commandstats")
        except ResponseError:
            if not self._flush_stats_warned:
                self._flush_stats_warned = True
                log.warning(
                    "redis_dlq %s: INFO commandstats refused: a FLUSHALL/FLUSHDB by someone else "
                    "cannot be told from a retry in poll mode",
                    redact_url(self._url),
                )
            return False
        return True

    _flush_stats_warned = False

    def _certify(self) -> None:
        through = min(self._looked_through, self._notes_through) if self.push else self._looked_through
        if through > self._failed_at:
            self.coverage.looked(through)

    def _fail(self, at: float, why: str | None = None) -> None:
        self._failed_at = max(self._failed_at, at)
        self.coverage.failed(at, why)

    async def _listen(self, ps: PubSub) -> None:
        """Read keyspace notifications; each marks its hop dirty and wakes the look loop."""
        prefix = f"__keyspace@{self._db}__:"
        while not self._closing:
            msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None:
                continue
            if msg["type"] == "pong":
                token = bytes(msg["data"] or b"")
                sent = self._pings.pop(token, None)
                if sent is not None:
                    self._notes_through = max(self._notes_through, sent)
                    self._pong_seq = max(self._pong_seq, int(token))
                    for old in [k for k in self._pings if int(k) < self._pong_seq]:
                        del self._pings[old]  # PONGs come in order: those will never come
                    self._pong.set()
                    self._certify()
                continue
            if msg["type"] != "pmessage":
                continue
            now = clock.now()
            key = msg["channel"].decode(errors="replace").removeprefix(prefix)
            op = msg["data"].decode(errors="replace")
            for t, role in self._targets.route(key):
                if role == "main":
                    ks = t.keys.get(key)
                    if ks is None and len(t.keys) < self.config.max_keys:
                        ks = t.keys[key] = t.shape.new_key()
                    elif ks is None:
                        t.over_keys = True  # a key we will not read
                    if ks is not None:
                        ks.note(op)
                t.first_note = t.first_note if t.first_note is not None else now
                t.last_note = now
                t.dirty = True
            self.wake.set()

    async def _subscribe(self, ps: PubSub | None) -> None:
        if ps is None:
            return
        want: set[str] = set()
        for t in self._targets:
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
            for t in self._targets:
                if t.spec.shape == "stream":
                    for key, ks in t.keys.items():
                        if ks.cursor is not None and (
                            key not in ids or stream_id(ks.cursor) < stream_id(ids[key])
                        ):
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
                for t, role in self._targets.route(key):
                    if role == "main" and t.spec.shape == "stream":
                        STREAM.arrivals(t, key, entries, When(got, got, "push"))

    # -- the look loop ------------------------------------------------------
    async def _loop(self, r: Redis, ps: PubSub | None) -> None:
        """Look when notified (push) and every ``poll_interval``; a hop seen for the first time
        gets its first look at once, so its baseline predates the probe's injection."""
        interval = self.config.poll_interval
        next_full = clock.now()
        while not self._closing:
            if self.failure is not None:
                raise self.failure
            self.wake.clear()
            wait = next_full - clock.now()
            if wait > 0 and not self._urgent():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), wait)
                if self.failure is not None:
                    raise self.failure
            await self._subscribe(ps)
            full = clock.now() >= next_full
            targets = [t for t in self._targets if full or (t.dirty and (self.push or t.prev_issue is None))]
            if not targets and not full:
                continue
            # Poll mode certifies only full cycles; push certifies every cycle, since a hop that
            # had no notification is as it was at its last look.
            await self._cycle(r, targets, certify=full or self.push)
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
        if all(c in have for c in NOTIFY):
            return
        self.coverage.mark_blind(
            checked, self._notify_checked, f"notify-keyspace-events was changed to {current!r} by someone"
        )
        if not await self._enable_notifications(r):
            raise ConnectionError("keyspace notifications were switched off")

    _notify_checked: float = 0.0

    def _urgent(self) -> bool:
        return any(t.dirty and (self.push or t.prev_issue is None) for t in self._targets)

    async def _cycle(self, r: Redis, targets: list[Target], certify: bool) -> None:
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
        self.ready.set()

    async def _look(self, r: Redis, t: Target) -> bool:
        """One atomic snapshot of a hop's keys, turned into events. False if it was not a good look."""
        spec, cfg = t.spec, self.config
        if t.glob and (t.rescan or not self.push):
            await self._discover(r, t)
        keys = tuple(sorted(t.keys))
        aux = t.needs_aux()
        checks: Checks = {k: [] for k in keys}
        for (k, entry_id), tid in t.handles.items():
            if k in checks:
                checks[k].append((tid, entry_id))
        notes = (t.first_note, t.last_note)
        removes = {k: ks.removes for k, ks in t.keys.items()}
        wiped = {k: ks.wiped for k, ks in t.keys.items() if ks.wiped}
        for ks in t.keys.values():
            ks.removes, ks.wiped = 0, None
        stats = self._flush_stats
        t.first_note = t.last_note = None
        t.dirty = False

        def build(p: Pipeline) -> None:
            for k in keys:
                t.shape.read(p, k, t.keys[k], checks.get(k, []), cfg.max_scan)
            if aux:
                for k in (spec.processing_key, spec.dead_key):
                    if k:
                        t.shape.read_aux(p, k, cfg.max_scan)
            if stats:
                p.info("commandstats")

        issued = clock.now()
        changed: bool | None = None
        if t.shape.guarded and not self.push:
            if t.guard is None:
                t.guard = Guard(r)
            res, changed = await t.guard.snapshot(r, keys, build)
        else:
            async with r.pipeline(transaction=True) as p:
                build(p)
                res = await p.execute(raise_on_error=False)
        done = clock.now()
        if self.push and notes[0] is not None and notes[1] is not None:
            when = When(notes[1], notes[0], "push")  # the writes we were told about
        else:
            when = When(done, t.prev_issue, "poll")  # sometime since the previous look
        prev_issue, t.prev_issue = t.prev_issue, issued
        t.entries.meta_read_at = None
        flushed = self._flushed(t, res.pop() if stats else None)
        try:
            main, proc, dead, partial, missed = await self._parse(r, t, keys, res, aux, removes, checks)
            wipe = await self._wiped(t, main, wiped, flushed)
        except LookError as exc:
            for k, op in wiped.items():  # still to be judged by the next good look
                if k in t.keys and not t.keys[k].wiped:
                    t.keys[k].wiped = op
            # What the keys held meanwhile is unknown: a watched entry's absence at the next
            # good look says nothing about a retry.
            for tid in t.present:
                if (tr := t.traces.get(tid)) is not None:
                    tr.lost = tr.lost or f"its key could not be read ({exc})"
            self.failed_looks += 1
            if str(exc) != self.last_error:
                log.warning("redis_dlq %s: %s", redact_url(self._url), exc)
            self.last_error = str(exc)
            self._fail(issued, str(exc))
            return False
        read_at = t.entries.meta_read_at
        if when.source == "poll" and read_at is not None:
            # Metadata is read just after the snapshot: a bump it shows may be that recent.
            when = When(max(when.at, read_at), when.not_before, "poll")
        t.digest(main, proc, dead, when, complete=True)
        if wipe is not None:
            # Watched entries were taken by something that is no retry: whatever their retry hop
            # would have shown in (previous look, this look] cannot be known.
            self.wipes += 1
            if wipe != self._last_wipe:
                log.warning(
                    "redis_dlq %s: %s; those entries' retries are unknown", redact_url(self._url), wipe
                )
            self._last_wipe = wipe
            self.coverage.mark_blind(prev_issue if prev_issue is not None else issued, issued, wipe)
        if (changed or flushed) and prev_issue is not None:
            missed = True  # poll: the key changed at all since the last snapshot; or a flush
        if missed and prev_issue is not None and t.awaiting:
            # Something came and went unseen while a probe's entry is still awaited: it may have
            # been that entry. (previous look, this look] is blind.
            self.possible_misses += 1
            self.coverage.mark_blind(
                prev_issue, issued, flushed or "an entry may have come and gone between two looks"
            )
        if partial or t.over_keys:
            self.failed_looks += 1
            self.last_error = (
                f"{partial} holds more than max_scan={cfg.max_scan} entries; look is partial"
                if partial
                else f"{spec.key} matches more than max_keys={cfg.max_keys} keys; look is partial"
            )
            self._fail(issued, self.last_error)
            return False
        return True

    _last_wipe: str | None = None

    def _flushed(self, t: Target, stats: Any) -> str | None:
        """Did a FLUSHALL, FLUSHDB or SWAPDB run since this target's previous look?"""
        if not isinstance(stats, dict):
            before, t.flushes = t.flushes, None
            return None
        calls = sum(
            int((stats.get(f"cmdstat_{c}") or {}).get("calls", 0)) for c in ("flushall", "flushdb", "swapdb")
        )
        before, t.flushes = t.flushes, calls
        if before is not None and calls != before:  # more calls, or CONFIG RESETSTAT: can't tell
            return "the database was flushed (FLUSHALL, FLUSHDB or SWAPDB) by someone"
        return None

    async def _wiped(
        self, t: Target, main: dict[str, Hit], wiped: dict[str, str], flushed: str | None
    ) -> str | None:
        """Watched entries that left the DLQ since the last look, but not one by one as a worker
        takes them: the key was deleted, renamed, expired, flushed; or (push) they left with no
        notification at all. Those are marked ``lost`` (their absence proves no retry); returns
        why, or None."""
        gone = [tid for tid in t.present if tid not in main]
        if not gone:
            return None
        if self.push and not await self._barrier():
            raise LookError("keyspace listener did not answer in time")
        why = None
        for tid in gone:
            tr = t.traces.get(tid)
            if tr is None:  # unwatched while we waited for the listener
                continue
            key = tr.hit.key if tr.hit is not None else t.spec.key
            reason = flushed or self._key_wiped(t, key, wiped.get(key))
            if reason is not None:
                tr.lost = why = reason
        return why

    def _key_wiped(self, t: Target, key: str, op: str | None) -> str | None:
        ks = t.keys.get(key)
        if ks is None:
            return None
        if ks.gone:
            return f"the stream {key!r} was deleted"
        if ks.partial:
            return f"{key!r} holds more than max_scan entries: it may only be past the part read"
        if not self.push:
            return None
        op = op or ks.wiped  # also events that came in while we made sure all had
        if op is not None:
            return f"{key!r} was wiped by someone (event {op!r})"
        if ks.unnoted - ks.removes > 0:
            return f"entries left {key!r} without any notification (a flush, or notifications off)"
        return None

    async def _discover(self, r: Redis, t: Target) -> None:
        """Keys matching a glob pattern (bounded SCAN), minus the hop's own aux keys."""
        found: set[str] = set()
        t.over_keys = False
        async for key in r.scan_iter(match=t.spec.key, count=1000, _type=t.shape.name):
            if key not in t.aux:
                if len(found) >= self.config.max_keys:
                    t.over_keys = True  # keys we will not read: a probe's entry may be in one
                    break
                found.add(key)
        for key in found - set(t.keys):
            t.keys[key] = t.shape.new_key()
        held = {k for k, _ in t.handles}
        for key in set(t.keys) - found:
            if not t.keys[key].members and key not in held:
                del t.keys[key]
        t.rescan = t.over_keys  # push: look for the pattern's keys again until they fit

    # -- reading what a look returned ----------------------------------------
    async def _parse(
        self,
        r: Redis,
        t: Target,
        keys: tuple[str, ...],
        res: list[Any],
        aux: bool,
        removes: dict[str, int],
        checks: Checks,
    ) -> tuple[dict[str, Hit], set[str], dict[str, Hit] | None, str | None, bool]:
        spec = t.spec
        it = iter(res)
        main, partial, missed = await t.shape.parse(r, t, keys, it, removes, checks, self.push)
        proc: set[str] = set()
        dead: dict[str, Hit] | None = None
        if aux:
            cut = False  # an aux key read only in part: absence from it proves nothing
            if spec.processing_key:
                raw = next(it)
                raise_if_error(raw, spec.processing_key, spec.shape)
                proc = set(await t.shape.parse_aux(r, t, spec.processing_key, raw))
                if len(raw) >= self.config.max_scan:
                    cut, partial = True, partial or spec.processing_key
            dead = {}
            if spec.dead_key:
                raw = next(it)
                raise_if_error(raw, spec.dead_key, spec.shape)
                dead = await t.shape.parse_aux(r, t, spec.dead_key, raw)
                if len(raw) >= self.config.max_scan:
                    cut, partial = True, partial or spec.dead_key
            t.aux_cut = cut
        return main, proc, dead, partial, missed
