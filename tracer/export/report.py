"""Reports of a check: the JSON contract, a terminal table, JUnit XML, and the exit code.

Each hop carries a ``claim`` (``tracer.stats``): its objective (e.g. p95 within target with 95 %
confidence), the outcome ``pass`` / ``fail`` / ``inconclusive`` with the Clopper-Pearson bounds,
and a sentence saying it. Gauges (levels with thresholds) are reported beside the hops.

Exit codes: 0 every claim passes and every gauge is ok; 1 some claim fails (disproven, or a
negative probe appeared) or a gauge is over its threshold; 2 config or usage error (raised before
a report exists); 3 nothing failed but some claim is inconclusive (too few samples, too many
``unknown`` / ``inject_failed``) or a gauge could not be read.
"""

from __future__ import annotations

import math
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tracer import clock, stats
from tracer.durations import fmt_duration
from tracer.verdict import BREACH, FAILING, INJECT_FAILED, LATE, LOST, OK, UNKNOWN, HopResult

if TYPE_CHECKING:
    from rich.console import Console

    from tracer.engine import ProbeResult
    from tracer.gauges import Reading
    from tracer.spec import FunnelSpec, HopSpec

COUNTED = (OK, LATE, LOST, UNKNOWN, INJECT_FAILED, BREACH)
DEFAULT_JAEGER_UI_URL = "http://localhost:16686"
DEFAULT_TRACE_URL_HELP = (
    "$JAEGER_UI_URL/trace/{trace_id}; with only OTEL_EXPORTER_OTLP_ENDPOINT set: "
    + DEFAULT_JAEGER_UI_URL
    + "; neither: no links"
)


