"""The Redis DLQ collector against a real redis-server and the sandbox retry worker.

Ground truth is the worker's own schedule (``retry_interval``) and its retry log. Lags are
checked within the observations' error bars; windows the collector could not see must show up in
``coverage`` rather than as a missing sighting.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from collectors.redis_dlq import RedisDlqCollector, RedisDlqConfig
from tests.support import RedisProcess, free_port
from tracer import clock
from tracer.inject.redis_dlq import DlqInject, send
from tracer.net import redact_url
from tracer.probe import Probe
from tracer.sandbox.dlq import DlqWorker, new_entry, to_fields
from tracer.spec import HopSpec, parse_spec
from tracer.watch import Watch

SHAPES = ["list", "zset", "stream"]
KEY = "dlq:webhooks"
# A push sighting is stamped when the event loop gets to the notification (the project's push
# convention: at == not_before). On a loaded machine, with the worker on the same loop, that can
# trail the write by a few milliseconds more than it trails the retry.
SCHEDULING_SLACK = 0.03


def hop(shape: str = "list", key: str = KEY, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"key": key, "shape": shape, "dead_key": f"{key}:dead"}
    if shape != "stream":
        spec["processing_key"] = f"{key}:processing"
    return {**spec, **extra}


def watch(c: RedisDlqCollector, probe: Probe, event: str, spec: dict[str, Any]) -> Watch:
    after = None if event == "entry" else "entry"
    w = Watch(
        probe=probe,
        hop=HopSpec(name=event, target=60, after=after, redis_dlq={**spec, "event": event}),
        since=clock.now(),
    )
    c.watch(w)
    return w


def watches(c: RedisDlqCollector, probe: Probe, spec: dict[str, Any], events=("entry", "retry", "resolved")):
    return {ev: watch(c, probe, ev, spec) for ev in events}


async def collector(url: str, **cfg: Any) -> RedisDlqCollector:
    c = RedisDlqCollector(RedisDlqConfig(url=url, **cfg))
    await c.start()
    return c


async def settle(c: RedisDlqCollector) -> None:
    """Let a new hop get its first look (and subscription) before the probe is injected."""
    looks = c.looks
    for _ in range(100):
        if c.looks > looks:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)


async def seen(ws: dict[str, Watch], *events: str, timeout: float = 3.0) -> None:
    for ev in events:
        assert await ws[ev].wait_seen(timeout), f"{ev} not seen"


def check_retry_lag(ws: dict[str, Watch], dlq: DlqWorker, entry: dict[str, Any], interval: float) -> None:
    """Measured entry -> first retry lag against the worker's schedule and its own log.

    The worker retries no earlier than ``interval`` after ``created_at``, which it stamps just
    before the write; the entry sighting can only come after the write. So the lag is at least
    ``interval`` minus the entry's error bar and its detection delay (SCHEDULING_SLACK)."""
    e, r = ws["entry"].first, ws["retry"].first
    assert e is not None and r is not None
    lag, bar = r.at - e.at, e.error_bar + r.error_bar
    assert interval - bar - SCHEDULING_SLACK <= lag <= interval + bar + 0.25, (lag, bar)
    truth = next(h for h in dlq.history if h.entry_id == entry["id"]).started - dlq.parked_at[entry["id"]]
    assert abs(lag - truth) <= bar + 0.05, (lag, truth, bar)


# -- each shape, push and poll ------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_push_entry_retry_resolved(redis_url: str, shape: str) -> None:
    async def run() -> None:
        c = await collector(redis_url)
        async with DlqWorker(redis_url, KEY, shape=shape, retry_interval=0.4) as dlq:
            p = Probe(step="dlq")
            ws = watches(c, p, hop(shape))
            await settle(c)
            entry = await dlq.park("webhooks", {"trace_id": p.trace_id}, "HTTP 500")
            await seen(ws, "entry", "retry", "resolved")
        e = ws["entry"].first
        assert e.source == "push" and e.error_bar < 0.05
        assert e.sink_time == pytest.approx(clock.parse_iso(entry["created_at"]), abs=1e-3)
        assert e.detail["entry_id"] == entry["id"] and e.detail["attempt"] == 1
        check_retry_lag(ws, dlq, entry, 0.4)
        assert ws["resolved"].first.at >= ws["retry"].first.at
        assert c.coverage.blind_start(ws["entry"].since, clock.now()) is None
        assert c.health()["push_active"] and c.health()["in_flight"] == 0
        await c.close()

    asyncio.run(run())


