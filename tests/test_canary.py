"""The canary end to end, over real sockets: a `funnel-tracer canary` subprocess against the
sandbox funnel and its local PostHog, spans and metrics into a real OTLP receiver, alerts into a
real webhook, /healthz and /metrics scraped over HTTP. Time-compressed: 300 ms intervals."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.canary_helpers import (
    AlertSink,
    CanaryProcess,
    http_get,
    lead_spec_text,
    load,
    otlp_points,
    otlp_resource,
    parse_prometheus,
    prom_value,
)
from tests.otlp_receiver import OtlpReceiver
from tests.support import free_port, tmp_yaml
from tracer.canary import Canary
from tracer.engine import Engine, ProbeResult
from tracer.sandbox.runner import Sandbox

pytestmark = pytest.mark.timeout(90)


def test_canary_run_counts_verdicts_metrics_alerts_and_graceful_stop(sb: Sandbox) -> None:
    """Healthy -> every event dropped (drop_rate 1.0) -> healthy again, in one canary run."""
    sb.knobs.lead_delay = 0.2
    port = free_port()
    with OtlpReceiver() as rx, AlertSink() as alerts:
        extra = f"""
alerts:
  webhook_url: {alerts.url}
  format: json
  k: 3
  n: 5
  jaeger_url: http://jaeger.test:16686
  trace_url: "{{jaeger_url}}/trace/{{trace_id}}"
