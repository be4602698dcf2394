"""The security canary: a mis-signed payment webhook must not reach PostHog."""

from __future__ import annotations

import asyncio

import yaml

from tracer.engine import Engine
from tracer.export.report import summarize
from tracer.sandbox.payments import PaymentSettings
from tracer.sandbox.runner import Sandbox
from tracer.spec import parse_spec

SPEC = """
service: sandbox-funnel
collectors:
  posthog: {{host: "{posthog}", project_id: "1", personal_api_key: phx_sandbox, queries_per_minute: 6000,
             queries_per_hour: 360000, budget_share: 1.0, min_interval: 200ms}}
steps:
  forged_payment:
    spacing: 100ms
    inject:
      http:
        url: {funnel}/api/v1/webhooks/payments
        sign: {{scheme: hmac, secret: sandbox-webhook-secret, tamper: true}}
        accept_status: [2xx, 4xx]
        json: {{id: "evt_{{probe_id}}", type: payment_paid,
                data: {{id: "pay_{{probe_id}}", status: paid, amount: 1, currency: SAR,
                        metadata: {{canary_trace_id: "{{trace_id}}"}}}}}}
    hops:
      - name: not_in_posthog
        expect: absent
        target: 2s
        posthog: {{event: payment_succeeded, property: canary_trace_id}}
"""


def run(sb: Sandbox, samples: int = 2) -> dict:
    spec = parse_spec(yaml.safe_load(SPEC.format(posthog=sb.posthog_url, funnel=sb.url)))

    async def go():
        async with Engine(spec) as engine:
            return await engine.check(samples, early_stop=False)  # both samples, even after a breach

    results = asyncio.run(go())
    assert all(r.injection.status in (401, 200) for r in results)
    # p50 at 75 % confidence: two clean probes show it (0.5^2 <= 0.25).
    return summarize(spec, results, quantile=0.5, confidence=0.75)


def test_rejected_forgery_is_ok(sb: Sandbox) -> None:
    sb.ctx.extra["payments"] = PaymentSettings()
    report = run(sb)
    hop = report["steps"][0]["hops"][0]
    assert hop["verdicts"]["ok"] == 2 and report["exit_code"] == 0


def test_accepted_forgery_is_a_breach_exit_1(sb: Sandbox) -> None:
    sb.ctx.extra["payments"] = PaymentSettings(accept_unsigned=True)  # a misconfigured funnel
    report = run(sb)
    hop = report["steps"][0]["hops"][0]
    assert hop["verdicts"]["breach"] == 2 and report["exit_code"] == 1
    assert all("should have been rejected" in p["reason"] for p in hop["probes"])
