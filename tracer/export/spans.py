"""OTLP spans: one trace per probe, using the standard SDK and its ``OTEL_*`` environment variables.

The probe's trace id is chosen before anything is sent (it is the needle collectors look for), so
a small ``IdGenerator`` hands it to the SDK for the probe's root span. Spans get explicit
timestamps derived from monotonic readings (``tracer.clock``), so a stepped wall clock cannot
bend them.

Export happens only when an endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); otherwise spans are still built (their ids go out in
``traceparent``) but dropped quietly, with no connection-refused spam.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

import tracer
from tracer import clock
from tracer.export import otlp
from tracer.verdict import FAILING, HopResult

_forced: contextvars.ContextVar[tuple[int | None, int | None]] = contextvars.ContextVar(
    "funnel_forced_ids", default=(None, None)
)


class ProbeIdGenerator(RandomIdGenerator):
    """Random ids, except where a probe has fixed them up front (its trace id, its root and
    injection span ids): see ``Probe``."""

    def generate_trace_id(self) -> int:
        return _forced.get()[0] or super().generate_trace_id()

    def generate_span_id(self) -> int:
        return _forced.get()[1] or super().generate_span_id()


@contextmanager
def forced_ids(trace_id_hex: str | None, span_id_hex: str | None) -> Iterator[None]:
    token = _forced.set(
        (int(trace_id_hex, 16) if trace_id_hex else None, int(span_id_hex, 16) if span_id_hex else None)
    )
    try:
        yield
    finally:
        _forced.reset(token)


def otlp_configured() -> bool:
    return otlp.configured("traces")


def otlp_span_exporter() -> SpanExporter:
    """The OTLP exporter for ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL``: ``http/protobuf`` (the
    spec's default) or ``grpc``. Endpoint, headers and TLS come from the exporter's own env vars."""
    if otlp.protocol("traces") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def resource(extra: dict[str, str] | None = None) -> Resource:
    """``service.name`` defaults to funnel-tracer; ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` override it, as in every OTel SDK; ``extra`` (explicit command-line
    options such as ``--location``) overrides both."""
    ours = Resource({"service.name": "funnel-tracer", "service.version": tracer.__version__})
    return Resource.create({}).merge(ours).merge(OTELResourceDetector().detect()).merge(Resource(extra or {}))


def make_provider(
    exporter: SpanExporter | None = None, extra_resource: dict[str, str] | None = None
) -> TracerProvider:
    with otlp.from_env("spans"):
        provider = TracerProvider(resource=resource(extra_resource), id_generator=ProbeIdGenerator())
        if exporter is None and otlp_configured():
            exporter = otlp_span_exporter()
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    return provider


def get_tracer(provider: TracerProvider) -> trace.Tracer:
    return provider.get_tracer("funnel-tracer", tracer.__version__)


if TYPE_CHECKING:
    from tracer.inject import Injection
    from tracer.probe import Probe


def emit_probe(
    tr: trace.Tracer, probe: Probe, injection: Injection, hops: list[HopResult], service: str
) -> None:
    """One trace per probe: a root span for the step, a CLIENT (or PRODUCER) child for the
    injection (one per request of a multi-request one), each with the very span id its request
    sent in ``traceparent``, and a child per hop from its start
    to its observation (or deadline). Built after the probe resolved, from its record alone."""
    common = {
        "funnel.step": probe.step,
        "funnel.probe_id": probe.probe_id,
        "funnel.synthetic": True,
        "funnel.service": service,
    }
    failing = [h for h in hops if h.verdict in FAILING]
    end = max([injection.done_at, *(h.end for h in hops)])
    with forced_ids(probe.trace_id, probe.root_span_id):
        root = tr.start_span(
            f"probe {probe.step}", start_time=clock.wall_ns(probe.created_at), attributes=common
        )
    root.set_attribute("funnel.verdict", failing[0].verdict if failing else _worst(hops))
    if failing:
        root.set_status(Status(StatusCode.ERROR, f"{len(failing)} hop(s) {failing[0].verdict}"))
    ctx = trace.set_span_in_context(root)

    requests = injection.requests or [injection]
    start = injection.start_index if injection.requests else 0
    for i, one in enumerate(requests):
        # The start request's span has the id its traceparent named (``inject_span_id``); in a
        # multi-request injection every request has its own (``Probe.request_span_id``).
        _inject_span(tr, one, ctx, common, probe.request_span_id(i, start))

    for r in hops:
        _hop_span(tr, r, ctx, common)
    root.end(end_time=clock.wall_ns(end))


def _inject_span(
    tr: trace.Tracer, injection: Injection, ctx: Context, common: dict[str, object], span_id: str
) -> None:
    kind = SpanKind.CLIENT if "http.request.method" in injection.attributes else SpanKind.PRODUCER
    name = str(injection.attributes.get("http.request.method") or "dlq inject")
    with forced_ids(None, span_id):
        span = tr.start_span(
            name,
            context=ctx,
            kind=kind,
            start_time=clock.wall_ns(injection.sent_at),
            attributes={**injection.attributes, **common},
        )
    if not injection.ok:
        span.set_status(Status(StatusCode.ERROR, injection.error))
    span.end(end_time=clock.wall_ns(injection.done_at))


def _hop_span(tr: trace.Tracer, r: HopResult, ctx: Context, common: dict[str, object]) -> None:
    attrs: dict[str, object] = {
        **common,
        "funnel.hop": r.hop,
        "funnel.sink": r.sink,
        "funnel.target_s": r.target,
        "funnel.deadline_s": r.deadline,
        "funnel.verdict": r.verdict,
    }
    optional = {
        "funnel.lag_s": r.lag,
        "funnel.error_bar_s": r.error_bar,
        "funnel.sink_lag_s": r.sink_lag,
        "funnel.after": r.after,
        "funnel.reason": r.reason,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    for source, lag in r.sources.items():
        attrs[f"funnel.lag_s.{source}"] = lag
    link = sink_link(r.detail)
    span = tr.start_span(
        f"hop {r.hop}",
        context=ctx,
        start_time=clock.wall_ns(r.start),
        attributes=attrs,
        links=[link] if link else None,
    )
    if r.verdict in FAILING:
        span.set_status(Status(StatusCode.ERROR, r.reason or r.verdict))
    span.end(end_time=clock.wall_ns(max(r.end, r.start)))


_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def sink_link(detail: dict[str, object]) -> Link | None:
    """A link from a hop span to the trace context the matched item carried, e.g. a PostHog
    event's ``traceparent`` property. Sinks like PostHog or email drop trace context, so this
    link is how the observation points back at the span that emitted it (which, for a funnel
    that started a trace of its own, lives in another trace)."""
    m = _TRACEPARENT.match(str(detail.get("traceparent") or "").strip().lower())
    if m is None or m.group(1) == "ff":
        return None
    trace_id, span_id = int(m.group(2), 16), int(m.group(3), 16)
    if not trace_id or not span_id:
        return None
    ctx = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(m.group(4), 16) & 1))
    attrs: dict[str, str] = {"funnel.link": "matched_item_context"}
    for key in ("uuid", "message_id"):  # the sink's own id of the item we matched
        if detail.get(key):
            attrs[f"funnel.matched.{key}"] = str(detail[key])
    return Link(ctx, attrs)


def _worst(hops: list[HopResult]) -> str:
    order = ["breach", "lost", "late", "unknown", "inject_failed", "ok"]
    return min((h.verdict for h in hops), key=order.index) if hops else "ok"
