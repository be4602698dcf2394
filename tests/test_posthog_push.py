"""PostHog by push and poll together: a realtime destination posts to our webhook receiver while
the poller queries; the report says what each saw and when."""

from __future__ import annotations

import asyncio

import yaml

from tracer.engine import Engine
from tracer.sandbox.funnel import Knobs
from tracer.sandbox.posthog import PostHogState
from tracer.sandbox.runner import Sandbox
from tracer.spec import parse_spec

SPEC = """
service: sandbox-funnel
collectors:
  webhook: {{port: 0, secret_path: push-test-secret}}
  posthog:
    host: {posthog}
    project_id: "1"
    personal_api_key: phx_sandbox
    queries_per_minute: 60
    queries_per_hour: 3600
    budget_share: 1.0
    push_path: posthog
steps:
  lead:
    spacing: 200ms
    inject:
      http:
        url: {funnel}/api/v1/leads
        json: {{email: "canary+{{trace_id}}@example.com", metadata: {{canary_trace_id: "{{trace_id}}"}}}}
    hops:
      - name: posthog_event
        target: 5s
        posthog: {{event: lead_captured, property: canary_trace_id}}
"""


def test_push_and_poll_both_report_and_push_is_first() -> None:
    delay, ingest = 0.2, 0.3
    with Sandbox(knobs=Knobs(lead_delay=delay), posthog=PostHogState(ingest_delay=ingest)) as sb:
        spec = parse_spec(yaml.safe_load(SPEC.format(posthog=sb.posthog_url, funnel=sb.url)))

        async def go():
            async with Engine(spec) as engine:
                assert engine.collectors["posthog"].interval == 1.0  # 60/min budget: 1 s poll
                sb.posthog.destinations = [engine.collectors["webhook"].endpoint("posthog")]
                return await engine.check(3)

        results = asyncio.run(go())
    for r in results:
        (hop,) = r.hops
        assert hop.verdict == "ok"
        assert set(hop.sources) == {"push", "poll"}, hop.sources
        # The destination fires at ingestion: within the ground truth plus loopback overhead.
        assert delay + ingest <= hop.sources["push"] <= delay + ingest + 0.25
        assert hop.sources["push"] <= hop.sources["poll"]
        assert (
            abs(hop.lag - min(hop.sources.values())) < 1e-5 and hop.error_bar < 0.05
        )  # push: no poll cadence
