"""Pointing the tracer at a real-looking funnel (issue 12): expiring logins, two-request probes with
captured ids, cleanup that leaves nothing behind, typed templates. Real sockets throughout: the
sandbox funnel (login, protected leads and approvals) and its PostHog, a private redis-server."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.canary_helpers import load
from tracer.canary import Canary
from tracer.engine import Engine, ProbeResult
from tracer.export.spans import make_provider
from tracer.sandbox.auth import AuthSettings
from tracer.sandbox.runner import Sandbox

pytestmark = pytest.mark.timeout(90)

POSTHOG = """
service: sandbox-funnel
collectors:
  posthog: {{host: "{posthog}", project_id: "1", personal_api_key: phx_sandbox, queries_per_minute: 6000,
             queries_per_hour: 360000, budget_share: 1.0, min_interval: 200ms, timeout: 2s}}
"""

LOGIN = """
auth:
  app:
    login:
      url: {funnel}/api/v1/auth/login
      json: {{username: canary, password: "{password}"}}
      token: {{json: access_token}}
      {expires}
"""

LEAD_STEP = """
steps:
  lead:
    interval: 300ms
    spacing: 100ms
    inject:
      http:
        url: {funnel}/api/v1/leads
        auth: {auth}
        json: {{email: "canary+{{trace_id}}@example.com", metadata: {{canary_trace_id: "{{trace_id}}"}}}}
        timeout: 2s
    hops:
      - name: posthog_event
        target: 1500ms
        deadline: 3s
        posthog: {{event: lead_captured, property: canary_trace_id, value: "{{trace_id}}"}}
"""


@pytest.fixture()
def authed() -> Iterator[Sandbox]:
    """A sandbox whose leads and approvals need a login token living 2 s."""
    with Sandbox(auth=AuthSettings(required=True, token_ttl=2.0)) as sb:
        yield sb


def run_canary(spec_text: str, seconds: float) -> list[ProbeResult]:
    results: list[ProbeResult] = []

    async def main() -> None:
        canary = Canary(load(spec_text), http_port=None, on_result=results.append)
        await canary.start()
        try:
            await asyncio.sleep(seconds)
        finally:
            await canary.shutdown()

    asyncio.run(main())
    return results


def verdicts(results: list[ProbeResult]) -> Counter[str]:
    return Counter(h.verdict for r in results for h in r.hops)


@pytest.mark.parametrize(
    "expires",
    [
        "expires_in: {json: expires_in}",  # refreshed before it expires
        "",  # the tracer is not told: the funnel's 401 triggers a login and one retry
    ],
    ids=["refresh-before-expiry", "refresh-on-401"],
)
def test_a_canary_across_token_expiries_never_fails_to_inject(authed: Sandbox, expires: str) -> None:
    spec = (
        POSTHOG.format(posthog=authed.posthog_url)
        + LOGIN.format(funnel=authed.url, password="sandbox-password", expires=expires)
        + LEAD_STEP.format(funnel=authed.url, auth="app")
    )
    results = run_canary(spec, 6.5)
    counts = verdicts(results)
    assert counts["inject_failed"] == 0, [h.reason for r in results for h in r.hops]
    assert counts["ok"] >= 8, counts
    stats = authed.auth_stats
    assert stats.logins >= 3  # 6.5 s across 2 s tokens: the token was replaced, not reused
    if expires:
        assert stats.rejected == 0  # always refreshed ahead of the expiry
    else:
        assert stats.expired >= 1  # an expired token met a 401 ... and the retry succeeded
        assert any(r.injection.attributes.get("funnel.auth.retried") for r in results)


def test_a_failed_login_is_inject_failed_with_a_secret_free_reason(authed: Sandbox) -> None:
    password = "wrong-Pa55word-xyz"
    spec = (
        POSTHOG.format(posthog=authed.posthog_url)
        + LOGIN.format(funnel=authed.url, password=password, expires="")
        + LEAD_STEP.format(funnel=authed.url, auth="app")
    )

    async def main() -> list[ProbeResult]:
        async with Engine(load(spec)) as engine:
            return await engine.check(1)

    (result,) = asyncio.run(main())
    (hop,) = result.hops
    assert hop.verdict == "inject_failed"
    assert hop.reason == "auth 'app': login failed: HTTP 401"
    assert password not in repr(load(spec)) and password not in json.dumps(result.injection.attributes)


def test_oauth2_and_token_command_authenticate(authed: Sandbox) -> None:
    """Client credentials against the sandbox's token endpoint; a command (no shell) that logs in
    itself and prints the token."""
    login = (
        "import json, urllib.request;"
        f"r = urllib.request.urlopen(urllib.request.Request('{authed.url}/api/v1/auth/login',"
        ' data=b\'{"username": "canary", "password": "sandbox-password"}\','
        " headers={'Content-Type': 'application/json'}));"
        "print(json.load(r)['access_token'])"
    )
    auth = f"""
auth:
  m2m:
    oauth2: {{token_url: "{authed.url}/oauth/token", client_id: canary, client_secret: sandbox-password, scope: leads}}
  cmd:
    command: {{argv: {json.dumps([sys.executable, "-c", login])}, timeout: 10s, ttl: 1s}}