@pytest.mark.parametrize("shape", SHAPES)
def test_poll_entry_retry_resolved(redis_url: str, shape: str) -> None:
    async def run() -> None:
        c = await collector(redis_url, mode="poll", poll_interval=0.15)
        async with DlqWorker(redis_url, KEY, shape=shape, retry_interval=0.5) as dlq:
            p = Probe(step="dlq")
            ws = watches(c, p, hop(shape))
            await settle(c)
            entry = await dlq.park("webhooks", {"trace_id": p.trace_id}, "HTTP 500")
            await seen(ws, "entry", "retry", "resolved")
        for w in ws.values():
            assert w.first.source == "poll" and w.first.error_bar <= 0.15 + 0.05
        check_retry_lag(ws, dlq, entry, 0.5)
        assert not c.health()["push_active"]
        await c.close()

    asyncio.run(run())


@pytest.mark.parametrize("shape", SHAPES)
def test_dead_lettered(redis_url: str, shape: str) -> None:
    async def run() -> None:
        c = await collector(redis_url)
        async with DlqWorker(
            redis_url, KEY, shape=shape, retry_interval=0.1, backoff=1.0, max_attempts=3, retry_fail_rate=1.0
        ) as dlq:
            p = Probe(step="dlq")
            ws = watches(c, p, hop(shape), events=("entry", "retry", "resolved", "dead"))
            await settle(c)
            entry = await dlq.park("webhooks", {"trace_id": p.trace_id}, "HTTP 500")
            await seen(ws, "entry", "retry", "dead")
            await asyncio.sleep(0.2)
        assert not ws["resolved"].observations  # a dead entry is not a resolved one
        d = ws["dead"].first
        assert (
            d.detail["key"] == f"{KEY}:dead"
            and d.detail["attempt"] == 3
            and d.detail["entry_id"] == entry["id"]
        )
        assert [h.dead for h in dlq.history] == [False, True]
        check_retry_lag(ws, dlq, entry, 0.1)
        await c.close()

    asyncio.run(run())


@pytest.mark.parametrize("shape", SHAPES)
def test_failed_retry_within_milliseconds_counted(redis_url: str, shape: str) -> None:
    """Retried (and failed, so re-parked) within ~5 ms: still counted, even if the re-parked
    entry is the first thing a look sees (its attempt is past ``first_attempt``)."""

    async def run() -> None:
        c = await collector(redis_url)
        async with DlqWorker(
            redis_url, KEY, shape=shape, retry_interval=0.003, backoff=200, retry_fail_rate=1.0
        ) as dlq:
            for _ in range(5):
                p = Probe(step="dlq")
                ws = watches(c, p, hop(shape), events=("entry", "retry"))
                await settle(c)
                await dlq.park("webhooks", {"trace_id": p.trace_id}, "HTTP 500")
                await seen(ws, "entry", "retry", timeout=2)
                assert ws["retry"].first.at - ws["entry"].first.at < 0.1
        assert c.coverage.blind_start(0, clock.now()) is None
        await c.close()

    asyncio.run(run())


