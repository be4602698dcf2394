"""``funnel-tracer doctor``: a preflight that injects nothing, one line per check, exit 0/1/2;
``check`` runs the same checks first."""

from __future__ import annotations

import subprocess
import sys

from tests.support import free_port, tmp_yaml
from tracer.sandbox.runner import Sandbox

SPEC = """
service: shop
collectors:
  linefile: {{path: {log}, interval: 50ms}}
steps:
  lead:
    inject:
      http: {{url: "{url}/api/v1/leads", json: {{email: "canary+{{trace_id}}@example.com"}}, timeout: 2s}}
    hops:
      - {{name: in_file, target: 1s, deadline: 1s, linefile: {{prefix: ""}}}}
"""


def doctor(text: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracer.cli", "doctor", "-c", str(tmp_yaml(text)), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_healthy_setup_exit_0_and_nothing_injected(sandbox: Sandbox, tmp_path) -> None:
    before = sandbox.posthog.captured
    res = doctor(SPEC.format(log=tmp_path / "x.log", url=sandbox.url))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"ok   steps.lead.inject.http: {sandbox.url}/api/v1/leads answers" in res.stdout
    assert res.stdout.strip().endswith("all checks passed")
    assert sandbox.posthog.captured == before  # a HEAD, not a lead: no event was emitted


def test_an_unreachable_funnel_is_a_problem_with_a_fix(tmp_path) -> None:
    res = doctor(SPEC.format(log=tmp_path / "x.log", url=f"http://127.0.0.1:{free_port()}"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL steps.lead.inject.http" in res.stdout and "connection refused" in res.stdout
    assert "fix: check the URL" in res.stdout
    assert "1 problem(s) found" in res.stdout


def test_a_bad_config_is_exit_2(tmp_path) -> None:
    res = doctor(SPEC.format(log=tmp_path / "x.log", url="ftp://nope"))
    assert res.returncode == 2


def test_check_prints_preflight_problems_before_probing(tmp_path) -> None:
    text = SPEC.format(log=tmp_path / "x.log", url=f"http://127.0.0.1:{free_port()}")
    res = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "check", "-c", str(tmp_yaml(text)), "--samples", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 3  # inject_failed: could not measure
    assert "preflight: FAIL steps.lead.inject.http" in res.stderr
    skipped = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "check", "-c", str(tmp_yaml(text)), "-n", "1", "--no-preflight"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "preflight:" not in skipped.stderr
