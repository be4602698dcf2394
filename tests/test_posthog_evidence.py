"""PostHog verdicts that explain themselves (issue 11 items 1, 3, 4; issue 12 item 5), on the real
sandbox: a wrong key fails fast, near misses name what arrived instead, the preflight catches setup
mistakes, and matching reaches beyond event properties."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_check import cli_check, spec_text
from tracer.sandbox.runner import Sandbox

pytestmark = pytest.mark.timeout(120)


def first_probe(stdout: str) -> dict:
    return json.loads(stdout)["steps"][0]["hops"][0]["probes"][0]


def test_a_wrong_personal_key_is_unknown_within_seconds_naming_http_401(sb: Sandbox) -> None:
    text = spec_text(sb, target="5s", deadline="60s").replace(
        "personal_api_key: phx_sandbox", "personal_api_key: phx_wrong"
    )
    started = time.monotonic()
    proc = cli_check(text, "--samples", "1", "--format", "json", "--no-preflight")
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert elapsed < 15, elapsed  # not the 60 s deadline
    probe = first_probe(proc.stdout)
    assert probe["verdict"] == "unknown"
    assert "HTTP 401" in probe["reason"] and "invalid" in probe["reason"], probe["reason"]
    assert "phx_wrong" not in proc.stdout + proc.stderr


def hop_on(sb: Sandbox, posthog: str, metadata: str = 'canary_trace_id: "{trace_id}"', **kw: str) -> str:
    """The check spec with its PostHog hop section and the lead's metadata replaced."""
    text = spec_text(sb, **kw)
    old_hop = 'posthog: {event: lead_captured, property: email, match: contains, value: "canary+{trace_id}@"}'
    assert old_hop in text and 'canary_trace_id: "{trace_id}"' in text
    return text.replace(old_hop, f"posthog: {posthog}").replace('canary_trace_id: "{trace_id}"', metadata)


def test_events_under_another_property_are_near_misses_naming_the_path(sb: Sandbox) -> None:
    text = hop_on(
        sb,
        "{event: lead_captured, property: canary_trace_id}",
        'trace_ref: "{trace_id}"',
        target="1s",
        deadline="2s",
    )
    time.sleep(2.5)  # the previous test's events are outside this window (1 s before the first probe)
    before = sb.posthog.queries
    proc = cli_check(text, "--samples", "2", "--format", "json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    probes = json.loads(proc.stdout)["steps"][0]["hops"][0]["probes"]
    for probe in probes:
        ev = probe["evidence"]
        assert probe["verdict"] == "lost"
        assert ev["near_misses"] > 0 and ev["found"]["events"] == ev["found"]["null_or_missing"] > 0
        reason = probe["reason"]
        assert "lead_captured event" in reason and "none with properties.canary_trace_id = " in reason, reason
        assert "had it null" in reason and reason.endswith("Check the property path."), reason
        assert probe["trace_id"] not in reason  # the expected value is trimmed
    # Both lost probes were explained by one grouped query, not one each.
    assert sb.posthog.queries - before < 40


def test_a_capture_key_of_no_project_shows_no_events_of_that_name(sb: Sandbox) -> None:
    sb.ctx.posthog_api_key, sb.ctx._client = "phc_another_project", None  # 200 and dropped
    try:
        text = hop_on(sb, "{event: lead_captured, property: canary_trace_id}", target="1s", deadline="2s")
        proc = cli_check(text, "--samples", "2", "--format", "json")
    finally:
        if sb.ctx._client is not None:
            sb.ctx._client.shutdown()
        sb.ctx.posthog_api_key, sb.ctx._client = sb.posthog.project_api_key, None
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert sb.posthog.dropped_unknown_key >= 2
    probe = first_probe(proc.stdout)
    assert probe["verdict"] == "lost" and probe["evidence"]["found"]["events"] == 0
    assert probe["evidence"]["near_misses"] == 0
    assert "no lead_captured events arrived at all in the window" in probe["reason"]
    assert "project key" in probe["reason"]
