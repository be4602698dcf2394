"""What the collector knows about one hop's keys, and what a look means for each probe there.

A *target* is everything watched on one set of keys (hops differing only in ``event`` share it):
the probes, the keys' last contents, and the rules that turn a look into ``entry``, ``retry``,
``resolved`` and ``dead`` events. It does no I/O; the session feeds it looks.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from collectors.redis_dlq.config import GLOB, RedisDlqHop
from collectors.redis_dlq.entries import Entries, Hit
from collectors.redis_dlq.list_shape import ListShape
from collectors.redis_dlq.members import Guard
from collectors.redis_dlq.shape import Key, Shape
from collectors.redis_dlq.stream_shape import STREAM
from collectors.redis_dlq.zset_shape import ZsetShape
from tracer import clock
from tracer.watch import Observation, Watch, WatchIndex

# A hop's ``shape:`` -> how to read it. A new shape is registered here (and in RedisDlqHop.shape).
SHAPES: dict[str, Shape] = {s.name: s for s in (ListShape(), ZsetShape(), STREAM)}
SIGHTINGS = 20_000  # distinct entries remembered per target for near misses


@dataclass(frozen=True)
class When:
    """Where a look places what it found: in ``(not_before, at]``."""

    at: float
    not_before: float | None
    source: str


@dataclass(frozen=True)
class Seen:
    when: When
    hit: Hit | None


@dataclass
class Trace:
    """One probe's entry on one hop's keys."""

    seen: dict[str, Seen] = field(default_factory=dict)
    attempt0: int | None = None  # attempt at first sight
    # The entry's own id at first sight. While an entry with that id is there, other entries
    # carrying the same trace id (someone's copy, a forgery) are not read as the probe's entry;
    # once it is gone, one under another id counts (a worker that re-parks under a new id).
    entry_id: str | None = None
    # Why its absence from the DLQ is no evidence of a retry (Redis restarted since it was
    # present, the key was flushed or deleted by someone, or could not be read), or None.
    lost: str | None = None
    # Where the entry was at the last look, for ``explain``: parked, processing, dead, gone.
    state: str | None = None
    attempt: int | None = None  # at the last look that saw it
    first_at: float | None = None  # first seen parked (or taken)
    last_at: float | None = None  # last look that saw it where ``state`` says
    left_at: float | None = None  # the look that found it gone from the DLQ key
    hit: Hit | None = None  # the last sighting


def identity(spec: RedisDlqHop) -> RedisDlqHop:
    """Hops that differ only in ``event`` watch the same keys the same way: one target."""
    return spec.model_copy(update={"event": "entry"})


class Target:
    """Everything watched on one set of keys.

    A look only ever touches the probes its snapshot names, plus those it must see leave
    (``present``, ``leaving``): work bounded by the keys' contents, never by probes in flight."""

    def __init__(self, spec: RedisDlqHop, max_scan: int) -> None:
        self.spec = spec
        self.shape = SHAPES[spec.shape]
        self.max_scan = max_scan
        self.index = WatchIndex()
        self.events: Counter[str] = Counter()  # events of the watches in ``index``
        self.traces: dict[str, Trace] = {}
        self.awaiting: set[str] = set()  # probes whose entry has not shown yet
        self.present: set[str] = set()  # in a DLQ key at the last look
        self.leaving: set[str] = set()  # left the DLQ; resolved or dead still to be seen
        self.handles: dict[tuple[str, str], str] = {}  # stream (key, entry id) -> trace id
        self.glob = bool(GLOB.search(spec.key))
        self.keys: dict[str, Key] = {} if self.glob else {spec.key: Key()}
        self.aux = {k for k in (spec.processing_key, spec.dead_key, spec.meta_hash) if k}
        self.entries = Entries(spec, max_scan)
        self.prev_issue: float | None = None
        self.first_note: float | None = None
        self.last_note: float | None = None
        self.dirty = True
        self.rescan = True  # glob: SCAN for matching keys at the next look
        self.over_keys = False
        # The processing or dead key was longer than max_scan at the last look: an entry absent
        # from the part read may be there, so that look proves no resolution.
        self.aux_cut = False  # glob: more keys match than max_keys, so some go unread
        self.guard: Guard | None = None
        self.flushes: int | None = None  # FLUSHALL+FLUSHDB+SWAPDB calls at the last look
        # For ``explain``'s near misses: each distinct entry met in a DLQ key, (key, member or
        # stream id) -> [first seen, last seen, its trace ids]; bounded, oldest dropped first.
        self.sightings: dict[tuple[str, str], list[Any]] = {}
        self.sightings_cut = -math.inf  # sightings last seen before this were dropped

    def saw(self, key: str, ident: str, traces: tuple[str, ...]) -> None:
        now = clock.now()
        s = self.sightings.get((key, ident))
        if s is None:
            self.sightings[(key, ident)] = [now, now, traces]
            if len(self.sightings) > SIGHTINGS:
                keep = sorted(self.sightings.items(), key=lambda kv: kv[1][1])[-SIGHTINGS // 2 :]
                self.sightings_cut = keep[0][1][1]
                self.sightings = dict(keep)
        else:
            s[1] = now

    def others(self, tid: str, start: float, end: float) -> tuple[int, bool]:
        """Entries in the DLQ key(s) during ``[start, end]`` not carrying ``tid``, and whether
        the count is only a lower bound (older sightings were dropped)."""
        n = sum(
            1
            for f, last, traces in self.sightings.values()
            if f <= end and last >= start and tid not in traces
        )
        return n, start < self.sightings_cut

    def ours(self, tid: str, hit: Hit) -> bool:
        """Is ``hit`` the probe's own entry (same id as at first sight, when both have one)?"""
        tr = self.traces.get(tid)
        pinned = tr.entry_id if tr is not None else None
        return pinned is None or hit.info.entry_id is None or hit.info.entry_id == pinned

    def offer(self, hits: dict[str, Hit], tid: str, hit: Hit) -> None:
        """Keep the first hit per trace id, unless a later one is the probe's own entry."""
        cur = hits.get(tid)
        if cur is None or (not self.ours(tid, cur) and self.ours(tid, hit)):
            hits[tid] = hit

    def matches(self, key: str) -> str | None:
        """The role ``key`` plays for this target: main, aux or None."""
        if key in self.aux:
            return "aux"
        if key == self.spec.key or (self.glob and fnmatchcase(key, self.spec.key)):
            return "main"
        return None

    def needs_aux(self) -> bool:
        return bool(self.events["resolved"] or self.events["dead"])

    def add(self, w: Watch) -> Trace:
        self.index.add(w)
        self.events[w.sink_spec.event] += 1
        tr = self.traces.get(w.trace_id)
        if tr is None:
            tr = self.traces[w.trace_id] = Trace()
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

    # -- what a look means ----------------------------------------------------
    def digest(
        self,
        main: dict[str, Hit],
        proc: set[str],
        dead: dict[str, Hit] | None,
        when: When,
        complete: bool,
    ) -> None:
        """Turn one look (or one XREAD batch, ``complete=False``) into events per probe.

        Only probes the snapshot names, or that were in the DLQ (``present``) or on their way out
        (``leaving``) at the previous look, can have changed: nothing else is visited."""
        first = self.spec.first_attempt
        names = {*main, *proc, *(dead or ())}
        for tid in names | self.present | self.leaving if complete else names:
            tr = self.traces.get(tid)
            if tr is None:
                continue
            hit = main.get(tid)
            if hit is not None:
                attempt = hit.info.attempt
                tr.state, tr.attempt, tr.last_at, tr.hit = "parked", attempt, when.at, hit
                tr.first_at = when.at if tr.first_at is None else tr.first_at
                if hit.handle is not None:
                    self.handles[(hit.key, hit.handle)] = tid
                if "entry" not in tr.seen:
                    tr.attempt0, tr.entry_id = attempt, hit.info.entry_id
                    self._emit(tid, "entry", when, hit)
                    if attempt is not None and attempt > first:  # retried before we first saw it
                        self._emit(tid, "retry", when, hit)
                elif attempt is not None and tr.attempt0 is not None and attempt > tr.attempt0:
                    self._emit(tid, "retry", when, hit)
                if tid in self.traces:
                    self.present.add(tid)
                    self.leaving.discard(tid)
                    tr.lost = None
                continue
            if not complete:
                continue
            was = tid in self.present
            self.present.discard(tid)
            in_proc = tid in proc
            gone = dead.get(tid) if dead else None
            if in_proc or gone:
                tr.lost = None  # found again where a worker puts what it took
            if in_proc or gone or was:
                tr.state = "dead" if gone else "processing" if in_proc else "gone"
                tr.first_at = when.at if tr.first_at is None else tr.first_at
                tr.last_at = when.at
                if was or tr.left_at is None:
                    tr.left_at = when.at
                if gone is not None:
                    tr.attempt, tr.hit = gone.info.attempt, gone
            if (in_proc or gone) and "entry" not in tr.seen:  # taken before we saw it parked
                tr.attempt0 = (gone.info.attempt if gone else None) or first
                tr.entry_id = gone.info.entry_id if gone else None
                self._emit(tid, "entry", when, gone)
            if "entry" in tr.seen and ((was and not tr.lost) or in_proc or gone):
                self._emit(tid, "retry", when, gone)
            if gone is not None:
                self._emit(tid, "dead", when, gone)
            elif dead is not None and not self.aux_cut and not in_proc and "retry" in tr.seen and not tr.lost:
                self._emit(tid, "resolved", when, None)
            elif "retry" in tr.seen and tid in self.traces and self.needs_aux():
                self.leaving.add(tid)  # in processing, or gone before a look read the aux keys
                continue
            self.leaving.discard(tid)

    def _emit(self, tid: str, event: str, when: When, hit: Hit | None) -> None:
        tr = self.traces.get(tid)
        if tr is None or event in tr.seen:
            return  # forgotten (every hop of it done) or already reported
        seen = tr.seen[event] = Seen(when, hit)
        if event == "entry":
            self.awaiting.discard(tid)
        for w in list(self.index.get(tid)):
            if w.sink_spec.event == event:
                self.deliver(w, seen)

    def deliver(self, w: Watch, seen: Seen) -> None:
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
        self.drop(w)


class Targets:
    """The targets by hop identity, and which of them a key notification concerns."""

    def __init__(self, max_scan: int) -> None:
        self._by_hop: dict[RedisDlqHop, Target] = {}
        self._routes: dict[str, list[tuple[Target, str]]] = {}
        self._max_scan = max_scan

    def __iter__(self) -> Iterator[Target]:
        return iter(list(self._by_hop.values()))  # a copy: a watch may add a target meanwhile

    def of(self, spec: RedisDlqHop) -> Target:
        ident = identity(spec)
        t = self._by_hop.get(ident)
        if t is None:
            t = self._by_hop[ident] = Target(ident, self._max_scan)
            self._routes.clear()
        return t

    def find(self, spec: RedisDlqHop) -> Target | None:
        return self._by_hop.get(identity(spec))

    def route(self, key: str) -> list[tuple[Target, str]]:
        routes = self._routes.get(key)
        if routes is None:
            routes = [(t, role) for t in self._by_hop.values() if (role := t.matches(key))]
            self._routes[key] = routes
        return routes
