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
import os
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

import tracer

_next_trace_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("funnel_trace_id", default=None)


class ProbeIdGenerator(RandomIdGenerator):
    """Random ids, except a probe's root span takes the trace id the probe already carries."""

    def generate_trace_id(self) -> int:
        chosen = _next_trace_id.get()
        return chosen if chosen is not None else super().generate_trace_id()


@contextmanager
def trace_id_for_next_root(trace_id_hex: str) -> Iterator[None]:
    token = _next_trace_id.set(int(trace_id_hex, 16))
    try:
        yield
    finally:
        _next_trace_id.reset(token)


def otlp_configured() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def otlp_span_exporter() -> SpanExporter:
    """The OTLP exporter for ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL``: ``http/protobuf`` (the
    spec's default) or ``grpc``. Endpoint, headers and TLS come from the exporter's own env vars."""
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    ).lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def resource(extra: dict[str, str] | None = None) -> Resource:
    """``service.name`` defaults to funnel-tracer; ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` override, as in every OTel SDK."""
    base = {"service.name": "funnel-tracer", "service.version": tracer.__version__, **(extra or {})}
    return Resource.create(base)


def make_provider(exporter: SpanExporter | None = None, extra_resource: dict[str, str] | None = None) -> TracerProvider:
    provider = TracerProvider(resource=resource(extra_resource), id_generator=ProbeIdGenerator())
    if exporter is None and otlp_configured():
        exporter = otlp_span_exporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    return provider


def get_tracer(provider: TracerProvider) -> trace.Tracer:
    return provider.get_tracer("funnel-tracer", tracer.__version__)
