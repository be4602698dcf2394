"""The reference funnel: a small web app that turns requests into PostHog events, like a real SaaS API.

Every route module (``leads``, ``payments``, ``approvals``, ``auth``) contributes ``routes(ctx)``; knobs
live on ``FunnelContext`` and can be changed while the app runs, which is how tests inject delay,
loss and faults.

The SLO's API latency rows are per endpoint category (``CATEGORIES``): ``Knobs.api_delay`` holds
back a category's responses and ``Knobs.error_rate`` answers a fraction of them with a 503, so
response hops have something to find. ``/api/v1/admin/dlq`` reports the DLQ's depth (a gauge's
http_json source) and ``POST /api/v1/admin/dlq/fill`` parks entries that are not due for a day,
so a DLQ-depth gauge can be tripped.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from posthog import Posthog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tracer.sandbox import auth
from tracer.sandbox.approvals import approval_routes
from tracer.sandbox.crm import CrmState, capture_lead, crm_routes
from tracer.sandbox.dlq import new_entry
from tracer.sandbox.payments import payment_routes
from tracer.sandbox.telemetry import TracedPosthog, tracer

log = logging.getLogger(__name__)


@dataclass
class Knobs:
    """Fault and delay knobs, mutable at run time."""

    lead_delay: float = 0.0  # seconds between accepting a lead and emitting lead_captured
    drop_rate: float = 0.0  # fraction of leads whose event is never emitted
    api_delay: dict[str, float] = field(default_factory=dict)  # category -> seconds before answering
    error_rate: dict[str, float] = field(default_factory=dict)  # category -> fraction answered 503


# The SLO's endpoint categories, by path prefix.
CATEGORIES = {
    "/api/v1/health": "health",
    "/api/v1/pricing": "pricing",
    "/api/v1/leads": "leads",
    "/api/v1/webhooks/": "webhooks",
}


def category_of(path: str) -> str | None:
    return next((c for prefix, c in CATEGORIES.items() if path.startswith(prefix)), None)


class CategoryFaults:
    """ASGI middleware: the per-category delay and 5xx knobs, read on every request."""

    def __init__(self, app: Any, knobs: Knobs) -> None:
        self.app, self.knobs = app, knobs

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        category = category_of(scope.get("path", "")) if scope["type"] == "http" else None
        if category is not None:
            delay = self.knobs.api_delay.get(category, 0.0)
            if delay > 0:
                await asyncio.sleep(delay)
            if random.random() < self.knobs.error_rate.get(category, 0.0):
                await JSONResponse({"detail": "injected fault"}, status_code=503)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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


def is_synthetic(request: Request, body: dict[str, Any]) -> bool:
    """What a well-behaved funnel keys on to tell canary traffic apart (``tracer.synthetic``)."""
    meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    return request.headers.get("x-synthetic", "").lower() == "true" or meta.get("synthetic") is True


def synthetic_records(ctx: FunnelContext) -> dict[str, int]:
    """Synthetic records the funnel holds right now: what a cleanup must bring to zero."""
    leads = ctx.extra.get("leads", {})
    approvals = ctx.extra.get("approval_records", {})
    return {
        "leads": sum(1 for lead in leads.values() if lead["synthetic"]),
        "approvals": sum(1 for a in approvals.values() if a["synthetic"]),
    }


def lead_routes(ctx: FunnelContext) -> list[Route]:
    leads: dict[str, dict[str, Any]] = ctx.extra.setdefault("leads", {})

    async def create_lead(request: Request) -> JSONResponse:
        if (refused := auth.refuse(ctx, request)) is not None:
            return refused
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
        leads[lead_id] = {"id": lead_id, "email": lead["email"], "synthetic": is_synthetic(request, lead)}
        if random.random() >= ctx.knobs.drop_rate:
            ctx.emit_later(ctx.knobs.lead_delay, "lead_captured", lead["email"], props)
        capture_lead(ctx.crm, ctx._tasks, lead, props)  # the CRM sync has its own delay knob
        return JSONResponse({"id": lead_id, "status": "captured"}, status_code=201)

    async def qualify_lead(request: Request) -> JSONResponse:
        """The second step of a two-step creation: emits ``lead_qualified`` with the lead's id
        (and no trace id, so only a captured id can match it)."""
        if (refused := auth.refuse(ctx, request)) is not None:
            return refused
        lead = leads.get(request.path_params["lead_id"])
        if lead is None:
            return JSONResponse({"detail": "no such lead"}, status_code=404)
        body = await _json_object(request) or {}
        props: dict[str, Any] = {"lead_id": lead["id"], "score": body.get("score")}
        if "traceparent" in request.headers:
            props["traceparent"] = request.headers["traceparent"]
        lead["status"] = "qualified"
        ctx.emit_later(ctx.knobs.lead_delay, "lead_qualified", lead["email"], props)
        return JSONResponse({"id": lead["id"], "status": "qualified"})

    async def delete_lead(request: Request) -> JSONResponse:
        if (refused := auth.refuse(ctx, request)) is not None:
            return refused
        if leads.pop(request.path_params["lead_id"], None) is None:
            return JSONResponse({"detail": "no such lead"}, status_code=404)
        return JSONResponse({"deleted": True})

    return [
        Route("/api/v1/leads", create_lead, methods=["POST"]),
        Route("/api/v1/leads/{lead_id}/qualify", qualify_lead, methods=["POST"]),
        Route("/api/v1/leads/{lead_id}", delete_lead, methods=["DELETE"]),
    ]


async def synthetic_count(request: Request) -> JSONResponse:
    return JSONResponse(synthetic_records(request.app.state.ctx))


async def health(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


PLANS = [
    {"id": "starter", "price": 4900, "currency": "SAR", "interval": "month"},
    {"id": "growth", "price": 14900, "currency": "SAR", "interval": "month"},
]


async def pricing(_: Request) -> JSONResponse:
    return JSONResponse({"plans": PLANS})


def admin_routes(ctx: FunnelContext) -> list[Route]:
    async def dlq_depth(_: Request) -> JSONResponse:
        dlq = ctx.extra.get("dlq")
        if dlq is None:
            return JSONResponse({"detail": "no DLQ (start the sandbox with Redis)"}, status_code=404)
        pending, dead = await dlq.entries(), await dlq.dead()
        return JSONResponse({"queues": {"webhooks": {"depth": len(pending), "dead": len(dead)}}})

    async def dlq_fill(request: Request) -> JSONResponse:
        dlq = ctx.extra.get("dlq")
        body = await _json_object(request) or {}
        n = body.get("n", 1)
        if dlq is None or not isinstance(n, int) or not 0 < n <= 10_000:
            return JSONResponse({"detail": 'needs a DLQ and {"n": 1..10000}'}, status_code=422)
        later = time.time() + 86_400  # not due for a day: the entries stay and count
        for _ in range(n):
            entry = new_entry("payments", {"filler": True}, "sandbox fill", max_attempts=5, now=later)
            await dlq.put(entry)
        return JSONResponse({"parked": n})

    return [
        Route("/api/v1/admin/dlq", dlq_depth),
        Route("/api/v1/admin/dlq/fill", dlq_fill, methods=["POST"]),
    ]


def create_app(ctx: FunnelContext) -> Starlette:
    routes = [
        Route("/api/v1/health", health),
        Route("/api/v1/pricing", pricing),
        Route("/api/v1/synthetic", synthetic_count),
        *auth.auth_routes(ctx),
        *lead_routes(ctx),
        *payment_routes(ctx),
        *approval_routes(ctx),
        *admin_routes(ctx),
        *crm_routes(ctx.crm),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(CategoryFaults, knobs=ctx.knobs)])
    app.state.ctx = ctx
    return app