@pytest.mark.parametrize("shape", SHAPES)
def test_resolved_within_milliseconds_counted_push(redis_url: str, shape: str) -> None:
    """Retried successfully ~3 ms after parking: push sees the entry before it is gone; should a
    look ever lose that race, the window is reported blind, never silently lost."""

    async def run() -> None:
        c = await collector(redis_url)
        counted = 0
        async with DlqWorker(redis_url, KEY, shape=shape, retry_interval=0.003) as dlq:
            for _ in range(5):
                p = Probe(step="dlq")
                ws = watches(c, p, hop(shape))
                await settle(c)
                await dlq.park("webhooks", {"trace_id": p.trace_id}, "HTTP 500")
                if await ws["resolved"].wait_seen(2):
                    assert ws["entry"].first and ws["retry"].first
                    assert ws["retry"].first.at - ws["entry"].first.at < 0.1
                    counted += 1
                else:
                    assert c.coverage.blind_start(ws["entry"].since, clock.now()) is not None
        assert counted >= 4, counted
        await c.close()

    asyncio.run(run())


def test_many_probes_in_flight(redis_url: str) -> None:
    async def run() -> None:
        c = await collector(redis_url)
        async with DlqWorker(redis_url, KEY, retry_interval=0.3) as dlq:
            probes = [Probe(step="dlq") for _ in range(30)]
            all_ws = [watches(c, p, hop(), events=("entry", "retry")) for p in probes]
            await settle(c)
            entries = [await dlq.park("webhooks", {"trace_id": p.trace_id}, "HTTP 500") for p in probes]
            for ws, entry in zip(all_ws, entries, strict=True):
                await seen(ws, "entry", "retry")
                assert ws["entry"].first.detail["entry_id"] == entry["id"]
                check_retry_lag(ws, dlq, entry, 0.3)
        assert c.health()["in_flight"] == 0
        await c.close()

    asyncio.run(run())


# -- honesty: what a look cannot see is reported blind ------------------------------------


async def _flash(r: Redis, shape: str, key: str, text: str) -> None:
    """Add an entry and remove it again in one transaction: no look can ever see it."""
    if shape == "list":
        async with r.pipeline(transaction=True) as p:
            p.lpush(key, text)
            p.lrem(key, 1, text)
            await p.execute()
    elif shape == "zset":
        async with r.pipeline(transaction=True) as p:
            p.zadd(key, {text: 1})
            p.zrem(key, text)
            await p.execute()
    else:
        script = (
            "local id = redis.call('XADD', KEYS[1], '*', 'entry', ARGV[1]); redis.call('XDEL', KEYS[1], id)"
        )
        await r.eval(script, 1, key, text)


@pytest.mark.parametrize("shape", SHAPES)
def test_unseen_flash_is_reported_blind(redis_url: str, shape: str) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url)
        p = Probe(step="dlq")
        w = watch(c, p, "entry", hop(shape))
        await settle(c)
        await _flash(
            r, shape, KEY, json.dumps(new_entry("webhooks", {"trace_id": p.trace_id}, "x", max_attempts=5))
        )
        await asyncio.sleep(0.3)
        assert not w.observations
        assert c.coverage.blind_start(w.since, clock.now()) is not None
        assert c.health()["possible_misses"] == 1
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_poll_reports_a_change_between_polls_blind(redis_url: str) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url, mode="poll", poll_interval=0.5)
        p = Probe(step="dlq")
        w = watch(c, p, "entry", hop())
        await settle(c)
        text = json.dumps(new_entry("webhooks", {"trace_id": p.trace_id}, "x", max_attempts=5))
        await r.lpush(KEY, text)
        await r.lrem(KEY, 1, text)
        await asyncio.sleep(1.2)
        assert not w.observations
        assert c.coverage.blind_start(w.since, clock.now()) is not None
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_traffic_it_can_account_for_does_not_blind_push(redis_url: str) -> None:
    """Other entries parked and retried while a probe is awaited: push mode saw every removal,
    so it claims no blindness; poll mode cannot tell and says so."""

    async def run() -> None:
        results = {}
        for mode in ("push", "poll"):
            c = await collector(redis_url, mode=mode, poll_interval=0.1)
            async with DlqWorker(redis_url, KEY, retry_interval=0.05) as dlq:
                w = watch(c, Probe(step="dlq"), "entry", hop())  # never parked
                await settle(c)
                for i in range(5):
                    await dlq.park("webhooks", {"other": i}, "HTTP 500")
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.2)
                assert len(dlq.history) == 5
                results[mode] = c.coverage.blind_start(w.since, clock.now())
            c.unwatch(w)
            await c.close()
        assert results["push"] is None
        assert results["poll"] is not None

    asyncio.run(run())


