"""A launch-review report as one self-contained HTML file (``check --html FILE``).

Rendered from ``summarize``'s dict. No scripts, fonts, stylesheets or images are fetched: styles
are inline and each hop's plot is an inline SVG, so the file can be archived, mailed or attached
to a CI run and still open offline.

Per hop: the verdict, p50/p95/max against the target, the error bar, verdict counts, and a plot
of every probe's lag against the target and deadline lines. One marker per probe, colored by
verdict, carrying ``data-trace-id`` and linking to the probe's trace:

- a dot at the measured lag, with a whisker down the error bar (the true lag lies on it);
- a cross on the deadline line when the probe was never seen (lost, or an unseen negative probe);
- a hollow diamond at zero when the probe could not even be injected.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from tracer.durations import fmt_duration
from tracer.export.markdown import vs_target
from tracer.export.report import COUNTED, VERDICT_HEADLINE, flagged_probes, verdict_totals
from tracer.verdict import BREACH, FAILING, INJECT_FAILED, LATE, LOST, OK, UNKNOWN

COLOR = {
    OK: "#2e9e44",
    LATE: "#e08a00",
    LOST: "#d62728",
    BREACH: "#8b0000",
    UNKNOWN: "#8e5cc2",
    INJECT_FAILED: "#7f7f7f",
}
TARGET_COLOR, DEADLINE_COLOR = "#1f6fd1", "#d62728"
W, H = 760, 290
LEFT, RIGHT, TOP, BOTTOM = 64, 104, 18, 46

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:24px auto;
max-width:1000px;padding:0 16px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px}h3{font-size:16px;margin:0 0 8px}
.badge{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:600;letter-spacing:.03em}
.meta{color:#666}.hop{border:1px solid #ddd;border-radius:6px;padding:14px 16px;margin:14px 0}
table{border-collapse:collapse;margin:6px 0}th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:12px}
.legend{display:flex;flex-wrap:wrap;gap:14px;color:#444;font-size:12px;margin-top:4px}
.legend span{display:inline-flex;align-items:center;gap:4px}svg.plot{display:block;max-width:100%;height:auto}
svg.plot text{font:11px system-ui,sans-serif;fill:#555}a{color:#1f6fd1}
"""


def render_html(summary: dict[str, Any]) -> str:
    code = summary["exit_code"]
    word, meaning = VERDICT_HEADLINE.get(code, ("ERROR", f"exit {code}"))
    badge = {0: COLOR[OK], 1: COLOR[LOST], 3: COLOR[UNKNOWN]}.get(code, "#555")
    totals = verdict_totals(summary)
    counts = ", ".join(f"{n} {v}" for v, n in totals.items() if n) or "no probes"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Funnel freshness: {escape(summary['service'])}</title>",
        f"<style>{CSS}</style></head>",
        f'<body data-exit-code="{code}">',
        f"<h1>Launch review: funnel freshness of {escape(summary['service'])}</h1>",
        f'<p><span class="badge" id="verdict" style="background:{badge}">{word}</span> {escape(meaning)} '
        f"(exit {code}) · {escape(counts)}</p>",
        f'<p class="meta">Generated {escape(str(summary.get("generated_at", "-")))}. Lags are upper bounds, '
        "measured from the injection (or from the hop named in <em>after</em>); the true lag lies within "
        "the error bar below each.</p>",
    ]
    parts.append(_totals_table(totals))
    for step in summary["steps"]:
        parts.append(f"<h2>Step {escape(step['step'])}</h2>")
        parts += [_hop_section(step["step"], hop) for hop in step["hops"]]
    parts.append(
        _probe_table(
            "Failing probes",
            flagged_probes(summary, FAILING),
            "None: no hop was late or lost, and no negative probe appeared.",
        )
    )
    unmeasured = flagged_probes(summary, (UNKNOWN, INJECT_FAILED))
    if unmeasured:
        parts.append(_probe_table("Probes that could not be measured", unmeasured, ""))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(summary: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(summary))


# -- pieces ------------------------------------------------------------------------------------
def _totals_table(totals: dict[str, int]) -> str:
    cells = "".join(
        f'<td class="num"><span style="color:{COLOR[v]}">●</span> {escape(v)}: <b>{totals.get(v, 0)}</b></td>'
        for v in COUNTED
    )
    return f'<table class="totals" aria-label="verdict counts"><tr>{cells}</tr></table>'


