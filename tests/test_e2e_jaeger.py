"""End to end through the real trace backend: sandbox funnel + `funnel-tracer check` -> the real
OpenTelemetry Collector (otel-collector.yaml: tail sampling, span metrics) -> real Jaeger v2
(in-memory storage), asserted through Jaeger's query API and the Collector's Prometheus endpoint.

Marked `e2e` (run by `python -m pytest -m e2e`, which .ci/run does after deploy/build-binaries.sh);
under CI=true a missing binary fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from tests.e2e_stack import COLLECTOR_CONFIG, JAEGER_CONFIG, Collector, Jaeger, binary, validate, wait_for
from tests.support import tmp_yaml
from tracer.sandbox.runner import Sandbox

pytestmark = pytest.mark.e2e

TRACER_SERVICE = "funnel-tracer-e2e"
SLO_BOUNDS_S = (5.0, 10.0, 60.0, 300.0)
# The trace reaches Jaeger decision_wait_after_root_received (1 s) + batch timeout (1 s) after the
# root span is exported; the funnel's own spans follow the sandbox SDK's 5 s batch delay.
VISIBLE_WITHIN_S = 30.0

SPEC = """
service: sandbox-funnel
collectors:
  posthog: {{host: "{posthog}", project_id: "1", personal_api_key: phx_sandbox, queries_per_minute: 6000,
             queries_per_hour: 360000, budget_share: 1.0, min_interval: 200ms, timeout: 2s}}
steps:
  lead:
    spacing: 100ms
    inject:
      http:
        url: {funnel}/api/v1/leads
        json: {{email: "canary+{{trace_id}}@example.com", metadata: {{canary_trace_id: "{{trace_id}}"}}}}
        timeout: 2s
    hops:
      - name: posthog_event
        target: 2s
        deadline: 3s
        posthog: {{event: lead_captured, property: canary_trace_id, value: "{{trace_id}}"}}
