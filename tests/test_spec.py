"""Funnel spec validation: every problem names its YAML path, and the CLI exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import tmp_yaml
from tracer.spec import SpecError, load_spec

GOOD = """
service: shop
collectors:
  posthog: {host: "https://us.posthog.com", project_id: "42", personal_api_key: "${PH_KEY:-phx_test}"}
steps:
  lead:
    inject:
      http: {url: "https://api.example.com/api/v1/leads", json: {email: "canary+{trace_id}@example.com"}}
    hops:
      - name: posthog_event
        target: 5s
        posthog: {event: lead_captured, property: email, match: contains, value: "canary+{trace_id}@"}
"""

BAD = [
    # (yaml, expected path, expected message fragment)
    (
        GOOD.replace("posthog: {event: lead_captured, ", "posthog: {"),
        "steps.lead.hops[0].posthog.event",
        "field required",
    ),
    (GOOD.replace("target: 5s", "target: soon"), "steps.lead.hops[0].target", "not a duration"),
    (GOOD.replace('url: "https://api', 'uri: "https://api'), "steps.lead.inject.http.uri", "unknown field"),
    (
        GOOD.replace("https://api.example.com", "${MISSING_FUNNEL_URL}"),
        "steps.lead.inject.http.url",
        "MISSING_FUNNEL_URL is not set",
    ),
    (GOOD.replace("  posthog: {host:", "  posthogg: {host:"), "collectors.posthogg", "unknown field"),
    (
        GOOD.replace("        posthog: {event", "        redis_dlq: {key: dlq}\n        posthog: {event"),
        "steps.lead.hops[0]",
        "exactly one sink",
    ),
    (
        GOOD.replace("target: 5s", "target: 5s\n        deadline: 2s"),
        "steps.lead.hops[0]",
        "deadline must be at least",
    ),
    (
        GOOD.replace("match: contains", "match: fuzzy"),
        "steps.lead.hops[0].posthog.match",
        "'equals' or 'contains'",
    ),
    (GOOD.replace("service: shop\n", ""), "service", "field required"),
    (
        GOOD.replace("target: 5s", "target: 5s\n        after: nowhere"),
        "steps.lead",
        "must name an earlier hop",
    ),
]


def test_good_spec_loads_with_env_default() -> None:
    spec = load_spec(tmp_yaml(GOOD))
    hop = spec.steps["lead"].hops[0]
    assert hop.target == 5.0
    assert spec.deadline(hop) == 15.0  # default: deadline_factor 3 x target
    assert spec.collectors.posthog is not None
    assert spec.collectors.posthog.personal_api_key.get_secret_value() == "phx_test"


@pytest.mark.parametrize(("text", "path", "fragment"), BAD)
def test_bad_spec_names_yaml_path(text: str, path: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_yaml(text))
    problems = dict(info.value.problems)
    assert path in problems, problems
    assert fragment in problems[path]


def test_secret_values_never_in_errors_or_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PH_KEY", "phx_super_secret_value")
    spec = load_spec(tmp_yaml(GOOD))
    assert "phx_super_secret_value" not in repr(spec)
    bad = GOOD.replace('project_id: "42"', 'project_id: ""')
    with pytest.raises(SpecError) as info:
        load_spec(tmp_yaml(bad))
    assert "phx_super_secret_value" not in str(info.value)


@pytest.mark.parametrize("text", [BAD[0][0], "service: x\nsteps: [1\n", "- just\n- a list\n", ""])
def test_cli_validate_exits_2_with_path(text: str) -> None:
    path = tmp_yaml(text)
    proc = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "validate", "-c", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert "invalid funnel spec" in proc.stderr


def test_cli_validate_ok_and_missing_file() -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "validate", "-c", str(tmp_yaml(GOOD))],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "ok (1 steps" in ok.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "validate", "-c", "/nonexistent/funnel.yaml"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "cannot read file" in missing.stderr


def test_shipped_examples_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["examples/sandbox.yaml", "examples/posthog-cloud.yaml"]:
        monkeypatch.setenv("POSTHOG_PERSONAL_API_KEY", "phx_x")
        monkeypatch.setenv("POSTHOG_PROJECT_ID", "1")
        monkeypatch.setenv("FUNNEL_API_URL", "https://api.example.com")
        monkeypatch.setenv("MOYASAR_WEBHOOK_SECRET", "sk_test")
        monkeypatch.setenv("DLQ_REDIS_URL", "redis://redis.internal:6379/0")
        monkeypatch.setenv("RECEIVER_PATH_SECRET", "0123456789abcdef0123")
        monkeypatch.setenv("MAIL_RCPT_TOKEN", "0123456789abcdef")
        spec = load_spec(name)
        assert spec.steps, name


def test_templates_render_every_placeholder(monkeypatch: pytest.MonkeyPatch) -> None:
    from tracer.probe import Probe

    monkeypatch.setenv("CANARY_DOMAIN", "example.org")
    p = Probe(step="lead")
    out = p.render(
        {
            "a": "{trace_id}",
            "b": ["{probe_id}", "{now_iso}"],
            "c": "{now_epoch_ms}",
            "d": "{uuid}",
            "e": "x@{env:CANARY_DOMAIN}",
            "f": "{not_a_placeholder}",
            "g": 3,
        }
    )
    assert out["a"] == p.trace_id and len(p.trace_id) == 32 and int(p.trace_id, 16)
    assert out["b"][0] == p.probe_id and out["b"][1].endswith("Z")
    # Typed: a value that is exactly one placeholder keeps its native type.
    assert isinstance(out["c"], int) and out["c"] > 1_600_000_000_000 and len(out["d"]) == 36
    assert out["e"] == "x@example.org" and out["f"] == "{not_a_placeholder}" and out["g"] == 3
