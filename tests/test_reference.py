"""The reference is generated from the spec models: the JSON Schema accepts every example spec, the
committed docs are current, `init` writes a valid spec, and `validate` suggests a misspelt name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tracer import reference
from tracer.spec import SpecError, load_spec, parse_spec
from tracer.starter import starter_spec

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = (
    "regenerate with: funnel-tracer schema --builtin-only > docs/funnel-spec.schema.json && "
    "funnel-tracer schema --builtin-only --markdown > docs/REFERENCE.md"
)
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def as_deployed(text: str, env: dict[str, str]) -> object:
    """The YAML a deployer's editor checks once ${VARS} are set (numbers stay numbers)."""
    return yaml.safe_load(_ENV.sub(lambda m: env.get(m.group(1), m.group(2) or "x"), text))


EXAMPLE_ENV = {
    "POSTHOG_PROJECT_ID": "12345",
    "POSTHOG_PERSONAL_API_KEY": "phx_test",
    "MOYASAR_WEBHOOK_SECRET": "whsec",
    "DLQ_REDIS_URL": "redis://127.0.0.1:6379/0",
    "RECEIVER_PATH_SECRET": "s3cret-path",
    "FUNNEL_API_URL": "https://api.example.com",
}


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates_against_the_printed_json_schema(path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "schema"], capture_output=True, text=True, check=True
    )
    schema = yaml.safe_load(proc.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(as_deployed(path.read_text(), EXAMPLE_ENV))


def test_the_schema_rejects_what_the_models_reject() -> None:
    schema = reference.json_schema()
    validator = jsonschema.Draft202012Validator(schema)
    good = {"service": "s", "steps": {"a": {"inject": {"http": {"url": "http://x"}}, "hops": []}}}
    errors = [e.message for e in validator.iter_errors({**good, "servce": "typo"})]
    assert any("servce" in m for m in errors), errors
    assert not [e for e in validator.iter_errors(good) if "servce" in e.message]


def test_committed_reference_and_schema_are_current() -> None:
    assert (ROOT / "docs" / "REFERENCE.md").read_text() == reference.markdown(builtin_only=True), REGENERATE
    assert (ROOT / "docs" / "funnel-spec.schema.json").read_text() == reference.schema_text(
        builtin_only=True
    ), REGENERATE


def test_reference_documents_every_option_of_the_builtin_models() -> None:
    text = reference.markdown(builtin_only=True)
    schema = reference.json_schema(builtin_only=True)
    for name, node in schema["$defs"].items():
        assert f"## {name}" in text
        for option in node.get("properties", {}):
            assert f"| `{option}` |" in text, (name, option)
    for option in ("attempt_field", "first_attempt", "timestamp_field", "trace_path", "meta_hash", "mode"):
        assert f"| `{option}` |" in text, option


INIT_ENV = {
    "FUNNEL_URL": "https://app.example.com",
    "FUNNEL_USER": "canary",
    "FUNNEL_PASSWORD": "pw",
    "POSTHOG_HOST": "https://us.posthog.com",
    "POSTHOG_PROJECT_ID": "12345",
    "POSTHOG_PERSONAL_API_KEY": "phx_x",
    "DLQ_REDIS_URL": "redis://127.0.0.1:6379/0",
    "WEBHOOK_SECRET_PATH": "s3cret-path",
    "SMTP_RCPT_TOKEN": "mailtoken",
}


@pytest.mark.parametrize(
    "flags",
    [["--posthog", "--redis-dlq", "--webhook", "--smtp"], ["--redis-dlq"], ["--smtp"], []],
    ids=lambda f: " ".join(f) or "default",
)
def test_init_writes_a_spec_valid_once_its_vars_are_set(
    tmp_path: Path, flags: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "funnel.yaml"
    env = {k: v for k, v in os.environ.items() if k not in INIT_ENV}
    subprocess.run([sys.executable, "-m", "tracer.cli", "init", *flags, "-o", str(out)], check=True, env=env)
    text = out.read_text()
    assert text.startswith("# funnel-tracer starter spec") and "# yaml-language-server: $schema=" in text
    # Unset variables: validate names them (exit 2) ...
    proc = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "validate", "-c", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2 and "is not set" in proc.stderr + proc.stdout
    # ... set: valid as written, for the models and for the JSON Schema.
    proc = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "validate", "-c", str(out)],
        capture_output=True,
        text=True,
        env={**env, **INIT_ENV},
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    jsonschema.Draft202012Validator(reference.json_schema()).validate(as_deployed(text, INIT_ENV))
    sinks = {"--posthog": "posthog", "--redis-dlq": "redis_dlq", "--webhook": "webhook", "--smtp": "smtp"}
    for k, v in INIT_ENV.items():
        monkeypatch.setenv(k, v)
    spec = load_spec(out)
    used = {h.sink for s in spec.steps.values() for h in s.hops}
    assert used == ({sinks[f] for f in flags} or {"posthog"})


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "funnel.yaml"
    out.write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "tracer.cli", "init", "-o", str(out)], capture_output=True)
    assert proc.returncode == 2 and out.read_text() == "mine"
    assert "--posthog" not in starter_spec(redis_dlq=True).split("\n")[0]


