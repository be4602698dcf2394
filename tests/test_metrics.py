"""Canary metrics: the same numbers through OTLP (a real receiver decoding the exporter's
protobuf) and through the Prometheus text of /metrics, served over a real socket."""

from __future__ import annotations

import asyncio

import pytest

from tests.canary_helpers import http_get, load, otlp_points, parse_prometheus, prom_value
from tests.otlp_receiver import OtlpReceiver
from tests.support import free_port
from tracer import clock
from tracer.engine import ProbeResult
from tracer.export.metrics import CanaryMetrics, lag_buckets, otlp_metric_exporter, render_prometheus
from tracer.export.spans import resource
from tracer.inject import Injection
from tracer.probe import Probe
from tracer.status import StatusServer
from tracer.verdict import HopResult
from tracer.watch import Coverage

pytestmark = pytest.mark.timeout(30)

SPEC = """
service: svc
collectors:
  posthog: {host: "http://127.0.0.1:9", project_id: "1", personal_api_key: phx_x, queries_per_minute: 240, queries_per_hour: 2400}
steps:
  lead:
    inject: {http: {url: "http://127.0.0.1:9/leads"}}
    hops:
      - {name: posthog_event, target: 5s, deadline: 30s, posthog: {event: lead_captured}}
      - {name: crm, target: 2m, posthog: {event: crm_synced}}
"""


def result(lags: dict[str, tuple[str, float | None]]) -> ProbeResult:
    probe = Probe(step="lead")
    now = clock.now()
    hops = [
        HopResult(
            step="lead",
            hop=name,
            sink="posthog",
            target=5.0 if name == "posthog_event" else 120.0,
            deadline=30.0,
            verdict=verdict,
            start=now,
            end=now,
            lag=lag,
        )
        for name, (verdict, lag) in lags.items()
    ]
    return ProbeResult(probe, Injection(now, now, ok=True, status=201), hops)


class StubPoller:
    """Just enough of a polling collector for the health snapshot: health() and coverage."""

    class Config:
        queries_per_minute, queries_per_hour = 240, 2400

    def __init__(self) -> None:
        self.config = self.Config()
        self.coverage = Coverage(retroactive=True)
        self.queries = 0
        self.up = True

    def health(self) -> dict[str, object]:
        return {"up": self.up, "queries": self.queries, "failed_queries": 1}


def test_lag_buckets_sit_around_the_target() -> None:
    b = lag_buckets(5.0, 30.0)
    assert b == sorted(b) and 5.0 in b and 30.0 in b
    near = [x for x in b if 2.5 <= x <= 10.0]
    assert len(near) >= 6  # dense around the target
    assert lag_buckets(0.3, 1.0)[0] == pytest.approx(0.03)


