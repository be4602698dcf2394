"""The await stage: what a collector is asked to look for, what it saw, and when it could see.

A ``Watch`` is one expected hop of one probe. Collectors index watches by trace id (never a
scan over everything in flight) and call ``Watch.observe`` when the sink shows the probe.

``Coverage`` is a collector's record of when it was able to look. Verdicts consult it so a
window the collector could not see becomes ``unknown`` rather than ``late`` or ``lost``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tracer.probe import Probe


class Hop(Protocol):
    """What a watch needs of a hop (``tracer.spec.HopSpec`` has it; the spec sits above us)."""

    name: str

    @property
    def sink(self) -> str: ...

    @property
    def sink_spec(self) -> Any: ...


@dataclass(frozen=True)
class Observation:
    """A sighting of a probe on a sink.

    The probe arrived somewhere in ``(not_before, at]`` (monotonic seconds). For a push
    receiver the two are equal; for a poller ``not_before`` is the previous successful look,
    so ``at - not_before`` is the measurement's error bar.
    """

    at: float
    not_before: float
    source: str = "push"
    sink_time: float | None = None  # epoch seconds stamped by the sink itself (e.g. PostHog created_at)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def error_bar(self) -> float:
        return max(0.0, self.at - self.not_before)


@dataclass(eq=False)
class Watch:
    """One hop of one probe, awaited on one sink."""

    probe: Probe
    hop: Hop
    since: float  # monotonic: when the watch began (just before injection)
    observations: list[Observation] = field(default_factory=list)
    # Sources the collector will report (e.g. {"push", "poll"} for PostHog with a realtime
    # destination); empty means any one sighting settles the hop.
    expect_sources: set[str] = field(default_factory=set)
    # Nothing more can be seen (a collector that judges the injection itself has looked, see
    # tracer.plugins.ObservesInjection); ``settled_reason`` says why it was not seen, if it was not.
    settled: bool = False
    settled_reason: str | None = None
    _hit: bool = field(default=False, repr=False)  # seen at least once
    _event: asyncio.Event | None = field(default=None, repr=False)  # see _seen
    _waiter: asyncio.Future[bool] | None = field(default=None, repr=False)

    @property
    def _seen(self) -> asyncio.Event:
        """Set on each sighting. Created on first use: ``wait_seen`` needs none, and a canary
        may hold 10,000 watches in flight."""
        if self._event is None:
            self._event = asyncio.Event()
            if self._hit:
                self._event.set()
        return self._event

    @property
    def trace_id(self) -> str:
        return self.probe.trace_id

    @property
    def sink(self) -> str:
        return self.hop.sink

    @property
    def sink_spec(self) -> Any:
        return self.hop.sink_spec

    @property
    def first(self) -> Observation | None:
        return min(self.observations, key=lambda o: o.at) if self.observations else None

    def observe(self, obs: Observation) -> None:
        """Record a sighting. Call on the event loop thread. Later sightings by another
        source (push and poll of the same event) are kept to compare them."""
        if any(o.source == obs.source for o in self.observations):
            return
        self.observations.append(obs)
        self._hit = True
        if self._event is not None:
            self._event.set()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    def settle(self, reason: str | None = None) -> None:
        """The collector has looked for good: stop waiting for this watch."""
        self.settled, self.settled_reason = True, reason
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(self._hit)

    def missing_sources(self) -> set[str]:
        return self.expect_sources - {o.source for o in self.observations}

    async def wait_other_sources(self, timeout: float) -> None:
        """After a first sighting, give the other expected sources a short while to report, so
        the report can compare them. The verdict never waits on this."""
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, timeout)
        while self.missing_sources() and loop.time() < end:
            self._seen.clear()
            try:
                await asyncio.wait_for(self._seen.wait(), timeout=end - loop.time())
            except asyncio.TimeoutError:
                break
        self._seen.set()

    async def wait_seen(self, timeout: float, coverage: Coverage | None = None) -> bool:
        """True once seen; False at ``timeout``, or at once when the watch is settled (nothing
        more can be seen) or ``coverage`` is broken (a permanent error: waiting longer cannot
        produce evidence)."""
        if self._hit or self.settled:
            return self._hit
        if coverage is not None and coverage.broken:
            return False
        if timeout > 0 and self._waiter is None:
            # A future and a timer rather than wait_for: no extra task per probe in flight
            # (a canary may hold 10,000 of these).
            loop = asyncio.get_running_loop()
            fut = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, fut)
            if coverage is not None:
                coverage._aborts.add(fut)
            try:
                return await fut
            finally:
                timer.cancel()
                self._waiter = None
                if coverage is not None:
                    coverage._aborts.discard(fut)
        try:
            await asyncio.wait_for(self._seen.wait(), timeout=max(0.0, timeout))
        except asyncio.TimeoutError:
            return False
        return True


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class Coverage:
    """When a collector could look.

    ``looked(through)``: a successful look; anything that reached the sink up to ``through``
    would have been seen. ``failed(at, why)``: a look failed or could not be made; the collector
    is blind from its last certified moment until the next successful look. ``broke(at, why)``: a
    permanent error (a wrong key, a missing project): no look will succeed until the setup is
    fixed, so nobody should wait for one. ``why`` is kept for evidence ("HTTP 401 ...").

    ``retroactive`` collectors (a query over a time window) still find, on their next good
    look, what arrived while they were blind; only the timing is lost. Push receivers are not
    retroactive: what was sent while they were down may never be seen.
    """

    def __init__(self, retroactive: bool, keep: int = 4096) -> None:
        self.retroactive = retroactive
        self.certified = -math.inf
        # [start, end, why]; end=inf while blind
        self._blind: deque[list[Any]] = deque(maxlen=keep)
        self.broken: str | None = None  # why no look can succeed (see broke), None when fine
        self._aborts: set[asyncio.Future[bool]] = set()  # waits to end early when broken
        self._changed = asyncio.Event()
        self.failures = 0
        self._holds: dict[str, float] = {}  # external blindness (see hold), key -> since
        self._caps: dict[str, float] = {}  # external limits on certification (see cap)
        self._missed: deque[tuple[float, float]] = deque(maxlen=keep)  # see missed

    @property
    def blind_now(self) -> bool:
        return self._open or bool(self._holds)

    @property
    def _open(self) -> bool:
        return bool(self._blind) and self._blind[-1][1] == math.inf

    def looked(self, through: float) -> None:
        if self._open:
            self._blind[-1][1] = through
        self.certified = max(self.certified, through)
        self.broken = None
        self._wake()

    def failed(self, at: float, why: str | None = None) -> None:
        self.failures += 1
        if not self._open:
            start = self.certified if self.certified > -math.inf else at
            self._blind.append([min(start, at), math.inf, why])
        elif why and not self._blind[-1][2]:
            self._blind[-1][2] = why
        self._wake()

    def broke(self, at: float, why: str) -> None:
        """A permanent error: blind until a look succeeds again, and every wait ends now."""
        self.failed(at, why)
        self.broken = why
        for fut in list(self._aborts):
            if not fut.done():
                fut.set_result(False)
        self._wake()

    def blind_windows(self, start: float, end: float) -> list[tuple[float, float, str | None]]:
        """Blind windows overlapping ``[start, end]``, clipped to it, with why (when known)."""
        out = [
            (max(b0, start), min(b1, end), why) for b0, b1, why in self._blind if b0 <= end and b1 >= start
        ]
        out += [(max(h0, start), end, f"held: {key}") for key, h0 in self._holds.items() if h0 <= end]
        return out

    def mark_blind(self, start: float, end: float, why: str | None = None) -> None:
        """Record a closed window ``[start, end]`` in which nobody looked, learnt after the fact
        (e.g. the canary process was down between its last heartbeat and a restart, its event
        loop stalled, a poller's answers came too slowly to keep its cadence, a DLQ key was
        wiped). Verdicts treat it like any other blind window; the current state (blind or not)
        is unchanged."""
        if end < start:
            return
        self._insert_closed([start, end, why or "nobody looked (the tracer was not running)"])

    def missed(self, start: float, end: float, why: str) -> None:
        """Something arrived in ``[start, end]`` that the collector saw but could not read (a
        mail too large to download whole, one the parser could not read). A later look will not
        read it either, so even a retroactive collector cannot say a probe whose window overlaps
        is absent: verdicts treat this window as blind whatever ``retroactive`` says. Shown as a
        blind window in the evidence; the current state (blind or not) is unchanged."""
        if end < start:
            start, end = end, start
        self._missed.append((start, end))
        self._insert_closed([start, end, why])

    def _insert_closed(self, entry: list[Any]) -> None:
        if self._blind.maxlen is not None and len(self._blind) >= self._blind.maxlen:
            self._blind.popleft()
        if self._open:
            self._blind.insert(len(self._blind) - 1, entry)  # the open interval stays last
        else:
            self._blind.append(entry)
        self._wake()

    def missed_start(self, start: float, end: float) -> float | None:
        """Earliest start of a ``missed`` window overlapping ``[start, end]``, or None."""
        found = [m0 for m0, m1 in self._missed if m0 <= end and m1 >= start]
        return min(found) if found else None

    def hold(self, key: str, at: float) -> None:
        """Blind from ``at`` for a reason outside the collector's own looks (which keep
        succeeding): e.g. the canary's shared ledger is down, so sightings made by *other*
        instances' receivers cannot reach this one. Nothing after ``at`` is certified until
        ``release``; the held window then stays blind."""
        self._holds.setdefault(key, at)
        self._wake()

    def release(self, key: str, at: float) -> None:
        start = self._holds.pop(key, None)
        if start is not None:
            self.mark_blind(start, at)

    def blind_start(self, start: float, end: float) -> float | None:
        """Earliest start of a blind interval overlapping ``[start, end]``, or None."""
        found = None
        for b0, b1, _ in self._blind:
            if b0 <= end and b1 >= start and (found is None or b0 < found):
                found = b0
        for h0 in self._holds.values():
            if h0 <= end and (found is None or h0 < found):
                found = h0
        return found

    def cap(self, key: str, through: float) -> None:
        """Certify nothing past ``through`` on ``key``'s account, whatever the collector's own
        looks say: e.g. sightings made by other canary instances are only known to have reached
        this one up to the last moment its shared ledger answered."""
        self._caps[key] = through
        self._wake()

    def _covers(self, moment: float) -> bool:
        if self.certified < moment or any(c < moment for c in self._caps.values()):
            return False
        return not any(h0 <= moment for h0 in self._holds.values())

    async def wait_certified(self, moment: float, timeout: float) -> bool:
        """Wait until a successful look has covered ``moment``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while not self._covers(moment):
            left = deadline - loop.time()
            if left <= 0 or self.broken:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except asyncio.TimeoutError:
                return self._covers(moment)
        return True

    def _wake(self) -> None:
        self._changed.set()


