"""The sandbox DLQ worker is the ground truth the collector is measured against: check it keeps
its own schedule (first retry after ``retry_interval``, then backoff), re-parks failures with
``attempt + 1``, dead-letters after ``max_attempts``, and honours each shape's semantics."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from tracer.sandbox.dlq import DlqWorker, new_entry

SHAPES = ["list", "zset", "stream"]


async def _until(cond, timeout: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not await cond():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("shape", SHAPES)
def test_first_retry_after_interval_and_resolved(redis_url: str, shape: str) -> None:
    async def run() -> None:
        async with DlqWorker(redis_url, shape=shape, retry_interval=0.3) as w:
            entry = await w.park("webhooks", {"lead": 1}, "HTTP 503")
            assert entry["attempt"] == 1 and entry["created_at"] == entry["last_attempt_at"]
            assert (await w.entries())[0]["payload"] == {"lead": 1}

            async def retried() -> bool:
                return bool(w.history)

            await _until(retried)
            lag = w.history[0].started - w.parked_at[entry["id"]]
            # Due at created_at + 0.3 s (wall clock), stamped a moment before park() wrote it; the
            # upper bound leaves room for a loaded machine.
            assert 0.3 - 0.05 <= lag <= 0.3 + 0.7, lag
            assert w.history[0].ok and w.history[0].attempt == 1

            async def drained() -> bool:
                return not await w.entries() and not await w.entries(w.processing_key)

            await _until(drained, 1.0)
            assert await w.dead() == []

    asyncio.run(run())


@pytest.mark.parametrize("shape", SHAPES)
def test_backoff_then_dead(redis_url: str, shape: str) -> None:
    async def run() -> None:
        async with DlqWorker(
            redis_url, shape=shape, retry_interval=0.1, backoff=2.0, max_attempts=4, retry_fail_rate=1.0
        ) as w:
            entry = await w.park("webhooks", {"lead": 2}, "HTTP 500")

            async def dead() -> bool:
                return bool(await w.dead())

            await _until(dead)
            assert [h.attempt for h in w.history] == [1, 2, 3]
            assert [h.dead for h in w.history] == [False, False, True]
            starts = [w.parked_at[entry["id"]]] + [h.started for h in w.history]
            gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
            for gap, expected in zip(gaps, [0.1, 0.2, 0.4], strict=True):
                assert expected <= gap <= expected + 0.1, gaps
            (final,) = await w.dead()
            assert final["id"] == entry["id"] and final["attempt"] == 4 and "dead_at" in final
            assert "retry failed" in final["error"]
            assert await w.entries() == []

    asyncio.run(run())


def test_handler_failure_reparks_with_next_attempt(redis_url: str) -> None:
    calls: list[dict] = []

    async def handler(entry: dict) -> None:
        calls.append(entry)
        if len(calls) == 1:
            raise RuntimeError("receiver still down")

    async def run() -> None:
        async with DlqWorker(redis_url, retry_interval=0.05, backoff=1.0, handler=handler) as w:
            entry = await w.park("webhooks", {"lead": 3}, "HTTP 502")

            async def twice() -> bool:
                return len(w.history) >= 2

            await _until(twice)
            assert [h.ok for h in w.history] == [False, True]
            assert calls[0]["id"] == calls[1]["id"] == entry["id"]
            assert calls[1]["attempt"] == 2 and "receiver still down" in calls[1]["error"]

    asyncio.run(run())


def test_knobs_change_while_running(redis_url: str) -> None:
    async def run() -> None:
        async with DlqWorker(redis_url, shape="zset", retry_interval=5.0) as w:
            w.retry_interval = 0.1  # a zset freezes the retry time into the score when parking
            entry = await w.park("webhooks", {}, "HTTP 500")
            r = Redis.from_url(redis_url, decode_responses=True)
            ((member, score),) = await r.zrange(w.key, 0, -1, withscores=True)
            await r.aclose()
            assert abs(score - w.due_at(entry)) < 1e-3

            async def retried() -> bool:
                return bool(w.history)

            await _until(retried, 1.0)
            w.retry_fail_rate = 1.0
            await w.park("webhooks", {}, "HTTP 500")

            async def failed() -> bool:
                return any(not h.ok for h in w.history)

            await _until(failed, 1.0)

    asyncio.run(run())


def test_stream_consumer_group_semantics(redis_url: str) -> None:
    """Delivered entries stay pending in the group until retried; a restarted worker picks its
    pending entries up again; a finished entry is acknowledged and deleted."""

    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        w = await DlqWorker(redis_url, shape="stream", retry_interval=0.6).start()
        await w.park("webhooks", {"lead": 4}, "HTTP 500")

        async def pending() -> bool:
            return (await r.xpending("dlq:webhooks", w.group))["pending"] == 1

        await _until(pending, 2.0)
        await w.close()  # crash before the retry was due
        assert w.history == []
        w2 = await DlqWorker(redis_url, shape="stream", retry_interval=0.6).start()

        async def done() -> bool:
            return bool(w2.history) and await r.xlen("dlq:webhooks") == 0

        await _until(done)
        assert (await r.xpending("dlq:webhooks", w2.group))["pending"] == 0
        await w2.close()
        await r.aclose()

    asyncio.run(run())


def test_entry_format_and_bad_shape(redis_url: str) -> None:
    entry = new_entry("webhooks", {"a": 1}, "boom", max_attempts=3)
    assert set(entry) == {
        "id",
        "queue",
        "payload",
        "error",
        "attempt",
        "max_attempts",
        "created_at",
        "last_attempt_at",
    }
    assert entry["created_at"].endswith("Z") and entry["max_attempts"] == 3
    with pytest.raises(ValueError):
        DlqWorker(redis_url, shape="hash")  # type: ignore[arg-type]
