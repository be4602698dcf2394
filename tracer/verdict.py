"""The verdict stage: turn what a collector saw (and when it could see) into ok/late/lost/unknown.

The one rule that matters: never say ``late`` or ``lost`` about a window the collector could not
see. Lags are upper bounds (``Observation.at``) with a stated error bar; ``late`` needs the lower
bound past the target too. A lag interval that straddles the target is ``unknown``, whether the
straddle comes from the poll cadence or from a blind window: the tracer cannot tell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tracer import clock

if TYPE_CHECKING:
    from tracer.watch import Coverage, Observation

OK, LATE, LOST, UNKNOWN, INJECT_FAILED, BREACH = "ok", "late", "lost", "unknown", "inject_failed", "breach"
VERDICTS = (OK, LATE, LOST, UNKNOWN, INJECT_FAILED, BREACH)
FAILING = (LATE, LOST, BREACH)


@dataclass
class HopResult:
    step: str
    hop: str
    sink: str
    target: float
    deadline: float
    verdict: str
    start: float  # monotonic: what the lag is measured from (injection, or an earlier hop)
    end: float  # monotonic: observation, or when we gave up
    lag: float | None = None  # seconds, upper bound
    error_bar: float | None = None  # the true lag lies in [lag - error_bar, lag]
    sink_lag: float | None = None  # sink's own timestamp minus start (different clocks: indicative)
    reason: str | None = None
    after: str | None = None
    sources: dict[str, float] = field(default_factory=dict)  # lag as seen by each source (push/poll)
    detail: dict[str, object] = field(default_factory=dict)
    evidence: dict[str, Any] | None = None  # tracer.evidence.Evidence.to_json(), for verdicts that are not ok
    # unknown, yet seen: the lag lies in [lag - error_bar, lag], which straddles the target. A claim
    # counts it as over the target when proving a pass, and as within it when proving a fail.
    undecided: bool = False


def judge_present(
    obs: Observation | None, start: float, target: float, deadline: float, coverage: Coverage, certified: bool
) -> tuple[str, str | None]:
    """Verdict for a hop that should appear. ``certified``: a good look covered the deadline."""
    if obs is not None:
        lag, lag_lo = obs.at - start, obs.not_before - start
        blind = coverage.blind_start(start, obs.at)
        if blind is not None:
            lag_lo = min(lag_lo, blind - start)
        if lag <= target:
            return OK, None
        if lag_lo > deadline:
            return LOST, f"first seen {lag:.2f}s after start, past the {deadline:g}s deadline"
        if lag_lo > target:
            return LATE, (
                f"seen {lag:.2f}s after start (not before {max(lag_lo, 0):.2f}s), over the {target:g}s target"
            )
        between = (
            f"the true lag is between {max(lag_lo, 0):.2f}s and {lag:.2f}s, around the {target:g}s target"
        )
        if blind is not None:
            return UNKNOWN, (
                f"seen {lag:.2f}s after start, but the collector was blind for part of that window: {between}"
            )
        # The look before the one that saw it came in time, the one that saw it too late: the
        # cadence cannot tell which side of the target the event fell. Counting it as late would
        # let a coarse poll interval fail a funnel that meets its target.
        return UNKNOWN, f"seen {lag:.2f}s after start, between two looks: {between}; look more often to tell"
    if not certified:
        return UNKNOWN, "the collector could not look at the sink up to the deadline"
    if not coverage.retroactive and coverage.blind_start(start, start + deadline) is not None:
        return UNKNOWN, "not seen, but the collector was blind during part of the window"
    if coverage.missed_start(start, start + deadline) is not None:
        return UNKNOWN, "not seen, but something arrived in the window that the collector could not read"
    return LOST, f"not seen within the {deadline:g}s deadline"


def judge_absent(
    obs: Observation | None, start: float, deadline: float, coverage: Coverage, certified: bool
) -> tuple[str, str | None]:
    """Verdict for a negative probe: it must NOT appear (e.g. a mis-signed webhook)."""
    if obs is not None:
        return BREACH, f"appeared {obs.at - start:.2f}s after start but should have been rejected"
    if (
        not certified
        or (not coverage.retroactive and coverage.blind_start(start, start + deadline) is not None)
        or coverage.missed_start(start, start + deadline) is not None
    ):
        return UNKNOWN, "the collector could not watch the whole window, so absence is not proven"
    return OK, None


def sink_lag(obs: Observation | None, start: float) -> float | None:
    if obs is None or obs.sink_time is None:
        return None
    return obs.sink_time - clock.wall(start)