def test_unknown_field_suggests_the_nearest_valid_name() -> None:
    base = {
        "service": "s",
        "collectors": {"redis_dlq": {"url": "redis://127.0.0.1:6379/0"}},
        "steps": {
            "dlq": {
                "inject": {"redis_dlq": {"url": "redis://127.0.0.1:6379/0", "key": "k"}},
                "hops": [{"name": "r", "target": "1s", "redis_dlq": {"key": "k", "attempt_feild": "tries"}}],
            }
        },
    }
    with pytest.raises(SpecError) as exc:
        parse_spec(base)
    assert exc.value.problems == [
        ("steps.dlq.hops[0].redis_dlq.attempt_feild", "unknown field (did you mean `attempt_field`?)")
    ]
    base["servise"] = "typo"
    base["steps"]["dlq"]["hops"][0]["redis_dlq"].pop("attempt_feild")
    with pytest.raises(SpecError) as exc:
        parse_spec(base)
    assert ("servise", "unknown field (did you mean `service`?)") in exc.value.problems
    base.pop("servise")
    base["zzz_nothing_like_it"] = 1
    with pytest.raises(SpecError) as exc:
        parse_spec(base)
    assert exc.value.problems == [
        ("zzz_nothing_like_it", "unknown field (check the spelling; see docs/REFERENCE.md)")
    ]


def test_capture_and_auth_references_are_checked_at_load() -> None:
    step = {
        "inject": {"http": {"url": "http://x/leads", "auth": "app", "capture": {"lead_id": "id"}}},
        "hops": [{"name": "h", "target": "1s", "webhook": {"path": "p"}}],
        "cleanup": [{"method": "DELETE", "url": "http://x/leads/{capture.lead_idd}"}],
    }
    spec = {"service": "s", "collectors": {"webhook": {"secret_path": "s3cret"}}, "steps": {"lead": step}}
    with pytest.raises(SpecError) as exc:
        parse_spec(spec)
    (problem,) = exc.value.problems
    assert problem[0] == "steps.lead" and "{capture.lead_idd}" in problem[1] and "lead_id" in problem[1]
    step["cleanup"][0]["url"] = "http://x/leads/{capture.lead_id}"
    with pytest.raises(SpecError) as exc:
        parse_spec(spec)
    assert exc.value.problems == [
        ("steps.lead.inject.http.auth", "no auth entry 'app' (auth: none declared)")
    ]
    spec["auth"] = {"app": {"token": "t0ken"}}
    assert parse_spec(spec).steps["lead"].cleanup[0].url.endswith("{capture.lead_id}")