def test_otlp_and_prometheus_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load(SPEC)
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "60000")  # only the final export at shutdown
        m = CanaryMetrics(spec, resource({"canary.location": "lab"}), otlp_metric_exporter())
        m.zero_series()
        poller = StubPoller()
        poller.coverage.looked(clock.now())
        for _ in range(3):
            m.started("lead")
        m.resolved(result({"posthog_event": ("ok", 1.0), "crm": ("ok", 30.0)}))
        m.resolved(result({"posthog_event": ("late", 7.5), "crm": ("unknown", 200.0)}))
        m.skipped("lead", "step_cap")
        poller.queries = 13
        m.refresh({"posthog": poller}, None)
        text = m.prometheus()
        m.shutdown()
    samples = parse_prometheus(text)
    pe = {"step": "lead", "hop": "posthog_event", "sink": "posthog"}
    assert prom_value(samples, "funnel_probes_total", verdict="ok", **pe) == 1
    assert prom_value(samples, "funnel_probes_total", verdict="late", **pe) == 1
    assert prom_value(samples, "funnel_probes_total", verdict="lost", **pe) == 0  # zeroed series exist
    assert prom_value(samples, "funnel_probes_in_flight", step="lead") == 1
    assert prom_value(samples, "funnel_probes_started_total", step="lead") == 3
    assert prom_value(samples, "funnel_probes_skipped_total", step="lead", reason="step_cap") == 1
    # Per-hop buckets: the target is a bound; an unknown lag (200 s, an upper bound) is not recorded.
    assert prom_value(samples, "funnel_hop_lag_seconds_bucket", le="5.0", **pe) == 1
    assert prom_value(samples, "funnel_hop_lag_seconds_bucket", le="+Inf", **pe) == 2
    assert prom_value(samples, "funnel_hop_lag_seconds_sum", **pe) == 8.5
    crm = {"step": "lead", "hop": "crm", "sink": "posthog"}
    assert prom_value(samples, "funnel_hop_lag_seconds_count", **crm) == 1
    assert prom_value(samples, "funnel_hop_lag_seconds_bucket", le="120.0", **crm) == 1
    assert prom_value(samples, "funnel_collector_up", sink="posthog") == 1
    assert prom_value(samples, "funnel_collector_queries_total", sink="posthog", outcome="ok") == 12
    assert prom_value(
        samples, "funnel_collector_query_budget_used", sink="posthog", window="1m"
    ) == pytest.approx(0)
    last = prom_value(samples, "funnel_collector_last_success_timestamp_seconds", sink="posthog")
    assert abs(last - clock.wall(clock.now())) < 5
    assert prom_value(samples, "target_info", canary_location="lab") == 1

    # The OTLP export carries the same numbers.
    got = {(a["hop"], a["verdict"]): p.as_int for a, p in otlp_points(rx.metrics, "funnel.probes")}
    assert (
        got[("posthog_event", "ok")] == 1
        and got[("posthog_event", "late")] == 1
        and got[("crm", "unknown")] == 1
    )
    hist = {a["hop"]: p for a, p in otlp_points(rx.metrics, "funnel.hop.lag")}
    assert hist["posthog_event"].count == 2 and hist["posthog_event"].sum == 8.5
    assert 5.0 in list(hist["posthog_event"].explicit_bounds) and 120.0 in list(hist["crm"].explicit_bounds)
    ((_, up),) = otlp_points(rx.metrics, "funnel.collector.up")
    assert up.as_int == 1


def test_query_budget_counts_queries_in_the_window() -> None:
    m = CanaryMetrics(load(SPEC), resource())
    poller = StubPoller()
    m.refresh({"posthog": poller}, None)
    poller.queries = 120
    m.refresh({"posthog": poller}, None)
    samples = parse_prometheus(m.prometheus())
    assert prom_value(samples, "funnel_collector_query_budget_used", window="1m") == pytest.approx(0.5)
    assert prom_value(samples, "funnel_collector_query_budget_used", window="1h") == pytest.approx(0.05)
    poller.up = False
    m.refresh({"posthog": poller}, None)
    assert prom_value(parse_prometheus(m.prometheus()), "funnel_collector_up", sink="posthog") == 0


def test_label_values_are_escaped() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    provider.get_meter("t").create_counter("funnel.probes").add(1, {"step": 'a"b\\c\nd'})
    text = render_prometheus(reader.get_metrics_data(), resource())
    (sample,) = [s for s in parse_prometheus(text) if s[0] == "funnel_probes_total"]
    assert sample[1]["step"] == 'a\\"b\\\\c\\nd' and sample[2] == 1
    provider.shutdown()


def test_status_endpoint_healthz_and_metrics_over_http() -> None:
    state = {"ok": True}

    async def main() -> list[tuple[int, str]]:
        server = StatusServer(
            "127.0.0.1",
            free_port(),
            lambda: (state["ok"], {"collectors": {"x": {"up": state["ok"]}}}),
            lambda: "funnel_x 1\n",
        )
        await server.start()
        out = []
        for path in ("/healthz", "/metrics", "/nope"):
            out.append(await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}{path}"))
        state["ok"] = False
        out.append(await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/healthz"))
        # A client that never finishes its request does not hold the server.
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metr")
        out.append(await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/metrics"))
        writer.close()
        await server.close()
        return out

    healthy, metrics, missing, unhealthy, during_slow_client = asyncio.run(main())
    assert healthy[0] == 200 and '"up": true' in healthy[1]
    assert metrics == (200, "funnel_x 1\n") and missing[0] == 404
    assert unhealthy[0] == 503 and during_slow_client == (200, "funnel_x 1\n")
