"""The ``stream`` shape: XADD to park, consumer groups to claim, XDEL when done.

Streams need no WATCH: a blocked XREAD (run by the session) is handed every added entry, and each
look compares the stream's ``entries-added`` counter with the entries received, so an entry
added and deleted unseen is counted as missed. Entries we follow are re-checked by id.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from collectors.redis_dlq.entries import Hit
from collectors.redis_dlq.shape import Checks, Key, raise_if_error

if TYPE_CHECKING:
    from collectors.redis_dlq.target import Target, When


class StreamShape:
    name = "stream"
    guarded = False

    def new_key(self) -> Key:
        return Key()

    def read(self, p: Pipeline, key: str, ks: Key, checks: list[tuple[str, str]], max_scan: int) -> None:
        p.xinfo_stream(key)
        p.xrange(key, "-" if ks.cursor is None else f"({ks.cursor}", "+", count=max_scan)
        for _, handle in checks:  # do the entries we are following still exist?
            p.xrange(key, handle, handle)

    def read_aux(self, p: Pipeline, key: str, max_scan: int) -> None:
        p.xrevrange(key, "+", "-", count=max_scan)

    async def parse(
        self,
        r: Redis,
        t: Target,
        keys: tuple[str, ...],
        replies: Iterator[Any],
        removes: dict[str, int],
        checks: Checks,
        push: bool,
    ) -> tuple[dict[str, Hit], str | None, bool]:
        main: dict[str, Hit] = {}
        missed = False
        live: dict[tuple[str, str], str] = {}
        for k in keys:
            stream_info, new = next(replies), next(replies)
            found = [next(replies) for _ in checks[k]]
            hits, lost = self._look(t, k, stream_info, new, checks[k], found)
            missed = missed or lost
            for tid, key_hits in hits.items():
                live.update({(h.key, h.handle or ""): tid for h in key_hits})

                # The probe's own entry first (not a copy under another id), then a re-parked one.
                def rank(h: Hit, tid: str = tid) -> tuple[bool, int]:
                    return t.ours(tid, h), h.info.attempt or 0

                best = max(key_hits, key=rank)
                if tid not in main or rank(best) > rank(main[tid]):
                    main[tid] = best
        t.handles = live  # the entries we follow that exist now
        return main, None, missed

    async def parse_aux(self, r: Redis, t: Target, key: str, raw: Any) -> dict[str, Hit]:
        out: dict[str, Hit] = {}
        for tid, key_hits in self.hits(t, key, raw).items():
            for h in key_hits:
                t.offer(out, tid, h)
        return out

    def _look(
        self,
        t: Target,
        key: str,
        stream_info: Any,
        new: Any,
        checks: list[tuple[str, str]],
        found: list[Any],
    ) -> tuple[dict[str, list[Hit]], bool]:
        """One stream key: new entries since our cursor, which tracked entries still exist, and
        whether entries were added that we never received (``entries-added`` accounting)."""
        ks = t.keys[key]
        ks.gone = False
        if isinstance(stream_info, ResponseError) and "no such key" in str(stream_info).lower():
            added, last_generated = 0, "0-0"
            # XDEL never removes the stream itself: a stream that is gone was deleted (or
            # flushed) by someone, so what it held was wiped, not retried; read any new one whole.
            ks.gone = ks.added is not None and ks.added > 0
            ks.cursor = None if ks.cursor is None else "0-0"
            ks.fresh = []
        else:
            raise_if_error(stream_info, key, "stream")
            added, last_generated = (
                int(stream_info.get("entries-added") or 0),
                str(stream_info["last-generated-id"]),
            )
        raise_if_error(new, key, "stream")
        first = ks.cursor is None
        if first:
            ks.cursor = "0-0"
        for entry_id, _ in new:
            if stream_id(entry_id) > stream_id(ks.cursor):
                ks.cursor = entry_id
                ks.fresh.append(entry_id)
        hits = self.hits(t, key, new, main=True)
        for (tid, handle), rows in zip(checks, found, strict=True):
            raise_if_error(rows, key, "stream")
            if rows and tid in t.traces:
                hits.setdefault(tid, []).append(Hit(key, t.entries.of_fields(rows[0][1]), handle))
        missed = False
        if not first and ks.added is not None:
            got = sum(
                1
                for i in ks.fresh
                if stream_id(ks.last_generated) < stream_id(i) <= stream_id(last_generated)
            )
            missed = added - ks.added > got or added < ks.added
            if added < ks.added:  # deleted and created again between two looks
                ks.gone = True
        ks.fresh = [i for i in ks.fresh if stream_id(i) > stream_id(last_generated)]
        ks.added, ks.last_generated = added, last_generated
        if stream_id(ks.cursor) < stream_id(last_generated) and len(new) < t.max_scan:
            ks.cursor = last_generated  # entries between were deleted before anyone could read them
        if ks.gone:  # a new stream may reuse lower ids (explicit ones): read it from the start
            ks.cursor, ks.fresh = "0-0", []
        return hits, missed

    def hits(self, t: Target, key: str, entries: list[Any], main: bool = False) -> dict[str, list[Hit]]:
        hits: dict[str, list[Hit]] = {}
        for entry_id, fields in entries:
            if not fields:
                continue
            info = t.entries.of_fields(fields)
            if main:
                t.saw(key, entry_id, info.traces)
            for tid in info.traces:
                if tid in t.traces:
                    hits.setdefault(tid, []).append(Hit(key, info, entry_id))
        return hits

    def arrivals(self, t: Target, key: str, entries: list[Any], when: When) -> None:
        """Entries handed to a blocked XREAD: each becomes an event as soon as it is read."""
        ks = t.keys.get(key)
        if ks is None or ks.cursor is None:
            return
        for entry_id, fields in entries:
            if stream_id(entry_id) <= stream_id(ks.cursor):
                continue
            ks.cursor = entry_id
            ks.fresh.append(entry_id)
            for tid, hits in self.hits(t, key, [(entry_id, fields)], main=True).items():
                if t.ours(tid, hits[0]):  # a copy under another id waits for a full look
                    t.digest({tid: hits[0]}, set(), None, when, complete=False)


def stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


STREAM = StreamShape()