"""


@pytest.fixture(scope="module")
def jaeger() -> Iterator[Jaeger]:
    j = Jaeger().start()
    yield j
    j.stop()


@pytest.fixture(scope="module")
def collector(jaeger: Jaeger) -> Iterator[Collector]:
    """Keeps every ok trace (share 100, as docker-compose.yml does)."""
    c = Collector(jaeger.otlp_grpc, ok_sampling_percent=100).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def strict_collector(jaeger: Jaeger) -> Iterator[Collector]:
    """Keeps no ok trace (share 0): only non-ok verdicts reach Jaeger."""
    c = Collector(jaeger.otlp_grpc, ok_sampling_percent=0).start()
    yield c
    c.stop()


def run_check(sb: Sandbox, collector: Collector, samples: int = 1) -> list[dict[str, Any]]:
    """`funnel-tracer check` as a user runs it, exporting to the collector; returns its probes."""
    spec = tmp_yaml(SPEC.format(posthog=sb.posthog_url, funnel=sb.url))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FUNNEL_"))}
    env |= {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.otlp_http,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": TRACER_SERVICE,
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracer.cli",
            "check",
            "-c",
            str(spec),
            "-n",
            str(samples),
            "--format",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    # These tests are about traces, not claims: 1 when a probe was lost (the lost tests), 3 when
    # every probe was ok but too few to prove an objective (inconclusive); never 2.
    assert out.returncode in (0, 1, 3), out.stdout + out.stderr
    assert "Failed to export" not in out.stderr, out.stderr
    return json.loads(out.stdout)["steps"][0]["hops"][0]["probes"]


def sandbox_for(collector: Collector) -> Sandbox:
    return Sandbox(exporter=OTLPSpanExporter(endpoint=f"{collector.otlp_http}/v1/traces"))


# -- Jaeger JSON helpers -----------------------------------------------------------------------


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {t["key"]: t["value"] for t in span.get("tags") or []}


def service(trace: dict[str, Any], span: dict[str, Any]) -> str:
    return trace["processes"][span["processID"]]["serviceName"]


def parent(span: dict[str, Any]) -> str | None:
    refs = [r for r in span.get("references") or [] if r["refType"] == "CHILD_OF"]
    return refs[0]["spanID"] if refs else None


def one(trace: dict[str, Any], svc: str, **match: Any) -> dict[str, Any]:
    def ok(s: dict[str, Any]) -> bool:
        t = tags(s)
        return service(trace, s) == svc and all(
            (s["operationName"] if k == "name" else t.get(k.replace("__", "."))) == v
            for k, v in match.items()
        )

    found = [s for s in trace["spans"] if ok(s)]
    summary = [(service(trace, s), s["operationName"], tags(s).get("span.kind")) for s in trace["spans"]]
    assert len(found) == 1, (svc, match, summary)
    return found[0]


def complete(jaeger: Jaeger, trace_id: str, services: set[str], min_spans: int) -> dict[str, Any] | None:
    """The trace once every expected service's spans are in (the funnel's batch comes later)."""
    t = jaeger.trace(trace_id)
    if t and {p["serviceName"] for p in t["processes"].values()} >= services and len(t["spans"]) >= min_spans:
        return t
    return None


# -- tests -------------------------------------------------------------------------------------


def test_real_binaries_accept_the_configs() -> None:
    """`otelcol validate` on the repo's config, with its defaults (the compose values)."""
    res = validate(COLLECTOR_CONFIG)
    assert res.returncode == 0, res.stdout + res.stderr
    jres = subprocess.run(
        [str(binary("jaeger")), "validate", "--config", str(JAEGER_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert jres.returncode == 0, jres.stdout + jres.stderr


def test_real_collector_refuses_a_renamed_component(tmp_path: Any) -> None:
    """The validate test above means something: the same binary refuses an unknown component."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(COLLECTOR_CONFIG.read_text().replace("tail_sampling", "tail_sampling_nope"))
    res = validate(bad)
    assert res.returncode != 0 and "tail_sampling_nope" in res.stdout + res.stderr


def test_ok_probe_trace_in_jaeger_has_every_span(jaeger: Jaeger, collector: Collector) -> None:
    with sandbox_for(collector) as sb:
        (probe,) = run_check(sb, collector)
    assert probe["verdict"] == "ok", probe
    # 3 tracer spans (root, injection, hop) + the funnel's server, emit, capture, HTTP-client spans.
    trace = wait_for(
        lambda: complete(jaeger, probe["trace_id"], {TRACER_SERVICE, "sandbox-funnel"}, 7), VISIBLE_WITHIN_S
    )
    assert trace, f"trace {probe['trace_id']} incomplete in Jaeger: {jaeger.trace(probe['trace_id'])}"

    root = one(trace, TRACER_SERVICE, name="probe lead")
    assert parent(root) is None and tags(root)["funnel.verdict"] == "ok"
    inject = one(trace, TRACER_SERVICE, name="POST", **{"span.kind": "client"})
    assert parent(inject) == root["spanID"]
    hop = one(trace, TRACER_SERVICE, name="hop posthog_event")
    assert parent(hop) == root["spanID"]
    ht = tags(hop)
    assert ht["funnel.hop"] == "posthog_event" and ht["funnel.verdict"] == "ok"
    assert ht["funnel.step"] == "lead" and ht["funnel.sink"] == "posthog"
    assert ht["funnel.target_s"] == 2.0 and ht["funnel.deadline_s"] == 3.0
    assert isinstance(ht["funnel.lag_s"], float) and "error" not in ht
    # The funnel continued the traceparent: its server span hangs off the injection span.
    server = one(trace, "sandbox-funnel", **{"span.kind": "server"})
    assert server["operationName"] == "POST /api/v1/leads" and parent(server) == inject["spanID"]
    emit = one(trace, "sandbox-funnel", name="emit lead_captured")
    assert parent(emit) == server["spanID"]
    # The hop span links back to the context the matched PostHog event carried.
    assert any(
        r["spanID"] == inject["spanID"] for r in hop.get("references") or [] if r["refType"] == "FOLLOWS_FROM"
    )
    # Jaeger's clock-skew adjuster (on in deploy/jaeger.yaml) found nothing to fix.
    warnings = [w for s in trace["spans"] for w in s.get("warnings") or []] + (trace.get("warnings") or [])
    assert not [w for w in warnings if "skew" in w.lower()], warnings


def test_lost_probe_kept_and_ok_probe_dropped_at_share_zero(
    jaeger: Jaeger, strict_collector: Collector
) -> None:
    """At ok share 0 the tail sampler keeps the lost probe (ERROR hop span) and drops the ok one;
    the lost trace arriving is also the proof that the sampler decided for this batch."""
    with sandbox_for(strict_collector) as sb:
        (ok,) = run_check(sb, strict_collector)
        sb.knobs.drop_rate = 1.0
        (lost,) = run_check(sb, strict_collector)
    assert ok["verdict"] == "ok" and lost["verdict"] == "lost", (ok, lost)
    trace = wait_for(lambda: complete(jaeger, lost["trace_id"], {TRACER_SERVICE}, 3), VISIBLE_WITHIN_S)
    assert trace, f"lost trace {lost['trace_id']} never reached Jaeger"
    hop = one(trace, TRACER_SERVICE, name="hop posthog_event")
    ht = tags(hop)
    assert ht["funnel.verdict"] == "lost" and ht.get("error") is True and ht["otel.status_code"] == "ERROR"
    assert tags(one(trace, TRACER_SERVICE, name="probe lead"))["funnel.verdict"] == "lost"
    # The funnel's server span for the lost lead is in the kept trace too (sampled-cache hit or
    # same decision): the story of a lost probe is whole.
    whole = wait_for(lambda: complete(jaeger, lost["trace_id"], {TRACER_SERVICE, "sandbox-funnel"}, 4), 15)
    assert whole, f"the funnel's spans of lost trace {lost['trace_id']} never reached Jaeger"
    assert one(whole, "sandbox-funnel", **{"span.kind": "server"})["operationName"] == "POST /api/v1/leads"
    # The ok probe finished first, so its decision (2 s after its root) came before the lost one's.
    assert jaeger.trace(ok["trace_id"]) is None, "an ok trace reached Jaeger at ok share 0"


def _histogram(text: str) -> dict[str, set[float]]:
    """{metric name: set of `le` bounds} for duration-histogram buckets of hop spans."""
    out: dict[str, set[float]] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w*duration\w*_bucket)\{(.*)\}\s", line)
        if m and 'funnel_hop="posthog_event"' in m.group(2):
            le = re.search(r'le="([^"]+)"', m.group(2))
            if le and le.group(1) != "+Inf":
                out.setdefault(m.group(1), set()).add(float(le.group(1)))
    return out


def test_span_metrics_histogram_has_slo_buckets(jaeger: Jaeger, collector: Collector) -> None:
    with sandbox_for(collector) as sb:
        run_check(sb, collector)
    # metrics_flush_interval is 15 s.
    hist = wait_for(lambda: _histogram(httpx.get(collector.prometheus_url, timeout=5).text), 40, 1.0)
    assert hist, httpx.get(collector.prometheus_url, timeout=5).text[:3000]
    ((name, bounds),) = hist.items()
    assert name == "traces_span_metrics_duration_seconds_bucket", name
    assert set(SLO_BOUNDS_S) <= bounds, sorted(bounds)
    # Exactly the configured bounds: the real connector parsed the `1s`-style list as seconds.
    cfg = yaml.safe_load(COLLECTOR_CONFIG.read_text())["connectors"]["span_metrics"]["histogram"]
    assert bounds == {float(b.rstrip("s")) for b in cfg["explicit"]["buckets"]}, sorted(bounds)
