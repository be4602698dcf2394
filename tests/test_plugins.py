"""Sinks and injectors are plugins: one defined outside the project's packages, installed as its
own distribution (tests/plugin_dist, installed by the README's test command), is validated, run
by ``check`` and reported, through the real ``funnel-tracer`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from tracer import plugins

BUILTIN_SINKS = {"posthog", "redis_dlq", "smtp", "webhook"}


@pytest.fixture(scope="module", autouse=True)
def _plugin_installed() -> None:
    try:
        distribution("funnel-tracer-linefile")
    except PackageNotFoundError:
        pytest.fail("the test plugin is not installed: pip install ./tests/plugin_dist (see the README)")


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tracer.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def spec(tmp_path: Path, written: str, watched: str, hop_extra: str = "") -> Path:
    p = tmp_path / "funnel.yaml"
    p.write_text(
        f"""
service: plugin-funnel
collectors:
  linefile: {{path: {watched}, interval: 50ms}}
steps:
  lead:
    spacing: 100ms
    inject:
      linefile: {{path: {written}, line: "lead {{trace_id}}"}}
    hops:
      - name: in_file
        target: 1s
        deadline: 1500ms
        linefile: {{prefix: "lead "{hop_extra}}}
"""
    )
    return p


def test_builtins_register_through_the_same_entry_points() -> None:
    assert BUILTIN_SINKS | {"linefile"} <= set(plugins.sinks())
    assert {"http", "redis_dlq", "linefile"} <= set(plugins.injectors())
    assert plugins.sinks()["posthog"].factory.__module__ == "collectors.posthog"


def test_a_third_party_sink_is_validated_with_yaml_paths(tmp_path: Path) -> None:
    log = tmp_path / "probes.log"
    ok = run("validate", "-c", str(spec(tmp_path, log, log)))
    assert ok.returncode == 0, ok.stderr
    assert "sinks: linefile" in ok.stdout
    bad = run("validate", "-c", str(spec(tmp_path, log, log, hop_extra=", prefx: x")))
    assert bad.returncode == 2
    assert "steps.lead.hops[0].linefile.prefx" in bad.stderr


def test_check_runs_and_reports_a_third_party_sink(tmp_path: Path) -> None:
    log = tmp_path / "probes.log"
    res = run(
        "check",
        "-c",
        str(spec(tmp_path, log, log)),
        "--samples",
        "3",
        "--quantile",
        "0.5",
        "--confidence",
        "0.8",
        "--format",
        "json",
    )
    assert res.returncode == 0, res.stderr
    (step,) = json.loads(res.stdout)["steps"]
    (hop,) = step["hops"]
    assert (hop["sink"], hop["verdict"], hop["verdicts"]["ok"]) == ("linefile", "ok", 3)
    assert 0 < hop["lag_s"]["max"] <= 1.0
    assert len(log.read_text().splitlines()) == 3


def test_a_third_party_sink_really_looks(tmp_path: Path) -> None:
    """Probes written where the sink does not look are lost (exit 1), not ok."""
    res = run(
        "check",
        "-c",
        str(spec(tmp_path, tmp_path / "elsewhere.log", tmp_path / "watched.log")),
        "--samples",
        "2",  # 2 of 2 lost disproves p95 <= target at 95 % (1 of 1 cannot)
        "--format",
        "json",
    )
    assert res.returncode == 1, res.stderr
    hop = json.loads(res.stdout)["steps"][0]["hops"][0]
    assert hop["verdict"] == "lost"


def test_help_lists_every_registered_sink_and_injector() -> None:
    out = run("--help").stdout
    for name in BUILTIN_SINKS | {"linefile"}:
        assert name in out
    assert "lines of a local file (a test plugin)" in out
