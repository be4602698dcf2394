"""A PostHog-compatible local server: capture endpoints, the HogQL query API, webhook destinations.

Why it exists: the tracer's PostHog collector must be tested against something that fails the
way PostHog fails on the wire (the official SDK's capture requests, PostHog's timestamp rule,
401/400/429 answers, ``is_cached``, ingestion lag, unknown project keys answered 200 and dropped,
queries parsed by PostHog's own parser) without a network or an account.

- ``state``   the stored events, the knobs tests flip while it runs (``PostHogState``), counters
- ``capture`` ``/batch/``, ``/i/v0/e/``, ``/e/``, ``/capture/``, ``/track/``, ``/i/v0/ai/batch/``,
              ``/i/v1/analytics/events``, and realtime webhook destinations
- ``query``   ``POST /api/projects/{id}/query/``: PostHog's parser, then a small AST evaluator
- ``parser``  PostHog's ``hogql-parser`` usable outside PostHog's monorepo
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tracer.sandbox.posthog import query
from tracer.sandbox.posthog.capture import Capture
from tracer.sandbox.posthog.parser import ParserPool
from tracer.sandbox.posthog.state import PostHogState, StoredEvent

__all__ = ["PostHogState", "StoredEvent", "create_app"]

_LEGACY_CAPTURE = ("/batch", "/i/v0/e", "/e", "/capture", "/track", "/i/v0/ai/batch")


async def _health(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def create_app(state: PostHogState) -> Starlette:
    """The sandbox PostHog as an ASGI app. Run it with lifespan on so destination tasks are
    cancelled and their HTTP client closed at shutdown."""
    capture = Capture(state)
    parser = ParserPool()

    async def run_query(request: Request) -> JSONResponse:
        return await query.handle(state, request, parser)

    routes = [Route("/_health", _health, methods=["GET"])]
    for path in _LEGACY_CAPTURE:  # trailing slash optional, without a redirect (the SDK POSTs)
        routes += [
            Route(path, capture.capture_legacy, methods=["POST"]),
            Route(path + "/", capture.capture_legacy, methods=["POST"]),
        ]
    routes += [
        Route("/i/v1/analytics/events", capture.capture_v1, methods=["POST"]),
        Route("/i/v1/analytics/events/", capture.capture_v1, methods=["POST"]),
        Route("/api/projects/{project_id}/query", run_query, methods=["POST"]),
        Route("/api/projects/{project_id}/query/", run_query, methods=["POST"]),
    ]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await parser.start()
        yield
        await capture.aclose()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.posthog = state
    return app
