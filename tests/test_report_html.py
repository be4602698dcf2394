"""The HTML launch-review report from a real check against the sandbox, opened in headless Chromium.

The check has a hop whose events are all dropped (``knobs.drop_rate``: lost, drawn at the
deadline), one within target and one over it (late), so every marker kind is on the page. The
screenshot is kept under ``test-artifacts/``; the assertions are on the DOM Chromium built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.support import tmp_yaml
from tracer.sandbox.approvals import ApprovalSettings
from tracer.sandbox.runner import Sandbox

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
EVENT_DELAY = 0.3  # the funnel emits approval_requested this long after the request: > 100ms target

SPEC = """
service: sandbox-funnel
collectors:
  posthog: {{host: "{posthog}", project_id: "1", personal_api_key: phx_sandbox, queries_per_minute: 6000,
             queries_per_hour: 360000, budget_share: 1.0, min_interval: 150ms, timeout: 2s}}
steps:
  lead:
    spacing: 50ms
    inject:
      http:
        url: {funnel}/api/v1/leads
        json: {{email: "canary+{{trace_id}}@example.com", metadata: {{canary_trace_id: "{{trace_id}}"}}}}
    hops:
      - {{name: posthog_event, target: 500ms, deadline: 1s,
          posthog: {{event: lead_captured, property: canary_trace_id, value: "{{trace_id}}"}}}}
  approval:
    spacing: 50ms
    inject:
      http:
        url: {funnel}/api/v1/approvals
        json: {{resource: "plan:pro", requester: "canary@example.com", metadata: {{canary_trace_id: "{{trace_id}}"}}}}
    hops:
      - {{name: requested_event, target: 5s, deadline: 8s,
          posthog: {{event: approval_requested, property: canary_trace_id, value: "{{trace_id}}"}}}}
  approval_tight:
    spacing: 50ms
    inject:
      http:
        url: {funnel}/api/v1/approvals
        json: {{resource: "plan:pro", requester: "canary@example.com", metadata: {{canary_trace_id: "{{trace_id}}"}}}}
    hops:
      - {{name: requested_event, target: 100ms, deadline: 4s,
          posthog: {{event: approval_requested, property: canary_trace_id, value: "{{trace_id}}"}}}}
