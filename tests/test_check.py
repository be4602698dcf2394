"""End to end over real sockets: sandbox funnel -> official posthog SDK -> local PostHog -> poller,
with spans decoded by a real OTLP receiver."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.otlp_receiver import OtlpReceiver
from tests.support import free_port, tmp_yaml
from tracer.engine import Engine, ProbeResult
from tracer.sandbox.runner import Sandbox
from tracer.spec import FunnelSpec, parse_spec

SPEC = """
service: sandbox-funnel
collectors:
  posthog:
    host: {posthog}
    project_id: "1"
    personal_api_key: phx_sandbox
    queries_per_minute: 6000
    queries_per_hour: 360000
    budget_share: 1.0
    min_interval: 200ms
    max_backoff: 1s
    timeout: 2s
steps:
  lead:
    spacing: 100ms
    inject:
      http:
        url: {funnel}/api/v1/leads
        json: {{name: "Canary {{probe_id}}", email: "canary+{{trace_id}}@example.com", metadata: {{canary_trace_id: "{{trace_id}}"}}}}
        timeout: 2s
    hops:
      - name: posthog_event
        target: {target}
        deadline: {deadline}
        posthog: {{event: lead_captured, property: email, match: contains, value: "canary+{{trace_id}}@"}}
"""


def spec_text(sb: Sandbox, target: str = "5s", deadline: str = "10s", funnel: str | None = None) -> str:
    return SPEC.format(posthog=sb.posthog_url, funnel=funnel or sb.url, target=target, deadline=deadline)


def load(text: str) -> FunnelSpec:
    import yaml

    return parse_spec(yaml.safe_load(text))


def run_engine(spec: FunnelSpec, samples: int) -> tuple[list[ProbeResult], Engine]:
    async def go() -> tuple[list[ProbeResult], Engine]:
        async with Engine(spec) as engine:
            return await engine.check(samples), engine

    return asyncio.run(go())


def cli_check(text: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tracer.cli", "check", "-c", str(tmp_yaml(text)), *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=120)


def test_lag_matches_ground_truth_and_spans_form_one_trace_per_probe(
    sb: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    delay, ingest = 0.4, 0.3
    sb.knobs.lead_delay, sb.posthog.ingest_delay = delay, ingest
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "canary-under-test")
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "canary.location=test-lab")
        results, _ = run_engine(load(spec_text(sb)), samples=3)
        time.sleep(0.2)
        spans = list(rx.spans)

    assert len(results) == 3
    for r in results:
        (hop,) = r.hops
        assert hop.verdict == "ok", hop
        assert hop.error_bar is not None and hop.error_bar < 1.0
        # Ground truth: the event cannot be visible before delay + ingest; the measured lag is an
        # upper bound that exceeds the truth by at most the error bar (plus SDK/HTTP overhead).
        assert delay + ingest <= hop.lag <= delay + ingest + hop.error_bar + 0.25, hop
        assert hop.sink_lag is not None and hop.sink_lag < hop.lag + 1.0

    by_trace: dict[str, list[dict]] = {}
    for s in spans:
        by_trace.setdefault(s["trace_id"], []).append(s)
    assert set(by_trace) == {r.probe.trace_id for r in results}  # one trace per probe, the probe's id
    events = {e["properties"].get("canary_trace_id"): e for e in sb.posthog.events()}
    for r in results:
        trace = by_trace[r.probe.trace_id]
        (root,) = [s for s in trace if not s["parent_span_id"]]
        (inject,) = [s for s in trace if s["name"] == "POST"]
        (hop_span,) = [s for s in trace if s["name"] == "hop posthog_event"]
        assert inject["parent_span_id"] == root["span_id"] and hop_span["parent_span_id"] == root["span_id"]
        assert inject["kind"] == 3  # SPAN_KIND_CLIENT
        assert inject["attributes"]["http.request.method"] == "POST"
        assert inject["attributes"]["http.response.status_code"] == 201
        attrs = hop_span["attributes"]
        assert attrs["funnel.step"] == "lead" and attrs["funnel.hop"] == "posthog_event"
        assert attrs["funnel.sink"] == "posthog" and attrs["funnel.verdict"] == "ok"
        assert attrs["funnel.target_s"] == 5.0 and attrs["funnel.synthetic"] is True
        assert attrs["funnel.lag_s"] == pytest.approx(r.hops[0].lag)
        assert attrs["funnel.error_bar_s"] == pytest.approx(r.hops[0].error_bar)
        assert root["resource"]["service.name"] == "canary-under-test"
        assert root["resource"]["canary.location"] == "test-lab"
        # The traceparent the funnel received is this trace and the injection span.
        tp = events[r.probe.trace_id]["properties"]["traceparent"]
        _, tid, parent, _ = tp.split("-")
        assert tid == r.probe.trace_id and parent == inject["span_id"]
        assert root["start"] <= inject["start"] and hop_span["end"] <= root["end"]


def test_drop_rate_one_is_lost_with_error_span_and_exit_1(
    sb: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb.knobs.drop_rate = 1.0
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        results, _ = run_engine(load(spec_text(sb, target="500ms", deadline="1500ms")), samples=2)
        time.sleep(0.2)
        spans = list(rx.spans)
    assert [r.hops[0].verdict for r in results] == ["lost", "lost"]
    for r in results:
        (hop_span,) = [s for s in spans if s["trace_id"] == r.probe.trace_id and s["name"].startswith("hop ")]
        assert hop_span["status_code"] == 2  # STATUS_CODE_ERROR
        # A lost hop's span ends at the deadline.
        assert (hop_span["end"] - hop_span["start"]) / 1e9 == pytest.approx(1.5, abs=0.01)

    proc = cli_check(spec_text(sb, target="500ms", deadline="1500ms"), "--samples", "2", "--format", "json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    hop = report["steps"][0]["hops"][0]
    assert report["ok"] is False and report["exit_code"] == 1
    assert hop["verdicts"]["lost"] == 2 and hop["samples"] == 2
    assert hop["lag_s"] == {"p50": None, "p95": None, "p99": None, "max": None}


@pytest.mark.parametrize(("status", "retry_after"), [(500, None), (429, 1.0), (503, None)])
def test_query_api_failing_is_unknown_never_lost(sb: Sandbox, status: int, retry_after: float | None) -> None:
    sb.posthog.query_fault, sb.posthog.retry_after = status, retry_after
    proc = cli_check(spec_text(sb, target="500ms", deadline="1s"), "--samples", "2", "--format", "json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    hop = json.loads(proc.stdout)["steps"][0]["hops"][0]
    assert hop["verdicts"]["unknown"] == 2 and hop["verdicts"]["lost"] == 0 and hop["verdicts"]["late"] == 0
    assert all("could not look" in p["reason"] for p in hop["probes"])


def test_cached_result_is_not_a_match(sb: Sandbox) -> None:
    sb.posthog.force_cached = True  # the events are there, but the answer says is_cached
    proc = cli_check(spec_text(sb, target="500ms", deadline="1s"), "--samples", "1", "--format", "json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    hop = json.loads(proc.stdout)["steps"][0]["hops"][0]
    assert hop["verdicts"]["ok"] == 0 and hop["verdicts"]["unknown"] == 1


def test_healthy_sandbox_exit_0_json_contract_and_junit(sb: Sandbox, tmp_path: Path) -> None:
    junit = tmp_path / "funnel.xml"
    # p50 at 80 % confidence: 3 probes all within target show it (0.5^3 <= 0.2).
    proc = cli_check(
        spec_text(sb),
        "--samples",
        "3",
        "--quantile",
        "0.5",
        "--confidence",
        "0.8",
        "--format",
        "json",
        "--junit",
        str(junit),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["exit_code"] == 0
    (step,) = report["steps"]
    (hop,) = step["hops"]
    assert step["step"] == "lead"
    assert {
        "hop",
        "sink",
        "target_s",
        "deadline_s",
        "error_bar_s",
        "samples",
        "verdicts",
        "lag_s",
        "probes",
    } <= set(hop)
    assert hop["verdicts"] == {"ok": 3, "late": 0, "lost": 0, "unknown": 0, "inject_failed": 0, "breach": 0}
    assert hop["lag_s"]["p50"] <= hop["lag_s"]["p95"] <= hop["lag_s"]["max"] < 5
    assert len(hop["probes"]) == 3 and all(len(p["trace_id"]) == 32 for p in hop["probes"])
    assert all({"trace_id", "verdict", "lag_s", "sink_lag_s"} <= set(p) for p in hop["probes"])
    case = ET.parse(junit).getroot().find("testsuite/testcase")
    assert case is not None and case.get("name") == "posthog_event" and case.find("failure") is None
    # No endpoint configured: nothing exported, and no export error spam.
    assert "Failed to export" not in proc.stderr and "Connection refused" not in proc.stderr


def test_injection_failure_is_inject_failed_not_a_breach(sb: Sandbox) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc = cli_check(spec_text(sb, funnel=dead), "--samples", "1", "--format", "json")
    assert proc.returncode == 3
    probe = json.loads(proc.stdout)["steps"][0]["hops"][0]["probes"][0]
    assert probe["verdict"] == "inject_failed" and "connection" in probe["reason"]

    # A funnel answering non-2xx: the status is in the report.
    proc = cli_check(
        spec_text(sb).replace("/api/v1/leads", "/api/v1/nope"), "--samples", "1", "--format", "json"
    )
    probe = json.loads(proc.stdout)["steps"][0]["hops"][0]["probes"][0]
    assert probe["verdict"] == "inject_failed" and probe["reason"] == "HTTP 404: Not Found"
    assert probe["evidence"]["injection"] == {"status": 404, "error": "HTTP 404", "response": "Not Found"}


def test_trace_links_only_when_a_tracing_backend_is_configured(sb: Sandbox) -> None:
    def links(env: dict[str, str]) -> list[str | None]:
        clean = {k: "" for k in ("JAEGER_UI_URL", "FUNNEL_TRACE_URL")}
        proc = cli_check(
            spec_text(sb),
            "-n",
            "3",
            "--quantile",
            "0.5",
            "--confidence",
            "0.8",
            "--format",
            "json",
            env={**clean, **env},
        )
        assert proc.returncode == 0, proc.stderr
        return [p.get("trace_url") for p in json.loads(proc.stdout)["steps"][0]["hops"][0]["probes"]]

    assert links({}) == [None] * 3
    with_backend = links({"JAEGER_UI_URL": "https://jaeger.internal"})
    assert len(with_backend) == 3
    assert all(u is not None and u.startswith("https://jaeger.internal/trace/") for u in with_backend)


def test_a_refusal_carries_the_funnels_answer_without_secrets(sb: Sandbox) -> None:
    """A 422 names the missing field; the report shows it, with the credentials we sent redacted."""
    text = spec_text(sb).replace(
        'json: {name: "Canary {probe_id}", email: "canary+{trace_id}@example.com", metadata: {canary_trace_id: "{trace_id}"}}',
        'json: {name: "no email here"}\n        headers: {Authorization: "Bearer tok_live_0123456789"}',
    )
    assert "no email here" in text
    proc = cli_check(text, "--samples", "1", "--format", "json")
    assert proc.returncode == 3, proc.stderr
    probe = json.loads(proc.stdout)["steps"][0]["hops"][0]["probes"][0]
    assert probe["verdict"] == "inject_failed"
    assert probe["reason"].startswith("HTTP 422: ") and "email is required" in probe["reason"]
    assert "tok_live_0123456789" not in proc.stdout + proc.stderr


def test_a_lost_hop_says_what_was_searched_for(sb: Sandbox) -> None:
    sb.knobs.drop_rate = 1.0  # the funnel never emits: a real outage
    # 2 of 2 lost disproves p95 <= target at 95 % (1 of 1 cannot).
    proc = cli_check(spec_text(sb, target="1s", deadline="2s"), "--samples", "2", "--format", "json")
    assert proc.returncode == 1, proc.stderr
    probe = json.loads(proc.stdout)["steps"][0]["hops"][0]["probes"][0]
    ev = probe["evidence"]
    assert probe["verdict"] == "lost" and probe["reason"].startswith("lost: not seen within the 2s deadline")
    searched = ev["searched"]
    assert searched["sink"] == "posthog" and searched["event"] == "lead_captured"
    assert searched["value"] == f"canary+{probe['trace_id']}@"  # as sent, templates filled in
    assert set(searched["window"]) == {"from", "to"} and ev["blind"] == []
    assert isinstance(ev["near_misses"], int)


def test_one_query_per_cycle_whatever_the_number_in_flight(sb: Sandbox) -> None:
    sb.knobs.lead_delay = 1.5  # keep many probes in flight at once
    spec = load(spec_text(sb).replace("spacing: 100ms", "spacing: 10ms"))
    before = sb.posthog.queries
    started = time.monotonic()
    results, engine = run_engine(spec, samples=30)
    elapsed = time.monotonic() - started
    queries = sb.posthog.queries - before
    interval = engine.collectors["posthog"].interval
    assert all(r.hops[0].verdict == "ok" for r in results)
    # 30 probes over ~2 s: one query per cycle, not one per probe.
    assert queries <= elapsed / interval + 2, (queries, elapsed, interval)
    assert queries < 30