def test_redis_killed_and_restarted() -> None:
    server = RedisProcess().start()

    async def run() -> None:
        c = await collector(server.url, reconnect_backoff=0.05, max_backoff=0.3, poll_interval=0.2)
        dlq = await DlqWorker(server.url, KEY, retry_interval=0.3).start()

        p1 = Probe(step="dlq")
        ws1 = watches(c, p1, hop(), events=("entry", "retry"))
        await settle(c)
        e1 = await dlq.park("webhooks", {"trace_id": p1.trace_id}, "HTTP 500")
        await seen(ws1, "entry", "retry")
        check_retry_lag(ws1, dlq, e1, 0.3)

        # p2 is parked and seen, then Redis dies with it (no persistence) before its retry.
        p2 = Probe(step="dlq")
        ws2 = watches(c, p2, hop(), events=("entry", "retry"))
        await dlq.park("webhooks", {"trace_id": p2.trace_id}, "HTTP 500")
        await seen(ws2, "entry")
        server.kill()
        await asyncio.sleep(0.6)
        assert c.coverage.blind_now and not c.health()["up"]
        assert c.health()["last_error"] == "connection refused or lost"
        server.start()
        for _ in range(100):
            if c.health()["up"]:
                break
            await asyncio.sleep(0.05)
        assert c.health()["up"] and c.health()["reconnects"] >= 1
        await asyncio.sleep(0.3)

        p3 = Probe(step="dlq")
        ws3 = watches(c, p3, hop(), events=("entry", "retry"))
        await settle(c)
        e3 = await dlq.park("webhooks", {"trace_id": p3.trace_id}, "HTTP 500")
        await seen(ws3, "entry", "retry")
        assert ws3["entry"].first.source == "push"  # re-subscribed after the restart
        check_retry_lag(ws3, dlq, e3, 0.3)

        # p2's entry vanished with the server: that is no retry, and its window is blind.
        assert not ws2["retry"].observations
        assert c.coverage.blind_start(ws2["retry"].since, clock.now()) is not None
        assert c.coverage.blind_start(ws3["entry"].since, clock.now()) is None
        await dlq.close()
        await c.close()

    try:
        asyncio.run(run())
    finally:
        server.stop()


def test_down_at_start_then_up() -> None:
    server = RedisProcess()  # not started yet

    async def run() -> None:
        c = await collector(server.url, reconnect_backoff=0.05, max_backoff=0.2, timeout=0.5)
        assert not c.health()["up"] and c.coverage.blind_now
        server.start()
        for _ in range(100):
            if c.health()["up"]:
                break
            await asyncio.sleep(0.05)
        assert c.health()["up"] and not c.coverage.blind_now
        await c.close()

    try:
        asyncio.run(run())
    finally:
        server.stop()


