"""The reference funnel: a small web app that turns requests into PostHog events, like a real SaaS API.

Every route module (``leads``, ``payments``, ``approvals``) contributes ``routes(ctx)``; knobs
live on ``FunnelContext`` and can be changed while the app runs, which is how tests inject delay,
loss and faults.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from posthog import Posthog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tracer.sandbox.approvals import approval_routes
from tracer.sandbox.crm import CrmState, capture_lead, crm_routes
from tracer.sandbox.payments import payment_routes
from tracer.sandbox.telemetry import TracedPosthog, tracer

log = logging.getLogger(__name__)


@dataclass
class Knobs:
    """Fault and delay knobs, mutable at run time."""

    lead_delay: float = 0.0  # seconds between accepting a lead and emitting lead_captured
    drop_rate: float = 0.0  # fraction of leads whose event is never emitted


@dataclass
class FunnelContext:
    posthog_host: str
    posthog_api_key: str = "phc_sandbox"
    knobs: Knobs = field(default_factory=Knobs)
    redis_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # per-module state (DLQ worker, approvals, ...)
    crm: CrmState = field(default_factory=CrmState)  # leads become contacts (sandbox/crm.py)
    _client: Posthog | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def posthog(self) -> Posthog:
        if self._client is None:
            # sync_mode: one HTTP request per capture, so the funnel's delay knob is the only delay.
            # TracedPosthog: the official client with a span around each capture (sandbox/telemetry.py).
            self._client = TracedPosthog(
                self.posthog_api_key, host=self.posthog_host, sync_mode=True, disable_geoip=True
            )
        return self._client

    def emit_later(self, delay: float, event: str, distinct_id: str, properties: dict[str, Any]) -> None:
        """Emit a PostHog event after ``delay`` seconds without holding up the HTTP response."""

        async def run() -> None:
            with tracer.start_as_current_span(f"emit {event}", attributes={"funnel.emit_delay_s": delay}):
                await asyncio.sleep(delay)
                await asyncio.to_thread(
                    self.posthog.capture, event, distinct_id=distinct_id, properties=properties
                )

        # The task runs after the response is sent, in a copy of the request's context: its spans
        # stay in the caller's trace, children of the request's server span.
        task = asyncio.get_running_loop().create_task(run(), context=contextvars.copy_context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._client is not None:
            self._client.shutdown()


async def _json_object(request: Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def lead_routes(ctx: FunnelContext) -> list[Route]:
    async def create_lead(request: Request) -> JSONResponse:
        lead = await _json_object(request)
        if lead is None or not isinstance(lead.get("email"), str) or "@" not in lead["email"]:
            return JSONResponse({"detail": "a JSON lead with an email is required"}, status_code=422)
        lead_id = f"lead_{random.getrandbits(48):012x}"
        props = {
            "email": lead["email"],
            "name": lead.get("name"),
            "source": lead.get("source"),
            "lead_id": lead_id,
            **(lead.get("metadata") or {}),
        }
        if "traceparent" in request.headers:
            # What an instrumented funnel should do: carry the caller's trace into the event.
            props["traceparent"] = request.headers["traceparent"]
        if random.random() >= ctx.knobs.drop_rate:
            ctx.emit_later(ctx.knobs.lead_delay, "lead_captured", lead["email"], props)
        capture_lead(ctx.crm, ctx._tasks, lead, props)  # the CRM sync has its own delay knob
        return JSONResponse({"id": lead_id, "status": "captured"}, status_code=201)

    return [Route("/api/v1/leads", create_lead, methods=["POST"])]


async def health(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def create_app(ctx: FunnelContext) -> Starlette:
    routes = [
        Route("/api/v1/health", health),
        *lead_routes(ctx),
        *payment_routes(ctx),
        *approval_routes(ctx),
        *crm_routes(ctx.crm),
    ]
    app = Starlette(routes=routes)
    app.state.ctx = ctx
    return app