"""
        spec = tmp_yaml(lead_spec_text(sb.posthog_url, sb.url, canary_extra=extra))
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_SERVICE_NAME": "canary-under-test",
        }
        with CanaryProcess(spec, "--http-port", str(port), "--location", "test-lab", env=env) as canary:
            canary.wait_for(lambda: len(canary.probes()) >= 8, 15, "healthy probes")
            status, body = http_get(f"http://127.0.0.1:{port}/healthz")
            assert status == 200 and json.loads(body)["collectors"]["posthog"]["up"] is True

            sb.knobs.drop_rate = 1.0  # the funnel stops emitting: probes injected from now on are lost
            canary.wait_for(
                lambda: sum(p["verdict"] == "lost" for p in canary.probes()) >= 6, 20, "lost probes"
            )
            assert any(a["type"] == "incident" for a in alerts.posts), alerts.posts

            sb.knobs.drop_rate = 0.0
            canary.wait_for(lambda: any(a["type"] == "recovery" for a in alerts.posts), 20, "recovery alert")
            canary.wait_for(lambda: canary.probes()[-1]["verdict"] == "ok", 5, "an ok probe")

            status, text = http_get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200
            scrape = parse_prometheus(text)
            rc = canary.terminate()
        time.sleep(0.3)
        metric_requests = list(rx.metrics)
        spans = list(rx.spans)

    assert rc == 0, canary.stderr_tail()
    probes = canary.probes()
    stopped = canary.events("stopped")
    assert len(stopped) == 1
    counts = stopped[0]
    # Every probe injected was resolved and logged exactly once, none abandoned at shutdown.
    assert counts["started"] == counts["resolved"] == len(probes) and counts["abandoned"] == 0
    assert len({p["trace_id"] for p in probes}) == len(probes)
    verdicts = Counter(p["verdict"] for p in probes)
    assert set(verdicts) <= {"ok", "lost"}, verdicts  # the funnel was either healthy or dropping
    assert verdicts["lost"] >= 6 and verdicts["ok"] >= 10
    for p in probes:
        (hop,) = p["hops"]
        assert p["location"] == "test-lab" and hop["target_s"] == 1.5
        if hop["verdict"] == "ok":
            assert 0.2 <= hop["lag_s"] <= 0.2 + hop["error_bar_s"] + 0.3, hop
        else:
            assert hop["lag_s"] is None and "deadline" in hop["reason"]

    # Alerts: one incident for the breach, then one recovery, nothing else (no "blind" incident).
    assert [(a["type"], a["kind"]) for a in alerts.posts] == [("incident", "breach"), ("recovery", "breach")]
    incident, recovery = alerts.posts
    lost_ids = {p["trace_id"] for p in probes if p["verdict"] == "lost"}
    assert incident["step"] == "lead" and incident["hop"] == "posthog_event" and incident["target_s"] == 1.5
    assert incident["trace_id"] in lost_ids
    assert incident["trace_url"] == f"http://jaeger.test:16686/trace/{incident['trace_id']}"
    assert incident["rule"]["k"] == 3 and incident["rule"]["matching"] >= 3 and len(incident["lags_s"]) == 5
    assert recovery["rule"]["matching"] < 3 and recovery["verdicts"][-1] == "ok"
    assert incident["location"] == "test-lab"
    assert "s3cr3t-token" not in canary.stderr_tail(10_000)  # the webhook URL is a credential

    # /metrics, scraped before the stop: one consistent snapshot.
    labels = {"step": "lead", "hop": "posthog_event", "sink": "posthog"}
    ok_now = prom_value(scrape, "funnel_probes_total", verdict="ok", **labels)
    lost_now = prom_value(scrape, "funnel_probes_total", verdict="lost", **labels)
    assert ok_now >= 10 and lost_now >= 6
    assert prom_value(scrape, "funnel_hop_lag_seconds_count", **labels) == ok_now  # only ok lags recorded
    assert (
        prom_value(scrape, "funnel_hop_lag_seconds_bucket", le="1.5", **labels) == ok_now
    )  # all within target
    assert prom_value(scrape, "funnel_hop_lag_seconds_bucket", le="0.15", **labels) == 0  # none under 0.2 s
    assert prom_value(scrape, "funnel_collector_up", sink="posthog") == 1
    assert prom_value(scrape, "funnel_probes_skipped_total", step="lead") == 0
    assert 0 < prom_value(scrape, "funnel_collector_query_budget_used", sink="posthog", window="1m") < 1
    assert prom_value(scrape, "funnel_alerts_sent_total", type="incident", outcome="sent") == 1
    assert (
        prom_value(scrape, "target_info", canary_location="test-lab", service_name="canary-under-test") == 1
    )

    # OTLP metrics: the final export (at shutdown) equals what the log lines say, exactly.
    assert otlp_resource(metric_requests)["canary.location"] == "test-lab"
    by_verdict = {a["verdict"]: p.as_int for a, p in otlp_points(metric_requests, "funnel.probes")}
    assert by_verdict["ok"] == verdicts["ok"] and by_verdict["lost"] == verdicts["lost"]
    assert by_verdict["late"] == 0 and by_verdict["unknown"] == 0
    ((_, hist),) = otlp_points(metric_requests, "funnel.hop.lag")
    assert hist.count == verdicts["ok"] and 1.5 in list(hist.explicit_bounds)
    ((_, in_flight),) = otlp_points(metric_requests, "funnel.probes.in_flight")
    assert in_flight.as_int == 0
    ((_, started),) = otlp_points(metric_requests, "funnel.probes.started")
    assert started.as_int == len(probes)

    # One trace per probe, exported before exit (the SIGTERM flush included the last ones).
    roots = {s["trace_id"] for s in spans if not s["parent_span_id"]}
    assert {p["trace_id"] for p in probes} <= roots


def run_in_process(spec_text: str, scenario: Any, **kwargs: Any) -> tuple[Canary, list[ProbeResult]]:
    results: list[ProbeResult] = []

    async def main() -> Canary:
        canary = Canary(load(spec_text), http_port=None, on_result=results.append, **kwargs)
        await canary.start()
        try:
            await scenario(canary)
        finally:
            await canary.shutdown()
        return canary

    return asyncio.run(main()), results


def test_caps_skip_and_count_and_memory_ledger_reports_unfinished_as_unknown(sb: Sandbox) -> None:
    sb.knobs.lead_delay = 1.2  # each probe stays in flight >= 1.2 s; the interval is 100 ms
    text = lead_spec_text(
        sb.posthog_url,
        sb.url,
        interval="100ms",
        target="3s",
        deadline="6s",
        grace="300ms",
        canary_extra="max_in_flight_per_step: 3",
    )
    peak = 0

    async def scenario(canary: Canary) -> None:
        nonlocal peak
        for _ in range(40):  # 2 s
            peak = max(peak, canary.in_flight)
            await asyncio.sleep(0.05)
        assert canary.counts["skipped"] > 5
        assert canary.health()[0] is True

    canary, results = run_in_process(text, scenario)
    assert peak == 3  # the cap was reached and never exceeded
    text_metrics = parse_prometheus(canary.metrics.prometheus())
    assert (
        prom_value(text_metrics, "funnel_probes_skipped_total", step="lead", reason="step_cap")
        == canary.counts["skipped"]
    )
    # Stopped with a 300 ms grace while probes were in flight: reported, honestly, as unknown.
    assert canary.counts["started"] == len(results) and canary.counts["abandoned"] >= 1
    for r in results:
        (hop,) = r.hops
        assert hop.verdict in ("ok", "unknown"), hop
        if hop.verdict == "unknown":
            assert hop.reason == "the canary stopped before the deadline"


def test_a_stalled_loop_counts_every_slot_it_could_not_keep(sb: Sandbox) -> None:
    """A blocking call freezes the loop for 1.5 s (as a hostile mail parsed on the loop once
    did): the slots that passed are counted as skipped with reason ``stalled``, not dropped."""
    text = lead_spec_text(sb.posthog_url, sb.url, interval="200ms", target="3s", deadline="6s", grace="2s")

    async def scenario(canary: Canary) -> None:
        await asyncio.sleep(0.6)
        time.sleep(1.5)  # the real thing: nothing on this loop runs meanwhile
        await asyncio.sleep(0.6)

    canary, _ = run_in_process(text, scenario)
    stalled = canary.skipped_by_reason.get("stalled", 0)
    assert 5 <= stalled <= 8, canary.skipped_by_reason  # 1.5 s / 200 ms, give or take a slot
    samples = parse_prometheus(canary.metrics.prometheus())
    assert prom_value(samples, "funnel_probes_skipped_total", step="lead", reason="stalled") == stalled
    # Slots kept + slots counted as skipped cover the run: nothing silently dropped.
    assert canary.counts["started"] + canary.counts["skipped"] >= int(2.7 / 0.2) - 2


def test_global_cap_applies_across_steps(sb: Sandbox) -> None:
    sb.knobs.lead_delay = 1.0
    base = lead_spec_text(
        sb.posthog_url,
        sb.url,
        interval="100ms",
        target="3s",
        deadline="6s",
        grace="100ms",
        canary_extra="max_in_flight: 4",
    )
    spec = load(base)
    two_steps = spec.model_copy(update={"steps": {"lead": spec.steps["lead"], "lead_b": spec.steps["lead"]}})
    peak = 0
    results: list[ProbeResult] = []

    async def main() -> Canary:
        nonlocal peak
        canary = Canary(two_steps, http_port=None, on_result=results.append)
        await canary.start()
        try:
            for _ in range(30):
                peak = max(peak, canary.in_flight)
                await asyncio.sleep(0.05)
        finally:
            await canary.shutdown()
        return canary

    canary = asyncio.run(main())
    assert peak == 4
    skipped = parse_prometheus(canary.metrics.prometheus())
    assert prom_value(skipped, "funnel_probes_skipped_total", reason="global_cap") > 0


class _Recorder:
    """A funnel stand-in over a real socket that records the requests it receives."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append((dict(self.headers.items()), json.loads(body)))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def test_synthetic_marker_on_every_injection(sb: Sandbox) -> None:
    funnel = _Recorder()
    text = lead_spec_text(
        sb.posthog_url,
        funnel.url,
        target="300ms",
        deadline="600ms",
        canary_extra="synthetic: {property: metadata.synthetic, email_domain: example.com}",
    )

    async def go(spec_text: str) -> list[ProbeResult]:
        async with Engine(load(spec_text)) as engine:
            return await engine.check(2)

    asyncio.run(go(text))
    assert len(funnel.requests) == 2
    for headers, body in funnel.requests:
        assert headers["X-Synthetic"] == "true"
        assert body["metadata"]["synthetic"] is True and body["metadata"]["canary_trace_id"]
    funnel.server.shutdown()

    # The tracer capturing into PostHog itself: events are personless, and the hop still matches.
    capture = (
        text.replace(f"{funnel.url}/api/v1/leads", f"{sb.posthog_url}/i/v0/e/")
        .replace(
            'json: {name: "Canary {probe_id}", email: "canary+{trace_id}@example.com", metadata: {canary_trace_id: "{trace_id}"}}',
            'json: {api_key: phc_sandbox, event: lead_captured, distinct_id: "canary-{probe_id}", '
            'properties: {canary_trace_id: "{trace_id}"}}',
        )
        .replace("target: 300ms", "target: 2s")
        .replace("deadline: 600ms", "deadline: 4s")
    )
    results = asyncio.run(go(capture))
    assert [r.hops[0].verdict for r in results] == ["ok", "ok"]
    stored = {e["properties"].get("canary_trace_id"): e for e in sb.posthog.events()}
    for r in results:
        props = stored[r.probe.trace_id]["properties"]
        assert props["$process_person_profile"] is False and props["synthetic"] is True


def test_status_port_in_use_exits_2_before_injecting(sb: Sandbox) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        spec = tmp_yaml(lead_spec_text(sb.posthog_url, sb.url))
        before = len(sb.posthog.events())
        with CanaryProcess(spec, "--http-port", str(port)) as canary:
            rc = canary.proc.wait(30)
            canary._reader.join(5)
    assert rc == 2
    (failed,) = canary.events("start_failed")
    assert "address already in use" in failed["msg"]
    assert not canary.probes() and len(sb.posthog.events()) == before
