"""A launch-review report in Markdown (``check --format markdown``), rendered from ``summarize``'s dict.

Sections: the overall verdict, one row per hop (verdict, p50/p95/max against the target, the
error bar, verdict counts), verdict totals, and the probes to look at, each with its trace link.
Paste it into a PR, an issue or a launch doc; GitHub renders it as is.
"""

from __future__ import annotations

from typing import Any

from tracer.durations import fmt_duration
from tracer.export.report import COUNTED, VERDICT_HEADLINE, flagged_probes, verdict_totals
from tracer.verdict import FAILING, INJECT_FAILED, OK, UNKNOWN

ICON = {"ok": "✅", "late": "⚠️", "lost": "❌", "breach": "🚨", "unknown": "❔", "inject_failed": "❔"}


def cell(text: object) -> str:
    """Text safe inside a table cell: no pipes, no line breaks, no stray markup."""
    out = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    for ch in "*`[]<>":
        out = out.replace(ch, "\\" + ch)
    return out


def vs_target(hop: dict[str, Any]) -> str:
    """How the hop's p95 compares with its target, in words."""
    p95, target = hop["lag_s"]["p95"], hop["target_s"]
    if hop["expect"] == "absent":
        return "must not appear"
    if p95 is None:
        return "no lag measured"
    if p95 <= target:
        return f"within ({p95 / target:.0%} of target)" if target else "within"
    return f"over by {fmt_duration(p95 - target)}"


def _error_bar(value: float | None) -> str:
    return "-" if value is None else "±" + fmt_duration(value)


def _trace(p: dict[str, Any]) -> str:
    tid = p["trace_id"] or "-"
    url = p.get("trace_url")
    return f"[`{tid}`]({url})" if url and url.startswith(("http://", "https://")) else f"`{tid}`"


def render_markdown(summary: dict[str, Any]) -> str:
    code = summary["exit_code"]
    word, meaning = VERDICT_HEADLINE.get(code, ("ERROR", f"exit {code}"))
    lines = [
        f"# Launch review: funnel freshness of {cell(summary['service'])}",
        "",
        f"**Verdict: {word}**: {meaning} (exit {code}).",
        "",
        f"Generated {summary.get('generated_at', '-')}. Lags are upper bounds, measured from the injection "
        "(or from the hop named in *after*); the true lag lies within the error bar below them.",
        "",
        "## Hops",
        "",
        "| Step | Hop | Sink | Verdict | n | p50 | p95 | max | Target | p95 vs target | Deadline | Error bar | Verdicts |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for step in summary["steps"]:
        for hop in step["hops"]:
            lag = hop["lag_s"]
            name = cell(hop["hop"]) + (f" (after {cell(hop['after'])})" if hop.get("after") else "")
            counts = ", ".join(f"{n} {v}" for v, n in hop["verdicts"].items() if n) or "-"
            lines.append(
                f"| {cell(step['step'])} | {name} | {cell(hop['sink'])} | {ICON.get(hop['verdict'], '')} "
                f"{hop['verdict'].upper()} | {hop['samples']} | {fmt_duration(lag['p50'])} | "
                f"{fmt_duration(lag['p95'])} | {fmt_duration(lag['max'])} | {fmt_duration(hop['target_s'])} | "
                f"{vs_target(hop)} | {fmt_duration(hop['deadline_s'])} | {_error_bar(hop['error_bar_s'])} | {counts} |"
            )
    totals = verdict_totals(summary)
    lines += ["", "## Verdict counts", "", "| Verdict | Probe hops |", "|---|---:|"]
    lines += [f"| {ICON[v]} {v} | {totals.get(v, 0)} |" for v in COUNTED]
    lines += _probe_section(
        "Failing probes",
        flagged_probes(summary, FAILING),
        "None: no hop was late or lost, and no negative probe appeared.",
    )
    unmeasured = flagged_probes(summary, (UNKNOWN, INJECT_FAILED))
    if unmeasured:
        lines += _probe_section("Probes that could not be measured", unmeasured, "")
    lines += ["", f"_{totals.get(OK, 0)} of {sum(totals.values())} probe hops ok._", ""]
    return "\n".join(lines)


def _probe_section(title: str, rows: list[tuple[str, str, dict[str, Any]]], empty: str) -> list[str]:
    out = ["", f"## {title}", ""]
    if not rows:
        return [*out, empty]
    out += ["| Step / hop | Trace | Verdict | Lag | Reason |", "|---|---|---|---:|---|"]
    for step, hop, p in rows:
        lag = fmt_duration(p.get("lag_s")) + (
            f" {_error_bar(p['error_bar_s'])}"
            if p.get("lag_s") is not None and p.get("error_bar_s") is not None
            else ""
        )
        out.append(
            f"| {cell(step)} / {cell(hop)} | {_trace(p)} | {ICON.get(p['verdict'], '')} {p['verdict']} | "
            f"{lag} | {cell(p.get('reason') or '')} |"
        )
    return out
