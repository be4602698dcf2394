"""Trace context through the funnel: the sandbox continues the probe's ``traceparent``, so the
tracer's spans and the funnel's spans for one probe form one trace, decoded by a real OTLP receiver.

Two setups: the sandbox and the tracer as separate processes (``funnel-tracer sandbox`` +
``funnel-tracer check``, both configured by ``OTEL_EXPORTER_OTLP_ENDPOINT`` alone), and both in one
process (as ``demo`` runs them), where each must still report as itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from tests.otlp_receiver import OtlpReceiver
from tests.support import free_port, tmp_yaml, wait_port
from tracer.engine import Engine
from tracer.export.spans import sink_link
from tracer.sandbox.approvals import ApprovalSettings
from tracer.sandbox.runner import Sandbox
from tracer.spec import parse_spec

SERVER, CLIENT, PRODUCER = 2, 3, 4  # OTLP SpanKind values

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
    hops:
      - name: posthog_event
        target: 5s
        deadline: 10s
        posthog: {{event: lead_captured, property: canary_trace_id, value: "{{trace_id}}"}}
"""


def by_trace(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        out.setdefault(s["trace_id"], []).append(s)
    return out


def one(spans: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [
        s
        for s in spans
        if all((s["resource"]["service.name"] if k == "service" else s[k]) == v for k, v in match.items())
    ]
    assert len(found) == 1, (match, [(s["resource"]["service.name"], s["name"], s["kind"]) for s in spans])
    return found[0]


def assert_one_probe_trace(trace: list[dict[str, Any]], tracer_service: str) -> None:
    """The probe's whole story in one trace: tracer root -> injection -> funnel server span ->
    deferred emit -> PostHog capture -> the SDK's HTTP call; and the tracer's hop span linking
    back to the context the matched event carried."""
    root = one(trace, service=tracer_service, parent_span_id="")
    inject = one(trace, service=tracer_service, name="POST", kind=CLIENT)
    hop = one(trace, service=tracer_service, name="hop posthog_event")
    server = one(trace, service="sandbox-funnel", kind=SERVER)
    emit = one(trace, service="sandbox-funnel", name="emit lead_captured")
    capture = one(trace, service="sandbox-funnel", name="posthog.capture lead_captured")
    http_call = one(trace, service="sandbox-funnel", kind=CLIENT)

    assert inject["parent_span_id"] == root["span_id"] and hop["parent_span_id"] == root["span_id"]
    # The funnel continued the traceparent: its server span is a child of the injection span.
    assert server["name"] == "POST /api/v1/leads" and server["parent_span_id"] == inject["span_id"]
    assert server["attributes"]["http.status_code"] == 201
    # The background emit kept the request's context.
    assert emit["parent_span_id"] == server["span_id"]
    assert capture["kind"] == PRODUCER and capture["parent_span_id"] == emit["span_id"]
    assert http_call["parent_span_id"] == capture["span_id"]
    assert http_call["attributes"]["http.method"] == "POST"
    # PostHog drops trace context; the hop span links to what the matched event carried (its
    # traceparent property: this trace, the injection span), naming the event the funnel sent.
    assert hop["links"] == [(root["trace_id"], inject["span_id"])]
    (link_attrs,) = hop["link_attributes"]
    assert link_attrs["funnel.matched.uuid"] == capture["attributes"]["posthog.event_uuid"]
    assert len(trace) == 7, [(s["resource"]["service.name"], s["name"]) for s in trace]


def test_sandbox_and_tracer_processes_share_the_probe_trace(tmp_path: Any) -> None:
    port, posthog_port = free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "JAEGER_", "FUNNEL_"))}
    with OtlpReceiver() as rx:
        env = {**base_env, "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint}
        sandbox = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tracer.cli",
                "sandbox",
                "--port",
                str(port),
                "--posthog-port",
                str(posthog_port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_port(port, 20)
            wait_port(posthog_port, 20)
            spec = tmp_yaml(
                SPEC.format(posthog=f"http://127.0.0.1:{posthog_port}", funnel=f"http://127.0.0.1:{port}")
            )
            check = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tracer.cli",
                    "check",
                    "-c",
                    str(spec),
                    "--no-preflight",  # its HEAD would be a trace of its own in the funnel
                    "--samples",
                    "2",
                    "--quantile",  # p50 at 75 % confidence: two clean probes show it
                    "0.5",
                    "--confidence",
                    "0.75",
                    "--format",
                    "json",
                ],
                env={**env, "OTEL_SERVICE_NAME": "canary-under-test"},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert check.returncode == 0, check.stdout + check.stderr
        finally:
            sandbox.send_signal(signal.SIGTERM)  # its provider flushes on the way out
            _, err = sandbox.communicate(timeout=20)
        assert sandbox.returncode == 0, err
        spans = list(rx.spans)

    report = json.loads(check.stdout)
    probes = report["steps"][0]["hops"][0]["probes"]
    traces = by_trace(spans)
    # Nothing but the probes' traces: the funnel's idle work (PostHog SDK, pollers) records nothing.
    assert set(traces) == {p["trace_id"] for p in probes}
    for p in probes:
        assert_one_probe_trace(traces[p["trace_id"]], "canary-under-test")
    assert "Failed to export" not in err + check.stderr


class _Receiver:
    """An HTTP endpoint for the funnel's outgoing notifications (a Slack-style webhook)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.got = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                outer.got.set()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    yield r
    r.close()


def test_in_one_process_each_reports_as_itself_and_no_secret_reaches_a_span(
    receiver: _Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_path, hmac_secret = "hook-secret-3f9a1c", "hmac-secret-77d2e0"
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with OtlpReceiver() as rx:
        # As in `demo`: the tracer's OTEL_* env is the process's env; the sandbox gets an exporter.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "canary-under-test")
        with Sandbox(exporter=OTLPSpanExporter(endpoint=f"{rx.endpoint}/v1/traces")) as sb:
            sb.ctx.extra["approvals"] = ApprovalSettings(
                slack_url=receiver.url, secret_path=secret_path, hmac_secret=hmac_secret
            )
            spec = parse_spec(yaml.safe_load(SPEC.format(posthog=sb.posthog_url, funnel=sb.url)))

            async def go() -> list[Any]:
                async with Engine(spec) as engine:
                    return await engine.check(1)

            (result,) = asyncio.run(go())
            assert result.hops[0].verdict == "ok"
            resp = httpx.post(
                f"{sb.url}/api/v1/approvals",
                json={"resource": "plan:pro", "requester": "ann@example.com"},
                headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"},
            )
            assert resp.status_code == 201
            assert receiver.got.wait(10), "the funnel never sent its notification"
        spans = list(rx.spans)

    traces = by_trace(spans)
    assert set(traces) == {result.probe.trace_id, caller_trace}
    assert_one_probe_trace(traces[result.probe.trace_id], "canary-under-test")

    approval = traces[caller_trace]
    assert {s["resource"]["service.name"] for s in approval} == {"sandbox-funnel"}
    server = one(approval, kind=SERVER)
    assert server["name"] == "POST /api/v1/approvals" and server["parent_span_id"] == caller_span
    clients = [s for s in approval if s["kind"] == CLIENT]
    assert len(clients) == 2  # the notification (httpx) and the approval_requested event (requests)
    ids = {s["span_id"]: s for s in approval}
    for c in clients:  # every client span hangs off the request, however deep
        parent = c
        while parent["parent_span_id"] in ids:
            parent = ids[parent["parent_span_id"]]
        assert parent is server
    # The notification went to the secret path, and reached the receiver there ...
    assert receiver.paths == [f"/{secret_path}/services/T000/B000"]
    # ... but no span says so: URLs are cut to their origin, no headers or bodies recorded.
    port = receiver.server.server_address[1]
    assert {c["attributes"].get("http.url") for c in clients} == {f"http://127.0.0.1:{port}", sb.posthog_url}
    dump = json.dumps(spans, default=str)
    for secret in (secret_path, hmac_secret, "/services/T000", "phx_sandbox", sb.posthog.project_api_key):
        assert secret not in dump


def test_dlq_push_is_in_the_callers_trace_without_the_payload(redis_url: str) -> None:
    from tracer.sandbox.dlq import DlqWorker
    from tracer.sandbox.payments import PATH, PaymentSettings

    caller_trace, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    body = {
        "payment_id": "pay_secretive_1",
        "email": "payer@example.com",
        "status": "paid",
        "metadata": {"canary_trace_id": caller_trace},
    }
    with OtlpReceiver() as rx:
        with Sandbox(exporter=OTLPSpanExporter(endpoint=f"{rx.endpoint}/v1/traces")) as sb:
            sb.ctx.extra["payments"] = PaymentSettings(
                accept_unsigned=True, fail_rate=1.0
            )  # every delivery parks
            sb.ctx.extra["dlq"] = DlqWorker(redis_url)
            resp = httpx.post(
                sb.url + PATH, json=body, headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"}
            )
            assert resp.status_code == 202, resp.text
        spans = list(rx.spans)

    assert {s["trace_id"] for s in spans} == {caller_trace}
    server = one(spans, kind=SERVER)
    assert server["parent_span_id"] == caller_span
    (push,) = [s for s in spans if s["attributes"].get("db.system") == "redis"]
    assert push["kind"] == CLIENT and push["parent_span_id"] == server["span_id"]
    assert push["name"] == "LPUSH" and push["attributes"]["db.statement"] == "LPUSH ? ?"
    dump = json.dumps(spans, default=str)
    assert "pay_secretive_1" not in dump and "payer@example.com" not in dump


def test_library_spans_only_in_the_sandboxs_context_and_under_a_parent(redis_url: str) -> None:
    """requests/httpx/redis are patched process-wide; a span is recorded only where the sandbox
    activated its provider (its thread and what that spawns), and only under a parent span, so a
    DLQ worker's polling or the tracer's own Redis traffic in the same process records nothing."""
    import redis
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tracer.sandbox import telemetry

    telemetry.instrument_libraries()
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    other = TracerProvider()  # e.g. the tracer's own provider in the same process
    client = redis.Redis.from_url(redis_url)

    def run(activate: bool) -> None:
        if activate:
            telemetry.activate(provider)
        client.ping()  # no parent: not recorded
        with provider.get_tracer("t").start_as_current_span("sandbox work"):
            client.set("k", "v")  # recorded if activated
        with other.get_tracer("t").start_as_current_span("someone else's work"):
            client.get("k")  # recorded (into the sandbox's provider) only if activated

    for activate in (False, True):
        t = threading.Thread(target=run, args=(activate,))
        t.start()
        t.join()
    redis_spans = [s for s in exported.get_finished_spans() if s.attributes.get("db.system") == "redis"]
    assert sorted(s.name for s in redis_spans) == ["GET", "SET"]  # from the activated thread, under parents
    assert all(s.parent is not None for s in redis_spans)


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        (
            {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "uuid": "u-1"},
            (
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "00f067aa0ba902b7",
                {"funnel.link": "matched_item_context", "funnel.matched.uuid": "u-1"},
            ),
        ),
        (
            {"traceparent": " 00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-00 "},
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", {"funnel.link": "matched_item_context"}),
        ),
        ({"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"}, None),
        ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"}, None),
        ({"traceparent": "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}, None),
        ({"traceparent": "4bf92f3577b34da6a3ce929d0e0e4736"}, None),
        ({"uuid": "u-2"}, None),
    ],
)
def test_hop_link_from_the_matched_items_traceparent(detail: dict[str, Any], expected: Any) -> None:
    link = sink_link(detail)
    if expected is None:
        assert link is None
    else:
        assert link is not None
        got = (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}", dict(link.attributes or {}))
        assert got == expected and link.context.is_remote


DLQ_SPEC = """
service: sandbox-funnel
collectors:
  redis_dlq: {{url: "{redis}"}}
steps:
  dlq:
    inject:
      redis_dlq:
        url: "{redis}"
        key: dlq:webhooks
        entry: {{id: "{{uuid}}", queue: payments, attempt: 1, max_attempts: 3, created_at: "{{now_iso}}",
                 last_attempt_at: "{{now_iso}}", error: synthetic, trace: {{traceparent: "{{traceparent}}"}},
                 payload: {{id: "evt_{{probe_id}}", type: payment_paid,
                           data: {{id: "pay_{{probe_id}}", status: paid, amount: 1, currency: SAR,
                                   metadata: {{canary_trace_id: "{{trace_id}}"}}}}}}}}
    hops:
      - {{name: parked, target: 1s, redis_dlq: {{key: dlq:webhooks, processing_key: "dlq:webhooks:processing"}}}}
      - {{name: first_retry, after: parked, target: 5s, deadline: 10s,
          redis_dlq: {{key: dlq:webhooks, event: retry, processing_key: "dlq:webhooks:processing"}}}}
"""


def test_dlq_retry_joins_the_probe_trace(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A synthetic DLQ entry carries the probe's traceparent; the worker's retry continues it."""
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        exporter = OTLPSpanExporter(endpoint=f"{rx.endpoint}/v1/traces")
        with Sandbox(exporter=exporter, redis_url=redis_url, dlq_retry_interval=0.3):
            spec = parse_spec(yaml.safe_load(DLQ_SPEC.format(redis=redis_url)))

            async def go() -> list[Any]:
                async with Engine(spec) as engine:
                    return await engine.check(1)

            (result,) = asyncio.run(go())
        spans = list(rx.spans)
    assert [h.verdict for h in result.hops] == ["ok", "ok"]
    trace = by_trace(spans)[result.probe.trace_id]
    inject = one(trace, name="dlq inject", kind=PRODUCER)
    retry = one(trace, service="sandbox-funnel", name="dlq retry")
    assert retry["parent_span_id"] == inject["span_id"] and retry["attributes"]["dlq.attempt"] == 1
    capture = one(trace, service="sandbox-funnel", name="posthog.capture payment_succeeded")
    assert capture["parent_span_id"] == retry["span_id"]