class WatchIndex:
    """In-flight watches of one collector, keyed by trace id so matching a sighting is a dict
    lookup, never a scan over every probe in flight."""

    def __init__(self) -> None:
        self._by_trace: dict[str, list[Watch]] = {}
        self._n = 0  # len() is O(1): collectors ask it on every cycle

    def add(self, w: Watch) -> None:
        self._by_trace.setdefault(w.trace_id, []).append(w)
        self._n += 1

    def discard(self, w: Watch) -> None:
        group = self._by_trace.get(w.trace_id)
        if group and w in group:
            group.remove(w)
            self._n -= 1
            if not group:
                del self._by_trace[w.trace_id]

    def get(self, trace_id: str) -> list[Watch]:
        return self._by_trace.get(trace_id, [])

    def in_text(self, text: str) -> list[Watch]:
        """Watches whose trace id appears anywhere in ``text`` (bodies, subjects, payloads)."""
        from tracer.probe import TRACE_ID

        found: list[Watch] = []
        for tid in set(TRACE_ID.findall(text.lower())):
            found.extend(self._by_trace.get(tid, ()))
        return found

    def __iter__(self):
        for group in list(self._by_trace.values()):
            yield from group

    def __len__(self) -> int:
        return self._n

    def trace_ids(self) -> list[str]:
        return list(self._by_trace)
