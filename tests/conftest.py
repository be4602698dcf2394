from __future__ import annotations

import pytest

from tests.support import RedisProcess


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
