"""Real processes for tests: a private redis-server per session, free loopback ports."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tracer.sandbox.redis_process import PrivateRedis as RedisProcess
from tracer.sandbox.redis_process import free_port, wait_port

__all__ = ["RedisProcess", "free_port", "wait_port", "tmp_yaml"]


def tmp_yaml(text: str) -> Path:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    return Path(f.name)