def test_notifications_refused_falls_back_to_polling_and_never_shows_the_password(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cret-dlq-pw"

    async def run() -> None:
        admin = Redis.from_url(redis_url, decode_responses=True)
        await admin.execute_command(
            "ACL", "SETUSER", "tracer", "on", f">{secret}", "~*", "&*", "+@all", "-config"
        )
        url = redis_url.replace("redis://", f"redis://tracer:{secret}@")
        try:
            c = await collector(url, poll_interval=0.1)
            health = c.health()
            assert not health["push_active"] and health["notifications"].startswith("off")
            async with DlqWorker(redis_url, KEY, retry_interval=0.3) as dlq:
                p = Probe(step="dlq")
                ws = watches(c, p, hop(), events=("entry", "retry"))
                await settle(c)
                entry = await dlq.park("webhooks", {"trace_id": p.trace_id}, "HTTP 500")
                await seen(ws, "entry", "retry")
                check_retry_lag(ws, dlq, entry, 0.3)
            shown = repr(c.health()) + repr(c.config) + str(c.config) + caplog.text
            assert secret not in shown and "tracer:" not in shown
            assert c.health()["url"] == redact_url(url) == redis_url
            await c.close()
        finally:
            await admin.execute_command("ACL", "DELUSER", "tracer")
            await admin.aclose()

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    assert "keyspace notifications" in caplog.text


# -- other layouts ----------------------------------------------------------------------


def test_meta_hash_ids_with_metadata(redis_url: str) -> None:
    """A list of entry ids plus a hash of id -> metadata JSON; the attempt changes in the hash."""

    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url)
        p = Probe(step="dlq")
        spec = {"key": "dlq:ids", "meta_hash": "dlq:meta", "trace_path": "payload.trace_id"}
        ws = watches(c, p, spec)
        await settle(c)
        entry = new_entry("webhooks", {"trace_id": p.trace_id}, "HTTP 500", max_attempts=5)
        await r.hset("dlq:meta", entry["id"], json.dumps(entry))
        await r.lpush("dlq:ids", entry["id"])
        await seen(ws, "entry")
        assert ws["entry"].first.sink_time == pytest.approx(clock.parse_iso(entry["created_at"]), abs=1e-3)
        await asyncio.sleep(0.05)
        await r.hset("dlq:meta", entry["id"], json.dumps({**entry, "attempt": 2}))
        await seen(ws, "retry")
        assert ws["retry"].first.detail["attempt"] == 2 and not ws["resolved"].observations
        async with r.pipeline(transaction=True) as pipe:
            pipe.lrem("dlq:ids", 1, entry["id"])
            pipe.hdel("dlq:meta", entry["id"])
            await pipe.execute()
        await seen(ws, "resolved")
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_glob_pattern_and_stream_entry_as_one_json_field(redis_url: str) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url)
        p1, p2 = Probe(step="dlq"), Probe(step="dlq")
        ws1 = watches(
            c, p1, {"key": "dlq:*:list", "trace_path": "payload.trace_id"}, events=("entry", "retry")
        )
        ws2 = watches(c, p2, {"key": "dlqs:*", "shape": "stream"}, events=("entry", "retry"))
        await settle(c)
        e1 = json.dumps(new_entry("orders", {"trace_id": p1.trace_id}, "x", max_attempts=5))
        await r.lpush("dlq:orders:list", e1)  # a key that did not exist when the collector started
        e2 = new_entry("orders", {"trace_id": p2.trace_id}, "x", max_attempts=5)
        xid = await r.xadd("dlqs:orders", {"entry": json.dumps(e2)})
        await seen(ws1, "entry")
        await seen(ws2, "entry")
        assert ws1["entry"].first.detail["key"] == "dlq:orders:list" and ws1["entry"].first.source == "push"
        assert (
            ws2["entry"].first.detail["entry_id"] == e2["id"]
            and ws2["entry"].first.detail["stream_id"] == xid
        )
        await r.lrem("dlq:orders:list", 1, e1)
        await r.xdel("dlqs:orders", xid)
        await seen(ws1, "retry")
        await seen(ws2, "retry")
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_late_hop_gets_an_event_already_seen(redis_url: str) -> None:
    async def run() -> None:
        c = await collector(redis_url)
        async with DlqWorker(redis_url, KEY, retry_interval=5.0) as dlq:
            p = Probe(step="dlq")
            w_entry = watch(c, p, "entry", hop())
            w_retry = watch(c, p, "retry", hop())  # keeps the probe tracked after its entry
            await settle(c)
            await dlq.park("webhooks", {"trace_id": p.trace_id}, "HTTP 500")
            assert await w_entry.wait_seen(2)
            late = watch(c, p, "entry", hop())
            assert late.first is not None and late.first.at == w_entry.first.at
            c.unwatch(w_retry)
            assert c.health()["in_flight"] == 0
        await c.close()

    asyncio.run(run())


