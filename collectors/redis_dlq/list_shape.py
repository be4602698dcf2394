"""The ``list`` shape: LPUSH to park, LREM/LMOVE to claim (the reliable-queue pattern)."""

from __future__ import annotations

from redis.asyncio.client import Pipeline

from collectors.redis_dlq.members import MemberShape
from collectors.redis_dlq.shape import Key


class ListShape(MemberShape):
    name = "list"

    def read(self, p: Pipeline, key: str, ks: Key, checks: list[tuple[str, str]], max_scan: int) -> None:
        p.llen(key)
        p.lrange(key, 0, max_scan - 1)

    def read_aux(self, p: Pipeline, key: str, max_scan: int) -> None:
        p.lrange(key, 0, max_scan - 1)
