"""The ledger: records that survive a process, and several canary instances sharing push
receivers through Redis (real redis-server, real webhook receivers, the sandbox's approvals
posting real notifications)."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import redis

from tests.canary_helpers import load
from tests.support import RedisProcess, free_port
from tracer import clock
from tracer.canary import Canary
from tracer.engine import InFlight, ProbeResult
from tracer.inject import Injection
from tracer.ledger import RedisLedger, Sighting, record_of, restore
from tracer.probe import Probe, new_trace_id
from tracer.sandbox.approvals import ApprovalSettings
from tracer.sandbox.runner import Sandbox
from tracer.spec import LedgerSpec
from tracer.verdict import HopResult

pytestmark = pytest.mark.timeout(60)
SECRET = "canary-secret-path"


def test_record_round_trip_same_boot_exact_other_boot_through_wall_time() -> None:
    probe = Probe(step="payment")
    t0 = probe.created_at
    injection = Injection(
        t0 + 0.01, t0 + 0.2, ok=True, status=201, attributes={"http.request.method": "POST"}
    )
    hop = HopResult(
        step="payment",
        hop="dlq",
        sink="redis_dlq",
        target=5,
        deadline=15,
        verdict="ok",
        start=t0 + 0.01,
        end=t0 + 1.5,
        lag=1.49,
        error_bar=0.1,
        sources={"poll": 1.49},
        detail={"key": "dlq"},
    )
    inflight = InFlight(probe, {}, registered_at=t0, injection=injection, done={"dlq": hop})
    rec = json.loads(json.dumps(record_of(inflight, "east-1")))

    p2, inj2, done2 = restore(rec)
    assert (p2.trace_id, p2.probe_id, p2.root_span_id, p2.inject_span_id) == (
        probe.trace_id,
        probe.probe_id,
        probe.root_span_id,
        probe.inject_span_id,
    )
    assert p2.created_at == t0 and inj2 is not None and inj2.sent_at == injection.sent_at
    assert inj2.status == 201 and inj2.attributes == injection.attributes
    assert done2["dlq"] == hop

    # After a reboot (another boot id) the monotonic readings are meaningless: wall time is used.
    for stamp in (rec["created"], rec["injection"]["sent"], rec["injection"]["done"]):
        stamp["boot"], stamp["mono"] = "another-boot", -1e9
    p3, inj3, _ = restore(rec)
    assert p3.created_at == pytest.approx(t0, abs=1e-6) and inj3.sent_at == pytest.approx(t0 + 0.01, abs=1e-6)

    # A record written before the injection returned: the outcome is unknown.
    rec["injection"] = None
    assert restore(rec)[1] is None


def approval_spec(sb: Sandbox, redis_url: str, instance: str, port: int, ledger_extra: str = "") -> str:
    return f"""
service: sandbox-funnel
collectors:
  webhook: {{port: {port}, secret_path: {SECRET}}}
canary:
  grace: 8s
  ledger: {{redis_url: "{redis_url}", instance: {instance}{ledger_extra}}}
steps:
  approval:
    interval: 300ms
    inject:
      http:
        url: {sb.url}/api/v1/approvals
        json: {{resource: prod-db, requester: "canary+{{trace_id}}@example.com", metadata: {{canary_trace_id: "{{trace_id}}"}}}}
        timeout: 2s
    hops:
      - name: notified
        target: 1s
        deadline: 2s
        webhook: {{path: events, json_path: data.trace_id}}