def _hop_section(step: str, hop: dict[str, Any]) -> str:
    lag = hop["lag_s"]
    verdict = hop["verdict"]
    name = escape(hop["hop"]) + (
        f" <span class='meta'>(after {escape(hop['after'])})</span>" if hop.get("after") else ""
    )
    absent = " <span class='meta'>(must not appear)</span>" if hop["expect"] == "absent" else ""
    counts = ", ".join(f"{n} {escape(v)}" for v, n in hop["verdicts"].items() if n) or "-"
    bar = "-" if hop["error_bar_s"] is None else "±" + fmt_duration(hop["error_bar_s"])
    stats = (
        "<table><tr><th>verdict</th><th>sink</th><th class=num>n</th><th class=num>p50</th><th class=num>p95</th>"
        "<th class=num>max</th><th class=num>target</th><th>p95 vs target</th><th class=num>deadline</th>"
        "<th class=num>error bar</th><th>verdicts</th></tr>"
        f'<tr><td><span class="badge" style="background:{COLOR.get(verdict, "#555")}">{escape(verdict.upper())}</span></td>'
        f"<td>{escape(hop['sink'])}</td><td class=num>{hop['samples']}</td>"
        f"<td class=num>{fmt_duration(lag['p50'])}</td><td class=num>{fmt_duration(lag['p95'])}</td>"
        f"<td class=num>{fmt_duration(lag['max'])}</td><td class=num>{fmt_duration(hop['target_s'])}</td>"
        f"<td>{escape(vs_target(hop))}</td><td class=num>{fmt_duration(hop['deadline_s'])}</td>"
        f"<td class=num>{bar}</td><td>{counts}</td></tr></table>"
    )
    return (
        f'<section class="hop" data-step="{escape(step)}" data-hop="{escape(hop["hop"])}" '
        f'data-verdict="{escape(verdict)}" data-samples="{hop["samples"]}">'
        f"<h3>{escape(step)} / {name}{absent}</h3>{stats}{plot_svg(step, hop)}{_legend()}</section>"
    )


def _legend() -> str:
    items = [
        f'<span><svg width="12" height="12"><circle cx="6" cy="6" r="5" fill="{COLOR[v]}"/></svg>{v}</span>'
        for v in (OK, LATE, UNKNOWN, BREACH)
    ]
    items.append(
        f'<span><svg width="12" height="12"><path d="M2 2L10 10M10 2L2 10" stroke="{COLOR[LOST]}" '
        'stroke-width="2.5"/></svg>lost / not seen (at the deadline)</span>'
    )
    items.append(
        f'<span><svg width="12" height="12"><path d="M6 1L11 6L6 11L1 6Z" fill="#fff" '
        f'stroke="{COLOR[INJECT_FAILED]}" stroke-width="2"/></svg>inject failed (at zero)</span>'
    )
    items.append(
        f'<span><svg width="22" height="12"><line x1="0" y1="6" x2="22" y2="6" stroke="{TARGET_COLOR}" '
        'stroke-width="2" stroke-dasharray="5 3"/></svg>target</span>'
    )
    items.append(
        f'<span><svg width="22" height="12"><line x1="0" y1="6" x2="22" y2="6" stroke="{DEADLINE_COLOR}" '
        'stroke-width="1.5" stroke-dasharray="2 3"/></svg>deadline</span>'
    )
    return f'<div class="legend">{"".join(items)}</div>'


def _nice_step(span: float) -> float:
    raw = span / 5 if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def plot_svg(step: str, hop: dict[str, Any]) -> str:
    """Each probe's lag (y) in injection order (x), against the target and deadline lines."""
    probes = hop["probes"]
    target, deadline = float(hop["target_s"]), float(hop["deadline_s"])
    tops = [target, deadline] + [p["lag_s"] for p in probes if p.get("lag_s") is not None]
    y_max = max(tops) * 1.08 or 1.0
    tick = _nice_step(y_max)
    y_max = math.ceil(y_max / tick) * tick
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def y(v: float) -> float:
        return round(TOP + ph * (1 - min(max(v, 0.0), y_max) / y_max), 2)

    def x(i: int) -> float:
        return round(LEFT + (i + 0.5) * pw / max(len(probes), 1), 2)

    out = [
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
        f'role="img" aria-label="lag of each probe of {escape(step)}/{escape(hop["hop"])} against the '
        f'{fmt_duration(target)} target">',
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>',
    ]
    v = 0.0
    while v <= y_max + 1e-9:
        out.append(
            f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y(v)}" y2="{y(v)}" stroke="#eee"/>'
            f'<text x="{LEFT - 6}" y="{y(v) + 4}" text-anchor="end">{fmt_duration(v) if v else "0"}</text>'
        )
        v += tick
    out.append(
        f'<text x="{LEFT + pw / 2}" y="{H - 10}" text-anchor="middle">probe (in injection order, n={len(probes)})</text>'
    )
    out.append(
        f'<text x="14" y="{TOP + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {TOP + ph / 2})">lag</text>'
    )
    for i in range(len(probes)) if len(probes) <= 30 else ():
        out.append(f'<text x="{x(i)}" y="{TOP + ph + 15}" text-anchor="middle">{i + 1}</text>')
    out.append(
        f'<line class="deadline-line" data-seconds="{deadline}" x1="{LEFT}" x2="{LEFT + pw}" y1="{y(deadline)}" '
        f'y2="{y(deadline)}" stroke="{DEADLINE_COLOR}" stroke-width="1.5" stroke-dasharray="2 3"/>'
        f'<text x="{LEFT + pw + 6}" y="{y(deadline) + 4}" fill="{DEADLINE_COLOR}">deadline {fmt_duration(deadline)}</text>'
    )
    out.append(
        f'<line class="target-line" data-seconds="{target}" x1="{LEFT}" x2="{LEFT + pw}" y1="{y(target)}" '
        f'y2="{y(target)}" stroke="{TARGET_COLOR}" stroke-width="2" stroke-dasharray="6 4"/>'
        f'<text x="{LEFT + pw + 6}" y="{y(target) + 4}" fill="{TARGET_COLOR}">target {fmt_duration(target)}</text>'
    )
    for i, p in enumerate(probes):
        out.append(_marker(p, x(i), y, deadline))
    out.append("</svg>")
    return "".join(out)


