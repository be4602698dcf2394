"""The generic JSON API collector over real HTTP, against the sandbox's CRM contact search
(HubSpot-style): leads captured by the funnel become contacts after a known delay."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from collectors.http_json import HttpJsonCollector, HttpJsonConfig, poll_interval, render
from tracer import clock
from tracer.probe import Probe, new_trace_id
from tracer.sandbox.crm import CrmState
from tracer.sandbox.runner import Sandbox
from tracer.spec import HopSpec
from tracer.verdict import LOST, UNKNOWN, judge_present
from tracer.watch import Watch

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


@pytest.fixture()
def sb(sandbox: Sandbox) -> Iterator[Sandbox]:
    yield sandbox
    sandbox.ctx.crm.delay, sandbox.ctx.crm.fault, sandbox.ctx.crm.retry_after = 0.0, None, None


def search_config(sb: Sandbox, **over: Any) -> HttpJsonConfig:
    """HubSpot's contact search, one request for every probe in flight (an IN filter)."""
    base: dict[str, Any] = {
        "request": {
            "method": "POST",
            "url": f"{sb.url}/crm/v3/objects/contacts/search",
            "json": {
                "filterGroups": [
                    {
                        "filters": [
                            {"propertyName": "canary_trace_id", "operator": "IN", "values": "{trace_ids}"}
                        ]
                    }
                ],
                "properties": ["email", "canary_trace_id"],
                "limit": 100,
            },
        },
        "bearer": sb.ctx.crm.token,
        "items": "results",
        "match": {"path": "properties.canary_trace_id", "mode": "equals"},
        "timestamp": "createdAt",
        "requests_per_minute": 600,
        "budget_share": 1.0,
        "min_interval": "200ms",
        "max_backoff": "1s",
    }
    base.update(over)
    return HttpJsonConfig(**base)


def watch(target: float = 5) -> Watch:
    return Watch(
        probe=Probe(step="lead"), hop=HopSpec(name="crm", target=target, http_json={}), since=clock.now()
    )


def run(main: Callable[[HttpJsonCollector], Awaitable[None]], cfg: HttpJsonConfig) -> HttpJsonCollector:
    col = HttpJsonCollector(cfg)

    async def go() -> None:
        await col.start()
        try:
            await main(col)
        finally:
            await col.close()

    asyncio.run(go())
    return col


async def lead(sb: Sandbox, trace_id: str) -> None:
    async with httpx.AsyncClient() as http:
        resp = await http.post(
            f"{sb.url}/api/v1/leads",
            json={
                "email": f"canary+{trace_id}@example.com",
                "name": "Canary",
                "metadata": {"canary_trace_id": trace_id},
            },
        )
    assert resp.status_code == 201


def test_lead_to_crm_lag_within_delay_plus_error_bar_one_request_per_cycle(sb: Sandbox) -> None:
    sb.ctx.crm.delay = 0.5

    async def main(col: HttpJsonCollector) -> None:
        ws = [watch() for _ in range(10)]
        for w in ws:
            col.watch(w)
        t0 = clock.now()
        searches0, requests0 = sb.ctx.crm.searches, col.requests
        await asyncio.gather(*(lead(sb, w.trace_id) for w in ws))
        for w in ws:
            assert await w.wait_seen(5), col.health()
        offset = clock.wall(t0) - t0  # epoch - monotonic
        for w in ws:
            obs = w.first
            assert obs is not None and obs.sink_time is not None
            created = obs.sink_time - offset  # the CRM's createdAt: the ground truth of arrival
            assert created - t0 >= 0.5 - 0.01 and obs.at - t0 >= 0.5  # the known CRM sync delay
            # seen within one cycle of arriving (ms-grained createdAt, hence the 10 ms slack)
            assert obs.not_before - 0.01 <= created <= obs.at + 0.01, (obs, created)
            assert obs.at - created <= col.error_bar + 0.3
            assert obs.error_bar <= col.error_bar + 0.3
        # ten probes, one search a cycle: requests made == searches the CRM served
        assert (
            sb.ctx.crm.searches - searches0
            == col.requests - requests0
            <= (clock.now() - t0) / col.interval + 2
        )

    run(main, search_config(sb))


