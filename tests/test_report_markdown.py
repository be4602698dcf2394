"""``check --format markdown`` (the launch-review report) and trace links in the table output,
from real checks against the sandbox: one hop whose events are all dropped (lost), one within target."""

from __future__ import annotations

import re

from tests.test_report_html import run_check, sandbox  # noqa: F401  (module-scoped sandbox fixture)
from tracer.sandbox.runner import Sandbox

STEPS = ("lead", "approval")


def table_rows(text: str, header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_markdown_launch_review(sandbox: Sandbox) -> None:  # noqa: F811
    proc = run_check(
        sandbox,
        "--samples",
        "2",
        "--format",
        "markdown",
        steps=STEPS,
        env={"JAEGER_UI_URL": "http://jaeger.test:16686/"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    md = proc.stdout
    assert md.startswith("# Launch review: funnel freshness of sandbox-funnel\n")
    assert "**Verdict: FAIL**: an objective was disproven" in md and "(exit 1)." in md

    hops = {r[0]: r for r in table_rows(md, "| Step | Hop |")}
    assert set(hops) == set(STEPS)
    lead, approval = hops["lead"], hops["approval"]
    # step, hop, sink, verdict, n, p50, p95, max, target, p95 vs target, deadline, error bar, verdicts
    assert lead[1:5] == ["posthog_event", "posthog", "❌ LOST", "2"]
    assert lead[5:9] == ["-", "-", "-", "500ms"] and lead[9] == "no lag measured" and lead[12] == "2 lost"
    assert approval[1:5] == ["requested_event", "posthog", "✅ OK", "2"] and approval[12] == "2 ok"
    assert approval[9].startswith("within (") and approval[8] == "5.00s"
    assert approval[11].startswith("±")

    counts = {r[0]: int(r[1]) for r in table_rows(md, "| Verdict | Probe hops |")}
    assert counts == {
        "✅ ok": 2,
        "⚠️ late": 0,
        "❌ lost": 2,
        "❔ unknown": 0,
        "❔ inject_failed": 0,
        "🚨 breach": 0,
    }

    failing = table_rows(md, "| Step / hop | Trace |")
    assert len(failing) == 2
    for row in failing:
        assert row[0] == "lead / posthog_event" and row[2] == "❌ lost"
        m = re.fullmatch(r"\[`([0-9a-f]{32})`\]\((\S+)\)", row[1])
        assert m is not None, row
        assert m.group(2) == f"http://jaeger.test:16686/trace/{m.group(1)}"
        assert "not seen within the 1s deadline" in row[4]
    assert "_2 of 4 probe hops ok._" in md


def test_table_links_failing_probes_to_their_traces(sandbox: Sandbox) -> None:  # noqa: F811
    proc = run_check(
        sandbox,
        "--samples",
        "2",
        "--trace-url",
        "https://tempo.example/explore?trace={trace_id}",
        steps=STEPS,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    links = re.findall(r"lead/posthog_event ([0-9a-f]{32}): lost: .*; trace: (\S+)", proc.stdout)
    assert len(links) == 2 and all(url == f"https://tempo.example/explore?trace={tid}" for tid, url in links)
    assert proc.stdout.count("https://tempo.example/") == 2  # only the failing probes get a link