def default_trace_url() -> str | None:
    """The per-probe trace link template when none is given: Jaeger's UI at ``JAEGER_UI_URL``,
    or at its default address when spans are exported at all. No tracing backend configured: no
    links, since a link to a trace nobody stored is a dead end."""
    base = os.environ.get("JAEGER_UI_URL")
    if not base and (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        base = DEFAULT_JAEGER_UI_URL
    return base.rstrip("/") + "/trace/{trace_id}" if base else None


def trace_link(template: str | None, trace_id: str) -> str | None:
    """``template`` with ``{trace_id}`` filled in (no other placeholders are interpreted)."""
    return template.replace("{trace_id}", trace_id) if template and trace_id else None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: always a lag that was actually measured."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def rounded(x: float | None) -> float | None:
    """Seconds as reports print them: four decimals, None kept."""
    return None if x is None else round(x, 4)


def summarize(
    spec: FunnelSpec,
    results: Iterable[ProbeResult],
    trace_url: str | None = None,
    *,
    quantile: float | None = None,
    confidence: float | None = None,
    gauges: dict[str, list[Reading]] | None = None,
    planned: dict[str, int] | None = None,
) -> dict[str, Any]:
    results = list(results)
    by_hop: dict[tuple[str, str], list[HopResult]] = {}
    for res in results:
        for h in res.hops:
            by_hop.setdefault((h.step, h.hop), []).append(h)
    steps = []
    for step_name, step in spec.steps.items():
        hops = []
        for hop in step.hops:
            rows = by_hop.get((step_name, hop.name), [])
            # Upper bounds, undecided ones included (leaving out the borderline would flatter).
            lags = [h.lag for h in rows if h.lag is not None and (h.verdict in (OK, LATE) or h.undecided)]
            bars = [h.error_bar for h in rows if h.error_bar is not None and h.lag is not None]
            verdicts = {v: sum(1 for h in rows if h.verdict == v) for v in COUNTED}
            hops.append(
                {
                    "hop": hop.name,
                    "sink": hop.sink,
                    "expect": hop.expect,
                    "after": hop.after,
                    "target_s": hop.target,
                    "deadline_s": spec.deadline(hop),
                    "error_bar_s": rounded(max(bars)) if bars else None,
                    "samples": len(rows),
                    "verdicts": verdicts,
                    "verdict": _hop_verdict(verdicts),
                    "claim": claim_of(
                        hop,
                        verdicts,
                        quantile,
                        confidence,
                        (planned or {}).get(step_name),
                        undecided=sum(1 for h in rows if h.undecided),
                    ),
                    "lag_s": {
                        "p50": rounded(percentile(lags, 50)),
                        "p95": rounded(percentile(lags, 95)),
                        "p99": rounded(percentile(lags, 99)),
                        "max": rounded(max(lags) if lags else None),
                    },
                    "probes": [
                        _probe_row(h, res_trace, trace_url) for h, res_trace in _with_trace(rows, results)
                    ],
                }
            )
        entry: dict[str, Any] = {"step": step_name, "hops": hops}
        cleanup = _cleanup_summary(step_name, results)
        if cleanup is not None:
            entry["cleanup"] = cleanup
        steps.append(entry)
    gauge_rows = [gauge_row(name, spec.gauges[name], r) for name, r in (gauges or {}).items()]
    code = exit_code_of(steps, gauge_rows)
    return {
        "ok": code == 0,
        "exit_code": code,
        "service": spec.service,
        "steps": steps,
        "gauges": gauge_rows,
        "generated_at": clock.iso(time.time()),
    }


def _pct(x: float) -> str:
    """0.0495 -> '4.95 %', 1e-5 -> '0.001 %'."""
    return f"{x * 100:.3g} %"


def claim_of(
    hop: HopSpec,
    verdicts: dict[str, int],
    quantile: float | None = None,
    confidence: float | None = None,
    planned: int | None = None,
    undecided: int = 0,
) -> dict[str, Any]:
    """The hop's claim after these verdict counts, as numbers and as a sentence.

    ``unknown`` and ``inject_failed`` are evidence neither way: they are left out of n, except
    ``undecided`` unknowns (seen, lag interval straddling the target; see ``stats.judge``)."""
    obj = hop.objective_for(quantile, confidence)
    exceeded = verdicts.get(LATE, 0) + verdicts.get(LOST, 0) + verdicts.get(BREACH, 0)
    lost = verdicts.get(LOST, 0)
    ignored = verdicts.get(UNKNOWN, 0) - undecided + verdicts.get(INJECT_FAILED, 0)
    n = verdicts.get(OK, 0) + exceeded + undecided
    c = stats.judge(obj, n, exceeded, lost, ignored, undecided)
    return {
        "objective": {"quantile": obj.quantile, "confidence": obj.confidence, "max_loss": obj.max_loss},
        "outcome": c.outcome,
        "statement": _statement(hop, obj, c),
        "n": c.n,
        "within": c.n - c.exceeded - c.undecided,
        "exceeded": c.exceeded,
        "undecided": c.undecided,
        "lost": c.lost,
        "ignored": c.ignored,
        "needed": c.needed,
        "planned": planned,
        "exceed_upper": round(c.exceed_upper, 6),
        "exceed_lower": round(c.exceed_lower, 6),
        "loss_upper": round(c.loss_upper, 6),
        "loss_lower": round(c.loss_lower, 6),
    }


def _statement(hop: HopSpec, obj: stats.Objective, c: stats.Claim) -> str:
    conf = _pct(obj.confidence).replace(".0 %", " %")
    if hop.expect == "absent":
        what = f"rejected in at least {_pct(obj.quantile)} of attempts (and never accepted)"
        counts = f"{c.n - c.exceeded}/{c.n} rejected"
    else:
        what = f"{stats.quantile_name(obj.quantile)} ≤ {fmt_duration(hop.target)}"
        counts = f"{c.n - c.exceeded - c.undecided}/{c.n} within target"
        if c.undecided:
            counts += f" ({c.undecided} may be either side: seen between two looks around the target)"
    if obj.max_loss is not None:
        what += f", loss ≤ {_pct(obj.max_loss)}"
    if c.ignored:
        counts += f", {c.ignored} not counted (unknown or inject_failed)"
    bounds = f"P(over target) ≤ {_pct(c.exceed_upper)}, loss ≤ {_pct(c.loss_upper)} ({conf} upper bounds)"
    if c.outcome == stats.PASS:
        return f"{what} with {conf} confidence: {counts}; {bounds}"
    if c.outcome == stats.FAIL:
        why = (
            "a negative probe was accepted"
            if obj.strict and c.exceeded
            else f"P(over target) ≥ {_pct(c.exceed_lower)}"
            + (f", loss ≥ {_pct(c.loss_lower)}" if obj.max_loss is not None else "")
            + f" ({conf} lower bounds)"
        )
        return f"{what} disproven: {counts}; {why}"
    return f"{what} not shown at {conf} confidence: {counts}, {c.needed} needed with none over; {bounds}"


def gauge_row(name: str, gauge: Any, readings: list[Reading]) -> dict[str, Any]:
    """A gauge's readings and outcome: pass when every reading is below ``ok_below``, fail when
    one is not, inconclusive when some could not be read (and none failed)."""
    from tracer.gauges import OK as G_OK
    from tracer.gauges import UNKNOWN as G_UNKNOWN

    values = [r.value for r in readings if r.value is not None]
    states = [gauge.state(r.value) for r in readings]
    peak = max(values) if values else None
    if any(st not in (G_OK, G_UNKNOWN) for st in states):
        outcome = stats.FAIL
    elif G_UNKNOWN in states or not states:
        outcome = stats.INCONCLUSIVE
    else:
        outcome = stats.PASS
    alert = gauge.alert_above if gauge.alert_above is not None else gauge.ok_below
    shown = f"max {peak:g} over {len(values)} reading(s)" if peak is not None else "no reading"
    errors = [r.error for r in readings if r.error]
    statement = f"{name} < {gauge.ok_below:g} (alert above {alert:g}): {shown}"
    if errors:
        statement += f"; {len(errors)} reading(s) failed: {errors[0]}"
    return {
        "gauge": name,
        "kind": gauge.kind,
        "ok_below": gauge.ok_below,
        "alert_above": alert,
        "values": values,
        "max": peak,
        "state": gauge.state(peak) if peak is not None else G_UNKNOWN,
        "outcome": outcome,
        "statement": statement,
        "errors": errors,
    }


def _cleanup_summary(step_name: str, results: Iterable[ProbeResult]) -> dict[str, Any] | None:
    """What cleanup did after the step's probes (never part of a verdict): counts, and each
    failed action under its probe's trace id."""
    done = [(r.probe.trace_id, o) for r in results if r.probe.step == step_name for o in r.cleanup]
    if not done:
        return None
    failures = [
        {"trace_id": tid, "what": o.what, "error": o.error, "status": o.status} for tid, o in done if not o.ok
    ]
    removed = sum(o.removed or 0 for _, o in done)
    return {"actions": len(done), "failed": len(failures), "removed": removed, "failures": failures}


def _with_trace(rows: list[HopResult], results: Iterable[ProbeResult]) -> list[tuple[HopResult, str]]:
    owner = {id(h): r.probe.trace_id for r in results for h in r.hops}
    return [(h, owner.get(id(h), "")) for h in rows]


def _probe_row(h: HopResult, trace_id: str, trace_url: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "trace_id": trace_id,
        "verdict": h.verdict,
        "lag_s": rounded(h.lag),
        "sink_lag_s": rounded(h.sink_lag),
        "error_bar_s": rounded(h.error_bar) if h.lag is not None else None,  # nothing seen: no figure
    }
    if h.reason:
        row["reason"] = h.reason
    if h.evidence is not None:
        row["evidence"] = h.evidence
    if len(h.sources) > 1:
        row["lag_s_by_source"] = {k: rounded(v) for k, v in h.sources.items()}
    link = trace_link(trace_url, trace_id)
    if link:
        row["trace_url"] = link
    return row


VERDICT_HEADLINE = {
    0: ("PASS", "every claim shown (each hop's objective, with its confidence) and every gauge ok"),
    1: ("FAIL", "an objective was disproven, a negative probe appeared, or a gauge is over its threshold"),
    3: ("INCONCLUSIVE", "nothing failed, but some claims lack the evidence (too few or unmeasured samples)"),
}


def verdict_totals(summary: dict[str, Any]) -> dict[str, int]:
    """Probe-hop verdict counts over the whole check."""
    totals = {v: 0 for v in COUNTED}
    for step in summary["steps"]:
        for hop in step["hops"]:
            for v, n in hop["verdicts"].items():
                totals[v] = totals.get(v, 0) + n
    return totals


def flagged_probes(
    summary: dict[str, Any], verdicts: Iterable[str] = FAILING
) -> list[tuple[str, str, dict[str, Any]]]:
    """(step, hop, probe row) for every probe whose verdict is in ``verdicts``."""
    wanted = set(verdicts)
    return [
        (s["step"], h["hop"], p)
        for s in summary["steps"]
        for h in s["hops"]
        for p in h["probes"]
        if p["verdict"] in wanted
    ]


def _hop_verdict(verdicts: dict[str, int]) -> str:
    for v in (BREACH, LOST, LATE, UNKNOWN, INJECT_FAILED):
        if verdicts.get(v):
            return v
    return OK


def exit_code_of(steps: list[dict[str, Any]], gauges: list[dict[str, Any]] = ()) -> int:  # type: ignore[assignment]
    """From the claims (and gauges): 1 any fail, else 3 any inconclusive, else 0."""
    outcomes = [hop["claim"]["outcome"] for step in steps for hop in step["hops"]]
    outcomes += [g["outcome"] for g in gauges]
    if stats.FAIL in outcomes:
        return 1
    if stats.INCONCLUSIVE in outcomes:
        return 3
    return 0


_OUTCOME_STYLE = {stats.PASS: "green", stats.FAIL: "red", stats.INCONCLUSIVE: "magenta"}


_STYLE = {
    OK: "green",
    LATE: "yellow",
    LOST: "red",
    BREACH: "bold red",
    UNKNOWN: "magenta",
    INJECT_FAILED: "magenta",
}


def render_table(summary: dict[str, Any], console: Console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Funnel freshness: {summary['service']}", title_justify="left", header_style="bold")
    for col, justify in [
        ("step", "left"),
        ("hop", "left"),
        ("sink", "left"),
        ("n", "right"),
        ("p50", "right"),
        ("p95", "right"),
        ("max", "right"),
        ("target", "right"),
        ("± error", "right"),
        ("verdicts", "left"),
        ("claim", "left"),
    ]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for step in summary["steps"]:
        for hop in step["hops"]:
            lag = hop["lag_s"]
            counts = ", ".join(f"[{_STYLE[v]}]{n} {v}[/]" for v, n in hop["verdicts"].items() if n)
            name = hop["hop"] + (f" (after {hop['after']})" if hop["after"] else "")
            name += " (must not appear)" if hop["expect"] == "absent" else ""
            table.add_row(
                step["step"],
                name,
                hop["sink"],
                str(hop["samples"]),
                fmt_duration(lag["p50"]),
                fmt_duration(lag["p95"]),
                fmt_duration(lag["max"]),
                fmt_duration(hop["target_s"]),
                fmt_duration(hop["error_bar_s"]),
                counts or "-",
                _styled_outcome(hop["claim"]["outcome"]),
            )
    for g in summary.get("gauges", []):
        table.add_row(
            "gauge",
            g["gauge"],
            g["kind"],
            str(len(g["values"])),
            "",
            "",
            "-" if g["max"] is None else f"{g['max']:g}",
            f"<{g['ok_below']:g}",
            "",
            g["state"],
            _styled_outcome(g["outcome"]),
        )
    console.print(table)
    for step in summary["steps"]:
        for hop in step["hops"]:
            c = hop["claim"]
            console.print(
                f"  {_styled_outcome(c['outcome'])} {escape(step['step'])}/{escape(hop['hop'])}: {escape(c['statement'])}",
                highlight=False,
                soft_wrap=True,
            )
    for g in summary.get("gauges", []):
        console.print(
            f"  {_styled_outcome(g['outcome'])} gauge {escape(g['statement'])}",
            highlight=False,
            soft_wrap=True,
        )
    reasons = [
        (s["step"], h["hop"], p)
        for s in summary["steps"]
        for h in s["hops"]
        for p in h["probes"]
        if p.get("reason") or p["verdict"] in FAILING
    ]
    for step, hop, p in reasons[:10]:
        reason = p.get("reason") or ""
        said = reason if reason.startswith(f"{p['verdict']}: ") else f"{p['verdict']}: {reason}".rstrip(": ")
        line = f"  [dim]{step}/{hop} {p['trace_id']}:[/] {escape(said)}"
        if p["verdict"] in FAILING and p.get("trace_url"):
            line += f"[dim]; trace:[/] [link={p['trace_url']}]{p['trace_url']}[/link]"
        console.print(line, highlight=False, soft_wrap=True)
    if len(reasons) > 10:
        console.print(f"  [dim]... and {len(reasons) - 10} more (use --format json)[/]")
    word, meaning = VERDICT_HEADLINE[summary["exit_code"]]
    verdict = f"[{ {0: 'green', 1: 'red', 3: 'magenta'}[summary['exit_code']] }]{word}[/]: {meaning}"
    console.print(
        f"{verdict} (exit {summary['exit_code']}). Lags are upper bounds; '± error' is the widest error bar."
    )


def _figure(x: float | None) -> str:
    return "–" if x is None else f"{x:g}"


def _styled_outcome(outcome: str) -> str:
    return f"[{_OUTCOME_STYLE.get(outcome, 'white')}]{outcome.upper()}[/]"


def write_junit(summary: dict[str, Any], path: str) -> None:
    with open(path, "wb") as f:
        f.write(junit_xml(summary))


def junit_xml(summary: dict[str, Any]) -> bytes:
    """One testcase per hop (and per gauge), failing when its claim fails and skipped when the
    claim is inconclusive."""
    suites = ET.Element("testsuites", name=f"funnel-tracer: {summary['service']}")
    for step in summary["steps"]:
        suite = ET.SubElement(suites, "testsuite", name=step["step"], tests=str(len(step["hops"])))
        failures = skipped = 0
        for hop in step["hops"]:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"funnel.{step['step']}",
                name=hop["hop"],
                time=f"{hop['lag_s']['max'] or 0:.3f}",
            )
            counts = ", ".join(f"{n} {v}" for v, n in hop["verdicts"].items() if n)
            claim = hop["claim"]
            lag = {k: _figure(v) for k, v in hop["lag_s"].items()}
            text = (
                f"{claim['statement']}. target {hop['target_s']}s, p50 {lag['p50']}, "
                f"p95 {lag['p95']}, max {lag['max']}, error bar {_figure(hop['error_bar_s'])}s; {counts}"
            )
            reasons = list(dict.fromkeys(p["reason"] for p in hop["probes"] if p.get("reason")))
            if reasons:
                text += "\n" + "\n".join(reasons[:10])
            if claim["outcome"] == stats.FAIL:
                failures += 1
                ET.SubElement(
                    case, "failure", message=f"{claim['statement']} ({counts})", type=hop["verdict"]
                ).text = text
            elif claim["outcome"] == stats.INCONCLUSIVE:
                skipped += 1
                ET.SubElement(case, "skipped", message=f"inconclusive: {claim['statement']}")
            ET.SubElement(case, "system-out").text = text
        suite.set("failures", str(failures))
        suite.set("skipped", str(skipped))
    gauges = summary.get("gauges", [])
    if gauges:
        suite = ET.SubElement(suites, "testsuite", name="gauges", tests=str(len(gauges)))
        failures = sum(g["outcome"] == stats.FAIL for g in gauges)
        skipped = sum(g["outcome"] == stats.INCONCLUSIVE for g in gauges)
        for g in gauges:
            case = ET.SubElement(suite, "testcase", classname="funnel.gauges", name=g["gauge"], time="0")
            if g["outcome"] == stats.FAIL:
                ET.SubElement(case, "failure", message=g["statement"], type=g["state"])
            elif g["outcome"] == stats.INCONCLUSIVE:
                ET.SubElement(case, "skipped", message=f"inconclusive: {g['statement']}")
            ET.SubElement(case, "system-out").text = g["statement"]
        suite.set("failures", str(failures))
        suite.set("skipped", str(skipped))
    for el in suites.iter():  # reasons quote sinks and funnels: keep the XML well-formed
        if el.text:
            el.text = _xml_text(el.text)
        for k, v in el.attrib.items():
            el.set(k, _xml_text(v))
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """Characters XML 1.0 cannot carry (NUL, ESC, ...) replaced: ElementTree would write them
    as they are, and CI's JUnit parser would reject the whole file."""
    return _NOT_XML.sub("\ufffd", text)