def test_wrong_shape_is_blind_not_fatal(redis_url: str) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        await r.set("dlq:str", "not a list")
        c = await collector(redis_url, poll_interval=0.1)
        w = watch(c, Probe(step="dlq"), "entry", hop(key="dlq:str"))
        await asyncio.sleep(0.3)
        assert c.coverage.blind_now and "is not a list" in c.health()["last_error"]
        c.unwatch(w)
        await r.delete("dlq:str")
        await asyncio.sleep(0.3)
        assert not c.coverage.blind_now
        await c.close()
        await r.aclose()

    asyncio.run(run())


# -- config ----------------------------------------------------------------------------


def test_config_validation_and_redaction() -> None:
    with pytest.raises(ValidationError, match="dead_key"):
        HopSpec(name="d", target=60, redis_dlq={"key": KEY, "event": "dead"})
    with pytest.raises(ValidationError, match="consumer group"):
        HopSpec(name="d", target=60, redis_dlq={"key": KEY, "shape": "stream", "processing_key": "p"})
    with pytest.raises(ValidationError, match="single key"):
        HopSpec(name="d", target=60, redis_dlq={"key": KEY, "dead_key": "dead:*"})
    with pytest.raises(ValidationError, match="redis://"):
        RedisDlqConfig(url="http://127.0.0.1:6379")
    cfg = RedisDlqConfig(url="redis://:hunter2@db.internal:6380/2?ssl_cert_reqs=none", poll_interval="250ms")
    assert "hunter2" not in repr(cfg) and cfg.poll_interval == 0.25
    assert redact_url(cfg.url.get_secret_value()) == "redis://db.internal:6380/2"
    spec = parse_spec(
        {
            "service": "demo",
            "collectors": {"redis_dlq": {"url": "redis://127.0.0.1:6379/0"}},
            "steps": {
                "dlq": {
                    "inject": {"redis_dlq": {"url": "redis://127.0.0.1:6379/0", "key": KEY, "shape": "zset"}},
                    "hops": [
                        {"name": "parked", "target": "5s", "redis_dlq": {"key": KEY, "shape": "zset"}},
                        {
                            "name": "first_retry",
                            "target": "60s",
                            "after": "parked",
                            "redis_dlq": {"key": KEY, "shape": "zset", "event": "retry"},
                        },
                    ],
                }
            },
        }
    )
    assert spec.steps["dlq"].hops[1].redis_dlq.event == "retry"


# -- inject mode (b): a synthetic entry straight into the DLQ --------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_injected_entry_is_retried_and_measured(redis_url: str, shape: str) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url)
        inject = DlqInject(url=redis_url, key=KEY, shape=shape, retry_in=0.3)
        async with DlqWorker(redis_url, KEY, shape=shape, retry_interval=0.3) as dlq:
            p = Probe(step="dlq")
            ws = watches(c, p, hop(shape))
            await settle(c)
            result = await send(inject, p)
            assert result.ok and result.error is None and result.done_at >= result.sent_at
            assert result.attributes["db.collection.name"] == KEY
            await seen(ws, "entry", "retry", "resolved")
        (handled,) = dlq.history
        assert handled.ok and handled.attempt == 1
        e = ws["entry"].first
        lag = ws["retry"].first.at - e.at
        assert 0.3 - e.error_bar - SCHEDULING_SLACK <= lag <= 0.3 + e.error_bar + 0.25
        assert e.sink_time == pytest.approx(clock.wall(result.sent_at), abs=0.05)
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_injected_entry_format(redis_url: str) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        p = Probe(step="dlq")
        assert (await send(DlqInject(url=redis_url, key="dlq:l"), p)).ok
        assert (await send(DlqInject(url=redis_url, key="dlq:s", shape="stream"), p)).ok
        (raw,) = await r.lrange("dlq:l", 0, -1)
        entry = json.loads(raw)
        assert entry["payload"] == {
            "canary": True,
            "trace_id": p.trace_id,
            "probe_id": p.probe_id,
            "step": "dlq",
        }
        assert entry["attempt"] == 1 and entry["created_at"] == entry["last_attempt_at"]
        assert len(entry["id"]) == 36
        ((_, fields),) = await r.xrange("dlq:s")
        assert fields == {
            **to_fields({**entry, "id": fields["id"]}),
            "created_at": fields["created_at"],
            "last_attempt_at": fields["last_attempt_at"],
        }
        custom = DlqInject(
            url=redis_url, key="dlq:c", entry={"job": "{probe_id}", "tid": "{trace_id}"}, push="rpush"
        )
        assert (await send(custom, p)).ok
        assert json.loads((await r.lrange("dlq:c", 0, -1))[0]) == {"job": p.probe_id, "tid": p.trace_id}
        await r.aclose()

    asyncio.run(run())