"""


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        sb.knobs.drop_rate = 1.0  # every lead_captured is dropped: lost
        sb.ctx.extra["approvals"] = ApprovalSettings(
            event_delay=EVENT_DELAY
        )  # no notifications, just the event
        yield sb


def run_check(
    sb: Sandbox, *args: str, env: dict[str, str] | None = None, steps: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    spec = tmp_yaml(SPEC.format(posthog=sb.posthog_url, funnel=sb.url))
    step_args = [a for s in steps for a in ("--step", s)]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "JAEGER_", "FUNNEL_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tracer.cli", "check", "-c", str(spec), *step_args, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )


@pytest.fixture(scope="module")
def report(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    html = tmp_path_factory.mktemp("report") / "launch-review.html"
    proc = run_check(
        sandbox,
        "--samples",
        "3",
        "--format",
        "json",
        "--html",
        str(html),
        env={"JAEGER_UI_URL": "http://localhost:16686"},  # links only when a tracing backend is named
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return json.loads(proc.stdout), html


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    return exe


def run_chromium(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="ft-chromium-") as profile:
        cmd = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            *args,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


class Dom(HTMLParser):
    """The elements of a serialized DOM with their attributes and the hop section they sit in."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[dict[str, Any]] = []
        self._section: dict[str, Any] | None = None
        self._depth = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = {"tag": tag, **{k: v or "" for k, v in attrs}}
        if tag == "section" and "hop" in el.get("class", "").split():
            self._section, self._depth = el, 0
        if tag == "section" and self._section is not None:
            self._depth += 1
        el["section"] = self._section
        self.elements.append(el)

    def handle_endtag(self, tag: str) -> None:
        if tag == "section" and self._section is not None:
            self._depth -= 1
            if self._depth == 0:
                self._section = None

    def find(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.elements
            if (tag is None or e["tag"] == tag)
            and (cls is None or cls in e.get("class", "").split())
            and all(e.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


def marker_y(dom: Dom, marker: dict[str, Any]) -> float:
    """Where a marker is drawn: a dot's centre, or the centre of a cross / diamond."""
    i = dom.elements.index(marker)
    shape = next(e for e in dom.elements[i + 1 :] if e["tag"] in ("circle", "path"))
    if shape["tag"] == "circle":
        return float(shape["cy"])
    ys = [float(y) for y in re.findall(r"[-\d.]+ ([-\d.]+)", shape["d"])]
    return (min(ys) + max(ys)) / 2


def test_html_report_opens_in_chromium_with_one_marker_per_probe(report: tuple[dict[str, Any], Path]) -> None:
    summary, html = report
    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / "launch-review.png"
    png.unlink(missing_ok=True)
    shutil.copy(html, ARTIFACTS / "launch-review.html")
    run_chromium("--window-size=1100,2100", f"--screenshot={png}", html.as_uri())
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1100, 2100)

    dom = Dom(run_chromium("--dump-dom", html.as_uri()).stdout)
    assert dom.find("body")[0]["data-exit-code"] == "1"
    sections = dom.find("section", cls="hop")
    assert [(s["data-step"], s["data-verdict"]) for s in sections] == [
        ("lead", "lost"),
        ("approval", "ok"),
        ("approval_tight", "late"),
    ]
    hops = {step["step"]: step["hops"][0] for step in summary["steps"]}
    for section in sections:
        hop = hops[section["data-step"]]
        markers = [e for e in dom.find("g", cls="probe") if e["section"] is section]
        # One marker per probe, each naming its probe's trace and verdict, linked to the trace.
        assert (
            len(markers) == int(section["data-samples"]) == hop["samples"] >= 2
        )  # early stop may end a failing step after 2
        assert [(m["data-trace-id"], m["data-verdict"]) for m in markers] == [
            (p["trace_id"], p["verdict"]) for p in hop["probes"]
        ]
        links = [e["href"] for e in dom.find("a") if e["section"] is section]
        assert links == [p["trace_url"] for p in hop["probes"]]
        assert all(
            u == f"http://localhost:16686/trace/{p['trace_id']}"
            for u, p in zip(links, hop["probes"], strict=True)
        )
        (target,) = [e for e in dom.find("line", cls="target-line") if e["section"] is section]
        (deadline,) = [e for e in dom.find("line", cls="deadline-line") if e["section"] is section]
        assert float(target["data-seconds"]) == hop["target_s"]
        assert float(deadline["data-seconds"]) == hop["deadline_s"]
        target_y, deadline_y = float(target["y1"]), float(deadline["y1"])
        assert deadline_y < target_y  # SVG y grows downwards: the deadline is drawn above the target
        for m, p in zip(markers, hop["probes"], strict=True):
            y = marker_y(dom, m)
            if p["verdict"] == "lost":  # never seen: a cross on the deadline line
                assert m["data-marker"] == "not-seen" and y == pytest.approx(deadline_y)
            else:  # a dot at the measured lag: under the target line if ok, over it if late
                assert m["data-marker"] == "measured" and float(m["data-plotted-s"]) == p["lag_s"]
                assert (y > target_y) if p["verdict"] == "ok" else (deadline_y < y < target_y)
    # The failing probes' table links each lost and late probe's trace.
    flagged = {e["href"] for e in dom.find("a") if e["section"] is None}
    assert flagged == {p["trace_url"] for h in hops.values() for p in h["probes"] if p["verdict"] != "ok"}


def test_html_report_is_self_contained(report: tuple[dict[str, Any], Path]) -> None:
    text = report[1].read_text(encoding="utf-8")
    assert "<svg" in text and "<style>" in text
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(", text, re.I)
    # The only absolute URLs are trace links (<a href>) and the SVG namespace.
    urls = set(re.findall(r"""https?://[^"'\s<>)]+""", text))
    assert urls - {"http://www.w3.org/2000/svg"} == {
        p["trace_url"] for s in report[0]["steps"] for h in s["hops"] for p in h["probes"]
    }
