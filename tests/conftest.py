from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import RedisProcess
from tracer.sandbox.funnel import Knobs
from tracer.sandbox.runner import Sandbox


@pytest.fixture(scope="session")
def redis_server():
    """One private redis-server for the whole session (tests that kill Redis start their own)."""
    server = RedisProcess().start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisProcess) -> str:
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """The reference funnel + local PostHog, one per test module."""
    with Sandbox() as sb:
        yield sb


@pytest.fixture()
def sb(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The module's sandbox, with every knob a test may turn put back afterwards."""
    yield sandbox
    defaults = Knobs()
    sandbox.knobs.lead_delay, sandbox.knobs.drop_rate = defaults.lead_delay, defaults.drop_rate
    sandbox.knobs.api_delay.clear()
    sandbox.knobs.error_rate.clear()
    sandbox.posthog.ingest_delay = 0.0
    sandbox.posthog.query_fault = None
    sandbox.posthog.retry_after = None
    sandbox.posthog.force_cached = False
    sandbox.ctx.extra.pop("payments", None)
    sandbox.ctx.extra.pop("dlq", None)