"""
    for name in ("m2m", "cmd"):
        spec = (
            POSTHOG.format(posthog=authed.posthog_url) + auth + LEAD_STEP.format(funnel=authed.url, auth=name)
        )

        async def main(text: str = spec) -> list[ProbeResult]:
            async with Engine(load(text)) as engine:
                return await engine.check(2)

        results = asyncio.run(main())
        assert verdicts(results) == {"ok": 2}, (name, [h.reason for r in results for h in r.hops])


TWO_REQUESTS = """
steps:
  qualified:
    spacing: 200ms
    inject:
      http:
        requests:
          - name: create
            url: {funnel}/api/v1/leads
            auth: app
            json: {{email: "canary+{{trace_id}}@example.com", metadata: {{synthetic: true}}}}
            capture: {{lead_id: id}}
          - name: qualify
            url: "{funnel}/api/v1/leads/{{capture.lead_id}}/qualify"
            auth: app
            json: {{score: 42}}
    hops:
      - name: qualified_event                  # the event carries only the lead's id: the captured one matches it
        target: 2s
        deadline: 5s
        posthog: {{event: lead_qualified, property: lead_id, value: "{{capture.lead_id}}"}}
{cleanup}
"""


def test_a_two_request_probe_uses_its_capture_in_the_next_request_the_matcher_and_cleanup(
    authed: Sandbox,
) -> None:
    cleanup = f"""
    cleanup:
      - {{method: DELETE, url: "{authed.url}/api/v1/leads/{{capture.lead_id}}", auth: app}}
"""
    exporter = InMemorySpanExporter()

    async def main(text: str) -> list[ProbeResult]:
        async with Engine(load(text), provider=make_provider(exporter)) as engine:
            return await engine.check(3)

    head = POSTHOG.format(posthog=authed.posthog_url) + LOGIN.format(
        funnel=authed.url, password="sandbox-password", expires="expires_in: {json: expires_in}"
    )
    # Without cleanup the funnel keeps the synthetic leads (its count says so) ...
    kept = asyncio.run(main(head + TWO_REQUESTS.format(funnel=authed.url, cleanup="")))
    assert verdicts(kept) == {"ok": 3}, [h.reason for r in kept for h in r.hops]
    assert authed.synthetic_records()["leads"] == 3
    authed.ctx.extra["leads"].clear()

    # ... with it, none is left.
    exporter.clear()
    results = asyncio.run(main(head + TWO_REQUESTS.format(funnel=authed.url, cleanup=cleanup)))
    assert verdicts(results) == {"ok": 3}, [h.reason for r in results for h in r.hops]
    assert authed.synthetic_records() == {"leads": 0, "approvals": 0}
    for r in results:
        lead_id = r.probe.captures["lead_id"]
        assert lead_id.startswith("lead_")
        first, second = r.injection.requests
        assert second.attributes["url.full"].endswith(f"/api/v1/leads/{lead_id}/qualify")
        assert r.injection.sent_at == second.sent_at  # the start: the last request by default
        assert [(c.ok, c.status) for c in r.cleanup] == [(True, 200)]
    # One CLIENT span per request; the start's id is the one its traceparent named.
    spans = exporter.get_finished_spans()
    for r in results:
        mine = [
            s for s in spans if f"{s.context.trace_id:032x}" == r.probe.trace_id and s.kind == SpanKind.CLIENT
        ]
        ids = sorted(f"{s.context.span_id:016x}" for s in mine)
        assert ids == sorted([r.probe.inject_span_id, r.probe.request_span_id(0, 1)])


def test_dlq_entries_the_tracer_wrote_are_removed_once_their_hops_resolve(redis_url: str) -> None:
    spec = f"""
service: dlq-cleanup
collectors:
  redis_dlq: {{url: "{redis_url}", poll_interval: 100ms}}
steps:
  dlq:
    spacing: 100ms
    inject:
      redis_dlq:
        url: "{redis_url}"
        key: dlq:cleanup
        entry: {{id: "{{uuid}}", payload: {{trace_id: "{{trace_id}}"}}, attempt: 1, parked_at: "{{now_epoch_s}}"}}
    hops:
      - name: parked
        target: 1s
        redis_dlq: {{key: dlq:cleanup}}
"""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.rpush("dlq:cleanup", json.dumps({"id": "customer-entry", "payload": {}}))  # not ours: must stay
    seen: list[Any] = []

    async def main() -> list[ProbeResult]:
        async with Engine(load(spec)) as engine:
            orig = engine.injectors["dlq"].send

            async def send(probe: Any) -> Any:
                inj = await orig(probe)
                seen.extend(r.lrange("dlq:cleanup", 0, -1))  # typed template, as written
                return inj

            engine.injectors["dlq"].send = send  # type: ignore[method-assign]
            return await engine.check(3)

    results = asyncio.run(main())
    assert verdicts(results) == {"ok": 3}, [h.reason for res in results for h in res.hops]
    assert [json.loads(m)["id"] for m in r.lrange("dlq:cleanup", 0, -1)] == ["customer-entry"]
    assert all(o.ok and o.removed == 1 for res in results for o in res.cleanup)
    ours = [json.loads(m) for m in seen if "customer" not in m]
    assert ours and all(isinstance(e["parked_at"], int) for e in ours)  # "{now_epoch_s}" -> a number
    r.delete("dlq:cleanup")
