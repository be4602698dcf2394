"""The ``zset`` shape: entries scored by their next retry time (Sidekiq-style retry sets)."""

from __future__ import annotations

from redis.asyncio.client import Pipeline

from collectors.redis_dlq.members import MemberShape
from collectors.redis_dlq.shape import Key


class ZsetShape(MemberShape):
    name = "zset"

    def read(self, p: Pipeline, key: str, ks: Key, checks: list[tuple[str, str]], max_scan: int) -> None:
        p.zcard(key)
        p.zrange(key, 0, max_scan - 1)

    def read_aux(self, p: Pipeline, key: str, max_scan: int) -> None:
        p.zrevrange(key, 0, max_scan - 1)  # newest by score first