def _marker(p: dict[str, Any], cx: float, y: Any, deadline: float) -> str:
    verdict = p["verdict"]
    color = COLOR.get(verdict, "#555")
    lag, bar = p.get("lag_s"), p.get("error_bar_s")
    if lag is not None:
        kind, at = "measured", lag
        whisker = (
            (
                f'<line x1="{cx}" x2="{cx}" y1="{y(max(lag - bar, 0))}" y2="{y(lag)}" stroke="{color}" '
                f'stroke-width="2" stroke-opacity=".45"/>'
            )
            if bar
            else ""
        )
        shape = (
            f'{whisker}<circle cx="{cx}" cy="{y(lag)}" r="5" fill="{color}" stroke="#fff" stroke-width="1"/>'
        )
        said = f"lag {fmt_duration(lag)}" + (f" (±{fmt_duration(bar)})" if bar else "")
    elif verdict == INJECT_FAILED:
        kind, at, cy = "not-sent", 0.0, y(0)
        shape = (
            f'<path d="M{cx} {cy - 6}L{cx + 6} {cy}L{cx} {cy + 6}L{cx - 6} {cy}Z" fill="#fff" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        said = "not injected"
    else:
        kind, at, cy = "not-seen", deadline, y(deadline)
        shape = (
            f'<path d="M{cx - 5} {cy - 5}L{cx + 5} {cy + 5}M{cx + 5} {cy - 5}L{cx - 5} {cy + 5}" '
            f'stroke="{color}" stroke-width="3" stroke-linecap="round"/>'
        )
        said = f"not seen by the {fmt_duration(deadline)} deadline"
    tid = escape(p["trace_id"] or "")
    title = f"{tid}: {verdict}, {said}" + (f": {p['reason']}" if p.get("reason") else "")
    g = (
        f'<g class="probe probe-{escape(verdict)}" data-trace-id="{tid}" data-verdict="{escape(verdict)}" '
        f'data-marker="{kind}" data-plotted-s="{at}"><title>{escape(title)}</title>{shape}</g>'
    )
    url = p.get("trace_url")
    if url and str(url).startswith(("http://", "https://")):
        return f'<a href="{escape(url)}" target="_blank" rel="noopener">{g}</a>'
    return g


def _probe_table(title: str, rows: list[tuple[str, str, dict[str, Any]]], empty: str) -> str:
    head = f"<h2>{escape(title)}</h2>"
    if not rows:
        return f'{head}<p class="meta">{escape(empty)}</p>'
    body = []
    for step, hop, p in rows:
        tid = escape(p["trace_id"] or "-")
        url = p.get("trace_url")
        trace = (
            f'<a href="{escape(url)}"><code>{tid}</code></a>'
            if url and str(url).startswith(("http://", "https://"))
            else f"<code>{tid}</code>"
        )
        lag = fmt_duration(p.get("lag_s"))
        body.append(
            f"<tr><td>{escape(step)} / {escape(hop)}</td><td>{trace}</td>"
            f'<td style="color:{COLOR.get(p["verdict"], "#555")}">{escape(p["verdict"])}</td>'
            f"<td class=num>{lag}</td><td>{escape(p.get('reason') or '')}</td></tr>"
        )
    return (
        f'{head}<table class="flagged"><tr><th>step / hop</th><th>trace</th><th>verdict</th>'
        f"<th class=num>lag</th><th>reason</th></tr>{''.join(body)}</table>"
    )
