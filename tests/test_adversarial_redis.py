"""Adversarial re-run (issue 10) for the Redis side: the DLQ collector, its injector, the Redis
gauge and the sandbox's DLQ worker, attacked with real redis-server processes and small hostile
socket servers on loopback.

The promise under attack: ``late``/``lost`` only when the funnel really failed; when the tracer
could not look (or what it saw may not be the funnel's doing) it says ``unknown``. Never a
forged ``ok`` (a retry the worker did not make), a silent task death, a traceback or a secret
in output. Each attack is bounded (a few seconds)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.test_redis_dlq import KEY, collector, hop, seen, settle, watches
from tracer import clock
from tracer.evidence import Evidence
from tracer.probe import Probe
from tracer.sandbox.dlq import new_entry


def entry_text(p: Probe, **extra: Any) -> str:
    return json.dumps(
        {**new_entry("webhooks", {"trace_id": p.trace_id}, "HTTP 500", max_attempts=5), **extra}
    )


async def parked(redis_url: str, mode: str = "push", shape: str = "list", **cfg: Any):
    """A collector watching one probe's entry/retry/resolved, its entry parked and seen."""
    r = Redis.from_url(redis_url, decode_responses=True)
    c = await collector(redis_url, mode=mode, poll_interval=0.1, **cfg)
    p = Probe(step="dlq")
    ws = watches(c, p, hop(shape))
    await settle(c)
    text = entry_text(p)
    if shape == "list":
        await r.lpush(KEY, text)
    elif shape == "zset":
        await r.zadd(KEY, {text: 1})
    else:
        await r.xadd(KEY, {"entry": text})
    await seen(ws, "entry")
    return r, c, p, ws, text


# -- someone else wipes the DLQ: that is no retry ------------------------------------------


async def _wiped(redis_url: str, mode: str, shape: str, how: str) -> None:
    r, c, p, ws, text = await parked(redis_url, mode, shape)
    if how == "flushall":
        await r.flushall()
    elif how == "flushdb":
        await r.flushdb()
    elif how == "del":
        await r.delete(KEY)
    elif how == "expire":
        await r.pexpire(KEY, 1)
    elif how == "rename":
        await r.rename(KEY, "elsewhere")
    await asyncio.sleep(0.6)
    assert not ws["retry"].observations, f"{how}: forged retry {ws['retry'].first}"
    assert not ws["resolved"].observations, f"{how}: forged resolved"
    assert c.coverage.blind_start(ws["retry"].since, clock.now()) is not None, f"{how}: not blind (lost)"
    ev = await c.explain(ws["retry"], ws["retry"].since, clock.now(), Evidence(searched={}))
    assert "without any retry" not in (ev.summary or ""), ev.summary
    await c.close()
    await r.aclose()


@pytest.mark.parametrize(
    "mode,shape,how",
    [
        ("push", "list", "flushall"),
        ("push", "list", "flushdb"),
        ("push", "list", "del"),
        ("push", "zset", "expire"),
        ("push", "list", "rename"),
        ("push", "stream", "del"),
        ("push", "stream", "flushall"),
        ("poll", "list", "flushall"),
        ("poll", "stream", "del"),
    ],
)
def test_dlq_wiped_by_someone_else_is_no_retry(redis_url: str, mode: str, shape: str, how: str) -> None:
    asyncio.run(_wiped(redis_url, mode, shape, how))
