"""Reports of a check: the JSON contract, a terminal table, JUnit XML, and the exit code.

Exit codes: 0 every hop within target; 1 any hop late, lost or breach; 2 config or usage error
(raised before a report exists); 3 no breach seen but some hop unknown or inject_failed, i.e.
the tracer could not vouch for freshness.
"""

from __future__ import annotations

import math
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tracer import clock
from tracer.durations import fmt_duration
from tracer.verdict import BREACH, FAILING, INJECT_FAILED, LATE, LOST, OK, UNKNOWN, HopResult

if TYPE_CHECKING:
    from rich.console import Console

    from tracer.engine import ProbeResult
    from tracer.spec import FunnelSpec

COUNTED = (OK, LATE, LOST, UNKNOWN, INJECT_FAILED, BREACH)
DEFAULT_JAEGER_UI_URL = "http://localhost:16686"
DEFAULT_TRACE_URL_HELP = "$JAEGER_UI_URL/trace/{trace_id}; JAEGER_UI_URL unset: " + DEFAULT_JAEGER_UI_URL


def default_trace_url() -> str:
    """The per-probe trace link template when none is given: Jaeger's UI, ``JAEGER_UI_URL``."""
    base = os.environ.get("JAEGER_UI_URL") or DEFAULT_JAEGER_UI_URL
    return base.rstrip("/") + "/trace/{trace_id}"


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
    spec: FunnelSpec, results: Iterable[ProbeResult], trace_url: str | None = None
) -> dict[str, Any]:
    by_hop: dict[tuple[str, str], list[HopResult]] = {}
    for res in results:
        for h in res.hops:
            by_hop.setdefault((h.step, h.hop), []).append(h)
    steps = []
    for step_name, step in spec.steps.items():
        hops = []
        for hop in step.hops:
            rows = by_hop.get((step_name, hop.name), [])
            lags = [h.lag for h in rows if h.lag is not None and h.verdict in (OK, LATE)]
            bars = [h.error_bar for h in rows if h.error_bar is not None]
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
                    "lag_s": {
                        "p50": rounded(percentile(lags, 50)),
                        "p95": rounded(percentile(lags, 95)),
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
    code = exit_code_of(steps)
    return {
        "ok": code == 0,
        "exit_code": code,
        "service": spec.service,
        "steps": steps,
        "generated_at": clock.iso(time.time()),
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
        "error_bar_s": rounded(h.error_bar),
    }
    if h.reason:
        row["reason"] = h.reason
    if len(h.sources) > 1:
        row["lag_s_by_source"] = {k: rounded(v) for k, v in h.sources.items()}
    link = trace_link(trace_url, trace_id)
    if link:
        row["trace_url"] = link
    return row


VERDICT_HEADLINE = {
    0: ("PASS", "every hop within target"),
    1: ("FAIL", "freshness breached"),
    3: ("UNKNOWN", "no breach seen, but some hops could not be measured"),
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


def exit_code_of(steps: list[dict[str, Any]]) -> int:
    counts = {v: 0 for v in COUNTED}
    for step in steps:
        for hop in step["hops"]:
            for v, n in hop["verdicts"].items():
                counts[v] += n
    if any(counts[v] for v in FAILING):
        return 1
    if counts[UNKNOWN] or counts[INJECT_FAILED]:
        return 3
    return 0


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
        ("", "left"),
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
                f"[{_STYLE[hop['verdict']]}]{hop['verdict'].upper()}[/]",
            )
    console.print(table)
    reasons = [
        (s["step"], h["hop"], p)
        for s in summary["steps"]
        for h in s["hops"]
        for p in h["probes"]
        if p.get("reason") or p["verdict"] in FAILING
    ]
    for step, hop, p in reasons[:10]:
        line = f"  [dim]{step}/{hop} {p['trace_id']}:[/] {p['verdict']}" + (
            f": {escape(p['reason'])}" if p.get("reason") else ""
        )
        if p["verdict"] in FAILING and p.get("trace_url"):
            line += f"[dim]; trace:[/] [link={p['trace_url']}]{p['trace_url']}[/link]"
        console.print(line, highlight=False, soft_wrap=True)
    if len(reasons) > 10:
        console.print(f"  [dim]... and {len(reasons) - 10} more (use --format json)[/]")
    verdict = {
        0: "[green]PASS[/]: every hop within target",
        1: "[red]FAIL[/]: freshness breached",
        3: "[magenta]UNKNOWN[/]: no breach seen, but some hops could not be measured",
    }[summary["exit_code"]]
    console.print(
        f"{verdict} (exit {summary['exit_code']}). Lags are upper bounds; '± error' is the widest error bar."
    )


def write_junit(summary: dict[str, Any], path: str) -> None:
    """One testcase per hop, failing on late/lost/breach and skipped when it could not be measured."""
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
            text = (
                f"target {hop['target_s']}s, p50 {hop['lag_s']['p50']}, p95 {hop['lag_s']['p95']}, "
                f"max {hop['lag_s']['max']}, error bar {hop['error_bar_s']}s; {counts}"
            )
            if hop["verdict"] in FAILING:
                failures += 1
                ET.SubElement(
                    case, "failure", message=f"{hop['verdict']}: {counts}", type=hop["verdict"]
                ).text = text
            elif hop["verdict"] != OK:
                skipped += 1
                ET.SubElement(case, "skipped", message=f"could not measure: {counts}")
            ET.SubElement(case, "system-out").text = text
        suite.set("failures", str(failures))
        suite.set("skipped", str(skipped))
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)
