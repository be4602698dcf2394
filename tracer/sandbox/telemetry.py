"""OpenTelemetry for the reference funnel: it continues the caller's ``traceparent``.

One probe's trace then shows the tracer's injection, the funnel's request handling (ASGI server
span), the deferred PostHog emit and the SDK's HTTP call, Redis commands (DLQ push and retry) and
the tracer's observation of each hop, on one timeline.

The sandbox has its OWN ``TracerProvider`` (``service.name=sandbox-funnel``), never the global
one: the demo and the tests run the sandbox and the tracer in one process, and each must report
as itself. It exports over OTLP only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_...``)
is set, or to an exporter handed to ``Sandbox(exporter=...)``.

Library instrumentation (``requests`` under the PostHog SDK, ``httpx``, ``redis``) patches classes
process-wide, so it is installed once with a *routing* tracer provider: a span is recorded only

- in the sandbox's thread or a task/thread it spawned (a context variable names the sandbox's
  provider there; ``asyncio`` tasks and ``asyncio.to_thread`` copy it), and
- under a parent span (a request, an emit, a DLQ retry), so idle polling does not litter the
  trace backend with one-span traces.

The tracer's own HTTP/Redis traffic in the same process therefore records nothing and keeps the
``traceparent`` it set itself.

Secrets: URLs recorded by the HTTP client instrumentations are cut to scheme://host:port (webhook
URLs such as Slack's carry their secret in the path); Redis statements are sanitized by the
instrumentation (``LPUSH ? ?``); no headers or bodies are recorded.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import INVALID_SPAN, NonRecordingSpan, SpanKind
from posthog import Posthog

SERVICE_NAME = "sandbox-funnel"

_active: contextvars.ContextVar[TracerProvider | None] = contextvars.ContextVar(
    "sandbox_tracer_provider", default=None
)
_instrumented = False
_instrument_lock = threading.Lock()


def make_provider(exporter: SpanExporter | None = None) -> TracerProvider | None:
    """The sandbox's provider, or ``None`` when there is nowhere to send spans."""
    from tracer.export.spans import otlp_configured, otlp_span_exporter

    if exporter is None and otlp_configured():
        exporter = otlp_span_exporter()
    if exporter is None:
        return None
    # OTEL_RESOURCE_ATTRIBUTES (deployment.environment, ...) apply; service.name stays ours even
    # when OTEL_SERVICE_NAME names the tracer sharing this process.
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    return provider


def activate(provider: TracerProvider | None) -> contextvars.Token[TracerProvider | None]:
    """Route instrumented-library spans made in this context (and tasks/threads it spawns) to
    ``provider``. Call at the top of the sandbox's thread."""
    return _active.set(provider)


# -- routing tracer ------------------------------------------------------------------------------
class _RoutingTracer(trace.Tracer):
    def __init__(self, name: str, version: str | None, schema_url: str | None) -> None:
        self._scope = (name, version, schema_url)

    def start_span(  # type: ignore[override]
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        provider = _active.get()
        if provider is None or not parent.is_valid:
            return NonRecordingSpan(parent) if parent.is_valid else INVALID_SPAN
        name_, version, schema_url = self._scope
        real = provider.get_tracer(name_, version, schema_url)
        return real.start_span(
            name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
        )

    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(
            name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
        )
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as s:
            yield s


class _RoutingTracerProvider(trace.TracerProvider):
    def get_tracer(  # type: ignore[override]
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Any = None,
    ) -> trace.Tracer:
        return _RoutingTracer(instrumenting_module_name, instrumenting_library_version, schema_url)


ROUTER = _RoutingTracerProvider()
tracer = ROUTER.get_tracer("sandbox.funnel")
"""The funnel's own tracer: records into the active sandbox's provider, under a parent span."""


# -- library instrumentation ----------------------------------------------------------------------
def _origin(url: Any) -> str:
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _redact(span: trace.Span, url: Any) -> None:
    if span.is_recording():
        recorded = getattr(span, "attributes", None) or {}
        for key in ("url.full", "http.url"):
            if key in recorded:
                span.set_attribute(key, _origin(url))


def _httpx_hook(span: trace.Span, request: Any) -> None:
    _redact(span, request.url)


async def _httpx_async_hook(span: trace.Span, request: Any) -> None:
    _httpx_hook(span, request)


def _requests_hook(span: trace.Span, request: Any) -> None:
    _redact(span, request.url)


def instrument_libraries() -> None:
    """Patch requests (PostHog SDK), httpx (notifications) and redis (DLQ), once per process."""
    global _instrumented
    with _instrument_lock:
        if _instrumented:
            return
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        from opentelemetry.instrumentation.redis import RedisInstrumentor
        from opentelemetry.instrumentation.requests import RequestsInstrumentor

        RequestsInstrumentor().instrument(tracer_provider=ROUTER, request_hook=_requests_hook)
        HTTPXClientInstrumentor().instrument(
            tracer_provider=ROUTER, request_hook=_httpx_hook, async_request_hook=_httpx_async_hook
        )
        RedisInstrumentor().instrument(tracer_provider=ROUTER)
        _instrumented = True


def wrap_asgi(app: Any, provider: TracerProvider) -> Any:
    """The app behind OTel's ASGI middleware: a SERVER span per request, continuing an incoming
    ``traceparent``. Only the server span (no per-message receive/send spans)."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app, tracer_provider=provider, exclude_spans=["receive", "send"])


# -- the PostHog emit -----------------------------------------------------------------------------
class TracedPosthog(Posthog):
    """The official client, with a PRODUCER span around each ``capture``: the event leaves the
    trace here (PostHog keeps no trace context), so the span records the event's uuid, which the
    tracer's observation of the event can be compared with."""

    def capture(self, event: str, **kwargs: Any) -> str | None:  # type: ignore[override]
        with tracer.start_as_current_span(
            f"posthog.capture {event}", kind=SpanKind.PRODUCER, attributes={"posthog.event": event}
        ) as span:
            event_uuid = super().capture(event, **kwargs)
            if event_uuid:
                span.set_attribute("posthog.event_uuid", str(event_uuid))
            return event_uuid


# -- carrying context across a queue (DLQ) ----------------------------------------------------------
def carrier() -> dict[str, str]:
    """W3C headers (``traceparent``/``tracestate``) of the current span, to store with a queued item."""
    out: dict[str, str] = {}
    propagate.inject(out)
    return out


@contextmanager
def continued(name: str, headers: Mapping[str, str] | None, **attributes: Any) -> Iterator[trace.Span]:
    """A CONSUMER span for work taken off a queue, child of the context saved with ``carrier()``
    (e.g. a DLQ retry of a parked delivery). Without saved context it is not recorded."""
    ctx = propagate.extract(dict(headers or {}))
    with tracer.start_as_current_span(
        name, context=ctx, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span