def test_crm_outage_gives_unknown_not_lost(sb: Sandbox) -> None:
    for retroactive in (True, False):

        async def main(col: HttpJsonCollector) -> None:
            start = clock.now()
            during, never = watch(target=0.5), watch(target=0.5)
            col.watch(during)
            col.watch(never)
            await asyncio.sleep(0.4)
            sb.ctx.crm.fault = 503
            await asyncio.sleep(0.5)
            assert col.coverage.blind_now and not col.health()["up"]
            await lead(sb, during.trace_id)  # captured while the CRM API is down
            await asyncio.sleep(0.5)
            sb.ctx.crm.fault = None
            assert await during.wait_seen(5), col.health()
            assert judge_present(during.first, start, 0.5, 30, col.coverage, certified=True)[0] == UNKNOWN
            missing = judge_present(None, start, 0.5, 1.2, col.coverage, certified=True)[0]
            # A search (retroactive) would have found it after the outage: lost is then the truth.
            # A feed that forgets (retroactive: false) cannot say: unknown.
            assert missing == (LOST if col.coverage.retroactive else UNKNOWN)

        run(main, search_config(sb, retroactive=retroactive))


def test_429_obeys_retry_after_and_the_token_stays_secret(sb: Sandbox) -> None:
    async def main(col: HttpJsonCollector) -> None:
        col.watch(watch())
        await asyncio.sleep(0.3)
        sb.ctx.crm.retry_after = 1.5
        await asyncio.sleep(0.3)
        n = sb.ctx.crm.searches
        await asyncio.sleep(1.0)
        assert sb.ctx.crm.searches - n <= 1 and col.coverage.blind_now
        sb.ctx.crm.retry_after = None
        h = col.health()
        assert sb.ctx.crm.token not in repr(h) and "429" in str(h["last_error"])

    cfg = search_config(sb)
    run(main, cfg)
    assert sb.ctx.crm.token not in repr(cfg)


def test_a_thousand_unrelated_contacts_match_nothing(sb: Sandbox) -> None:
    """No filter, 'any string contains': every contact in one answer, scanned."""
    crm: CrmState = sb.ctx.crm

    async def main(col: HttpJsonCollector) -> None:
        ws = [watch() for _ in range(5)]
        for w in ws:
            col.watch(w)
        target = ws[0]
        near = target.trace_id[:-1] + ("0" if target.trace_id[-1] != "0" else "1")
        crm.contacts.clear()  # one page of 1,001 (earlier tests added contacts too)
        for i in range(1000):
            crm.add({"email": f"u{i}+{new_trace_id()}@example.com", "note": f"{near} {near.upper()}"})
        crm.add({"email": f"canary+{target.trace_id}@example.com"})
        assert await target.wait_seen(5), col.health()
        await asyncio.sleep(0.5)
        assert [w for w in ws if w.observations] == [target]

    cfg = search_config(
        sb,
        request={"method": "POST", "url": f"{sb.url}/crm/v3/objects/contacts/search",
                 "json": {"properties": ["email", "note"], "limit": 2000}},
        match={},
    )  # fmt: skip
    assert cfg.match.path is None
    run(main, cfg)


def test_templates_budget_and_config_errors() -> None:
    assert render({"v": "{trace_ids}", "l": ["{trace_ids}", "x"], "q": "id:{trace_ids}"}, ["a", "b"], 0) == {
        "v": ["a", "b"], "l": ["a", "b", "x"], "q": "id:a,b"
    }  # fmt: skip
    cfg = HttpJsonConfig(
        request={"url": "https://api.example.com/x"}, requests_per_minute=100, budget_share=0.5
    )
    assert poll_interval(cfg) == pytest.approx(1.2) and poll_interval(cfg, 3) == pytest.approx(3.6)
    with pytest.raises(ValidationError, match="JMESPath"):
        HttpJsonConfig(request={"url": "https://api.example.com/x"}, items="results[")
    with pytest.raises(ValidationError, match="http"):
        HttpJsonConfig(request={"url": "ftp://x"})