"""


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


def test_instances_share_a_receiver_each_sighting_matched_exactly_once_and_redis_outage_is_blind(
    sandbox: Sandbox,
) -> None:
    """The "load balancer" sends every approval notification to instance A's receiver; B's
    probes are matched through the shared ledger, once. Then Redis dies for 3 s: B cannot hear
    from A, so its probes in that window are unknown, never lost."""
    server = RedisProcess().start()
    port_a, port_b = free_port(), free_port()
    sandbox.ctx.extra["approvals"] = ApprovalSettings(
        webhook_url=f"http://127.0.0.1:{port_a}/events",
        secret_path=SECRET,
        webhook_delay=0.2,
        emit_event=False,
    )
    results: dict[str, list[ProbeResult]] = {"a": [], "b": []}
    outage: list[float] = []

    async def main() -> tuple[Canary, Canary]:
        a = Canary(
            load(approval_spec(sandbox, server.url, "a", port_a)),
            http_port=None,
            on_result=results["a"].append,
        )
        b = Canary(
            load(approval_spec(sandbox, server.url, "b", port_b)),
            http_port=None,
            on_result=results["b"].append,
        )
        await a.start()
        await b.start()
        try:
            await asyncio.sleep(3.0)
            outage.append(clock.now())
            server.kill()
            await asyncio.sleep(3.0)
            server.start()
            outage.append(clock.now())
            await asyncio.sleep(5.0)
        finally:
            await b.shutdown()  # B first: A is its probes' "load balancer" target
            await a.shutdown()
        return a, b

    try:
        a, b = asyncio.run(main())
    finally:
        server.stop()
        sandbox.ctx.extra["approvals"] = ApprovalSettings()

    ids = Counter(r.probe.trace_id for rs in results.values() for r in rs)
    assert ids and max(ids.values()) == 1  # every probe reported once, by one instance
    assert a.counts["started"] == len(results["a"]) and b.counts["started"] == len(results["b"])
    down, up = outage
    for name, rs in results.items():
        for r in rs:
            (hop,) = r.hops
            assert hop.verdict in ("ok", "unknown"), (name, hop)
            # Blind from the outage until both ledgers reconnected (backoff <= 1 s) and resynced.
            overlaps = r.injection.sent_at < up + 3.5 and r.injection.sent_at + 2 + 5 > down
            if name == "a" or not overlaps:
                # A's own probes are matched locally; B's outside the outage through the ledger.
                assert hop.verdict == "ok", (name, hop)
                assert hop.lag >= 0.2, (name, hop)  # the funnel's webhook delay
    b_ok_remote = [r for r in results["b"] if r.hops[0].verdict == "ok"]
    assert len(b_ok_remote) >= 12
    # B's lags (matched through the ledger) look like A's (matched locally): no gross error in the
    # time that crossed (the exact stamp round trip is the first test). Compared within this run,
    # so a loaded machine slows both alike.
    a_lags = sorted(r.hops[0].lag for r in results["a"] if r.hops[0].verdict == "ok")
    b_lags = sorted(r.hops[0].lag for r in b_ok_remote)
    assert b_lags[len(b_lags) // 2] <= a_lags[len(a_lags) // 2] + 0.15, (a_lags, b_lags)
    # B could not hear from A during the outage: that window is blind for B's receiver (without
    # it, B's probes whose deadline fell in the outage would have been called lost).
    assert b.engine.collectors["webhook"].coverage.blind_start(down + 0.5, up - 0.5) is not None
    assert b.ledger.counters["applied"] >= len(b_ok_remote)  # B's oks came through A
    assert a.ledger.counters["published"] >= len(b_ok_remote)
    assert a.engine.collectors["webhook"].counters["matched"] == len(results["a"])


def test_flood_of_unrelated_payloads_no_false_match_and_bounded_queues(
    sandbox: Sandbox, redis_url: str
) -> None:
    port = free_port()
    sandbox.ctx.extra["approvals"] = ApprovalSettings(
        webhook_url=f"http://127.0.0.1:{port}/events", secret_path=SECRET, webhook_delay=0.2, emit_event=False
    )
    results: list[ProbeResult] = []
    peaks = {"outbox": 0, "retry": 0}
    statuses: Counter[int] = Counter()

    async def flood(n: int) -> None:
        async with httpx.AsyncClient() as client:
            for i in range(n):
                ids = " ".join(new_trace_id() for _ in range(random.randint(1, 3)))
                path = "events" if i % 4 else "other"
                body = {
                    "type": "approval.requested",
                    "data": {"trace_id": new_trace_id(), "note": f"{ids} {i}"},
                }
                resp = await client.post(f"http://127.0.0.1:{port}/{SECRET}/{path}", json=body)
                statuses[resp.status_code] += 1

    async def main() -> Canary:
        spec = load(approval_spec(sandbox, redis_url, "solo", port, ledger_extra=", max_sightings: 500"))
        canary = Canary(spec, http_port=None, on_result=results.append)
        await canary.start()
        ledger = canary.ledger
        assert isinstance(ledger, RedisLedger)

        async def watch_queues() -> None:
            while True:
                peaks["outbox"] = max(peaks["outbox"], len(ledger._outbox))
                peaks["retry"] = max(peaks["retry"], len(ledger._retry))
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch_queues())
        try:
            await asyncio.gather(*(flood(100) for _ in range(10)))
            await asyncio.sleep(2.5)  # retries of unowned ids happen after 2 s
        finally:
            watcher.cancel()
            await canary.shutdown()
        return canary

    try:
        canary = asyncio.run(main())
    finally:
        sandbox.ctx.extra["approvals"] = ApprovalSettings()

    assert statuses == {200: 1000}
    assert results and all(r.hops[0].verdict == "ok" for r in results)
    assert canary.engine.collectors["webhook"].counters["matched"] == len(results)  # no false match
    c = canary.ledger.counters
    assert c["published"] == 0 and c["received"] == 0  # nobody owns those ids: nothing queued anywhere
    assert c["unowned"] >= 750  # >= one per body on the hop path; bodies on other paths never offered
    assert peaks["outbox"] <= 500 and peaks["retry"] <= 1000
    r = redis.Redis.from_url(redis_url)
    assert r.keys("funnel-tracer:sight:*") == [] and r.keys("funnel-tracer:owner:*") == []


def test_overflowing_outbox_tells_other_instances_that_window_is_blind(redis_url: str) -> None:
    async def main() -> tuple[float, list[tuple[str, float, float]]]:
        spec = LedgerSpec(redis_url=redis_url, max_sightings=3)
        a, b = RedisLedger(spec, "a"), RedisLedger(spec, "b")
        notices: list[tuple[str, float, float]] = []
        b.on_blind = lambda sink, start, end: notices.append((sink, start, end))
        await a.start()
        await b.start()
        assert await a.wait_connected(5) and await b.wait_connected(5)
        t0 = clock.now()
        for i in range(5):  # synchronously: the publisher cannot run in between, 2 are dropped
            a.offer(Sighting(new_trace_id(), "webhook", "events", clock.stamp(t0 + i), "a"))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if notices:
                break
        await a.close()
        await b.close()
        assert a.counters["dropped"] == 2 and a.counters["blind_notices_sent"] == 1
        assert b.counters["blind_notices_received"] == 1
        return t0, notices

    t0, notices = asyncio.run(main())
    ((sink, start, end),) = notices
    # The two dropped sightings were made at t0 and t0 + 1: that is the window reported blind.
    assert sink == "webhook" and start == pytest.approx(t0, abs=1e-3) and end >= t0 + 1


def test_two_processes_never_run_as_one_instance_id(redis_url: str) -> None:
    """A second process with the same instance id would resume the first's live probes as its
    own and rewrite its records: it waits one lock_ttl (a killed predecessor's lock expires by
    then) and is refused. A graceful stop frees the id at once; a killed run's lock expires."""
    spec = LedgerSpec(redis_url=redis_url, namespace="lock-test", heartbeat=0.2)

    async def main() -> None:
        a, b = RedisLedger(spec, "same"), RedisLedger(spec, "same")
        await a.start()
        assert await a.wait_connected(5)
        probe = Probe(step="lead")
        a.put(InFlight(probe, {}, registered_at=probe.created_at))
        await b.start()
        t0 = clock.now()
        assert not await b.wait_connected(b.lock_ttl + 3)
        assert b.conflict is not None and "instance id 'same'" in b.conflict
        assert clock.now() - t0 >= b.lock_ttl  # it waited for a killed predecessor's lock first
        assert a.up and not b.up
        recs = await asyncio.to_thread(redis.Redis.from_url(redis_url).hlen, "lock-test:rec:same")
        assert recs == 1  # b wrote nothing over a's records
        await b.close()
        await a.close()
        c = RedisLedger(spec, "same")  # a stopped gracefully: the id is free at once
        await c.start()
        assert await c.wait_connected(1.5) and c.conflict is None
        # c is "killed": its lock stays until it expires; the next run gets in after it.
        c._closing = True
        for t in c._tasks:
            t.cancel()
        await asyncio.gather(*c._tasks, return_exceptions=True)
        d = RedisLedger(spec, "same")
        await d.start()
        t1 = clock.now()
        assert await d.wait_connected(d.lock_ttl + 3) and d.conflict is None
        assert clock.now() - t1 <= d.lock_ttl + 2
        await d.close()

    asyncio.run(main())