def test_inject_unreachable_is_a_short_secret_free_failure() -> None:
    async def run() -> None:
        url = f"redis://canary:pa55word@127.0.0.1:{free_port()}/0"
        result = await send(DlqInject(url=url, key=KEY, timeout=1), Probe(step="dlq"))
        assert not result.ok and result.error == "connection refused or lost"
        assert "pa55word" not in repr(result)

    asyncio.run(run())


def test_notifications_switched_off_under_us_are_restored(redis_url: str) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url, poll_interval=0.1)
        w = watch(c, Probe(step="dlq"), "entry", hop())
        await settle(c)
        await r.config_set("notify-keyspace-events", "")
        await asyncio.sleep(0.4)
        flags = (await r.config_get("notify-keyspace-events"))["notify-keyspace-events"]
        assert set("Klz") <= set(flags) and c.health()["push_active"]
        assert c.coverage.blind_start(w.since, clock.now()) is not None
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_listener_connection_killed_is_blind_then_push_again(redis_url: str) -> None:
    """Only the notification listener's connection dies (Redis stays up): looks alone cannot
    certify a push collector, so the gap is blind; it reconnects and measures by push again."""

    async def run() -> None:
        admin = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url, reconnect_backoff=0.05, poll_interval=0.1)
        async with DlqWorker(redis_url, KEY, retry_interval=0.3) as dlq:
            w = watch(c, Probe(step="dlq"), "entry", hop())  # awaited across the outage
            await settle(c)
            assert await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
            for _ in range(100):
                if c.health()["reconnects"] >= 1 and c.health()["up"]:
                    break
                await asyncio.sleep(0.02)
            assert c.health()["reconnects"] >= 1 and c.health()["push_active"]
            assert c.coverage.blind_start(w.since, clock.now()) is not None
            await asyncio.sleep(0.2)
            p = Probe(step="dlq")
            ws = watches(c, p, hop(), events=("entry", "retry"))
            await settle(c)
            entry = await dlq.park("webhooks", {"trace_id": p.trace_id}, "HTTP 500")
            await seen(ws, "entry", "retry")
            assert ws["entry"].first.source == "push"
            check_retry_lag(ws, dlq, entry, 0.3)
        await c.close()
        await admin.aclose()

    asyncio.run(run())


def test_stream_hop_on_a_list_key_is_blind_without_reconnecting(redis_url: str) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        await r.lpush("dlq:mixed", "x")
        c = await collector(redis_url, poll_interval=0.1)
        watch(c, Probe(step="dlq"), "entry", {"key": "dlq:mixed", "shape": "stream"})
        await asyncio.sleep(0.5)
        assert c.coverage.blind_now and "is not a stream" in c.health()["last_error"]
        assert c.health()["reconnects"] == 0
        await c.close()
        await r.aclose()

    asyncio.run(run())
