"""``explain``: what the DLQ held instead of the event a hop waited for, from what the looks
already recorded (the probe's trace state and the entries met in its keys). No Redis round trip.

The point is to tell a stalled retry worker (the entry still parked at attempt 1) from a
producer that never wrote (nothing with the trace id) from a wrong path (entries arrived, none
carried the id) from an entry that took another way (dead instead of resolved).
"""

from __future__ import annotations

from typing import Any

from collectors.redis_dlq.target import Target, Trace
from tracer import clock
from tracer.evidence import Evidence


def _iso(t: float | None) -> str | None:
    return None if t is None else clock.iso(clock.wall(t))


def explain(t: Target | None, tid: str, event: str, start: float, end: float, base: Evidence) -> Evidence:
    if t is None:
        base.summary = "no look at these keys was recorded"
        return base
    spec = t.spec
    others, lower_bound = t.others(tid, start, end)
    tr = t.traces.get(tid)
    meta_field = t.entries.meta_missing.get(tid)
    found: dict[str, Any] = {"other_entries": others}
    if lower_bound:
        found["other_entries_at_least"] = True
    clauses: list[str] = []
    hint: str | None = None
    wrong_event = 0
    if tr is None or tr.state is None:
        where = spec.key
        clauses.append(
            f"no entry carrying the trace id was seen in {where}"
            + (
                f"; {others} other entr{'y' if others == 1 else 'ies'} were there in the window"
                if others
                else ""
            )
        )
        if others and spec.trace_path:
            hint = f"Entries arrived without the trace id at {spec.trace_path}: check trace_path."
        elif others:
            hint = "Entries arrived, none carrying the trace id: check the key and that the entry keeps the trace id."
        else:
            hint = f"Nothing arrived in {where}: is the producer writing there (key, shape, Redis db)?"
    else:
        found["entry"] = _entry(tr)
        wrong_event = 1
        clause, hint = _where(tr, event, t)
        clauses.append(clause)
    if meta_field is not None:
        found["meta_missing"] = {"hash": spec.meta_hash, "field": meta_field}
        clauses.append(
            f"{spec.meta_hash} had no field {meta_field!r} for it, so its attempts were not readable"
        )
        hint = "Check meta_hash, meta_field and meta_id_path."
    base.near_misses = others + wrong_event
    base.found.update(found)
    base.summary = "; ".join(clauses)
    base.hint = hint
    return base


def _entry(tr: Trace) -> dict[str, Any]:
    hit = tr.hit
    out: dict[str, Any] = {
        "state": tr.state,
        "attempt": tr.attempt,
        "first_attempt_seen": tr.attempt0,
        "parked_since": _iso(tr.first_at),
        "last_seen": _iso(tr.last_at),
        "events_seen": sorted(tr.seen),
    }
    if tr.left_at is not None:
        out["left_dlq_at"] = _iso(tr.left_at)
    if hit is not None:
        out.update(key=hit.key, entry_id=hit.info.entry_id)
    if tr.lost:
        out["vanished"] = tr.lost  # why its absence proves nothing
        if tr.lost.startswith("Redis restarted"):
            out["redis_restarted"] = True
    return out


def _ago(at: float | None) -> str:
    return "?" if at is None else f"{max(0.0, clock.now() - at):.1f}s ago"


def _where(tr: Trace, event: str, t: Target) -> tuple[str, str | None]:
    """One clause on where the probe's entry was at the last look, and what to check."""
    spec = t.spec
    attempt = "?" if tr.attempt is None else tr.attempt
    if tr.lost and tr.state in ("parked", "gone"):
        # Gone, but not by anything a look can tell from a retry: say so, claim nothing.
        return (
            f"the entry was in {spec.key} at attempt {attempt} (last seen {_ago(tr.last_at)}), then "
            f"{tr.lost[:1].lower()}{tr.lost[1:]}: it is gone, and whether it was retried first is unknown",
            "Something other than the retry worker removed the DLQ's data: run the check again.",
        )
    if tr.state == "parked":
        timing = f"parked {_ago(tr.first_at)}, last seen {_ago(tr.last_at)}"
        if "retry" not in tr.seen:
            return (
                f"the entry is still parked at attempt {attempt} ({timing}): no retry happened",
                "Is the retry worker running?",
            )
        return (
            f"the entry was retried and is parked again at attempt {attempt} ({timing}): not {event} yet",
            "The retries are failing: check the worker's log for the error.",
        )
    if tr.state == "processing":
        return (
            f"the entry was taken into {spec.processing_key} {_ago(tr.left_at)} at attempt {attempt} "
            f"and is still there (last seen {_ago(tr.last_at)})",
            "The worker claimed it but did not finish: is it stuck or did it crash mid-retry?",
        )
    if tr.state == "dead":
        straight = "retry" not in tr.seen or (tr.attempt0 is not None and tr.attempt == tr.attempt0)
        how = "went straight to" if straight else "ended in"
        return (
            f"the entry {how} the dead key {spec.dead_key} at attempt {attempt} ({_ago(tr.last_at)})",
            None if event == "dead" else "Every retry failed: check the worker's log for the error.",
        )
    # gone: left the DLQ key, seen nowhere else
    if "retry" not in tr.seen:
        return (
            f"the entry was removed {_ago(tr.left_at)} at attempt {attempt} without any retry being seen",
            None,
        )
    where = " or ".join(k for k in (spec.processing_key, spec.dead_key) if k)
    return (
        f"the entry left {spec.key} {_ago(tr.left_at)} at attempt {attempt}"
        + (f" and was not seen in {where}" if where else "")
        + f"; no {event} was seen",
        None if where else f"Event '{event}' needs dead_key (and processing_key) to be set.",
    )
