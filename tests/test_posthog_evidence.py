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
