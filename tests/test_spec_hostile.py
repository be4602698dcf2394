"""Hostile and careless specs and command lines: each gives one clear line and exit 2, fast,
never a traceback, a hang, exit 1 ("late/lost"), or a secret echoed into a CI log."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_spec import GOOD


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def write(tmp_path: Path, text: str | bytes, name: str = "funnel.yaml") -> str:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def assert_usage_error(res: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert fragment in res.stderr, res.stderr


BILLION_LAUGHS = """
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
service: "${X:-y}"
steps: {s: *i}
"""


def test_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    res = cli("validate", "-c", write(tmp_path, BILLION_LAUGHS))
    assert_usage_error(res, "YAML aliases")
    assert time.monotonic() - started < 10  # process start included; the check itself is linear


def test_modest_aliases_still_work(tmp_path: Path) -> None:
    text = GOOD.replace("target: 5s", "target: &t 5s\n        deadline: *t")
    res = cli("validate", "-c", write(tmp_path, text))
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"service: \xff\xfe shop\n", "not UTF-8 text (byte 0xff"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than"),
        ("a: " + "[" * 70 + "]" * 70 + "\n", "nested more than 64"),
        (GOOD.replace("service: shop", "service: shop\nservice: other"), "duplicate key 'service'"),
        ("a: &a [*a]\n", "a YAML alias refers to itself"),
        ("service: [unclosed\n", "not valid YAML (line"),
    ],
)
def test_malformed_files_give_one_line(tmp_path: Path, content: str | bytes, fragment: str) -> None:
    res = cli("validate", "-c", write(tmp_path, content))
    assert_usage_error(res, fragment)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_non_regular_file_is_refused_without_reading_it() -> None:
    res = cli("validate", "-c", "/dev/zero", timeout=10)
    assert_usage_error(res, "not a regular file")


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    res = cli("validate", "-c", write(tmp_path, "# " + "x" * (2 << 20) + "\n"))
    assert_usage_error(res, "larger than")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999", "'1e999s'", "0", "-1s"])
def test_durations_must_be_finite_and_positive(tmp_path: Path, value: str) -> None:
    res = cli("validate", "-c", write(tmp_path, GOOD.replace("target: 5s", f"target: {value}")))
    assert_usage_error(res, "steps.lead.hops[0].target")


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("target: 5s", "target: 5s\n    interval: 1ms", "steps.lead.interval"),
        ("json: {email:", "timeout: 1ms, json: {email:", "steps.lead.inject.http.timeout"),
    ],
)
def test_intervals_and_timeouts_have_lower_bounds(tmp_path: Path, old: str, new: str, path: str) -> None:
    text = GOOD.replace(old, new)
    if "interval" in new:  # the step key, not the hop's
        text = GOOD.replace("    inject:", "    interval: 1ms\n    inject:")
    res = cli("validate", "-c", write(tmp_path, text))
    assert_usage_error(res, path)


def test_an_error_never_echoes_a_value_from_the_environment(tmp_path: Path) -> None:
    secret = "sk_live_51HxTotallySecretValue"
    text = GOOD.replace("target: 5s", "target: ${LEAD_TARGET}").replace(
        "name: posthog_event", "name: posthog_event\n        deadline: ${LEAD_TARGET}"
    )
    res = cli("validate", "-c", write(tmp_path, text), env={"LEAD_TARGET": secret})
    assert_usage_error(res, "steps.lead.hops[0].target")
    assert secret not in res.stderr + res.stdout
    # A validator that quotes its value (after: names a hop) is redacted the same way.
    text = GOOD.replace("target: 5s", "target: 5s\n        after: ${AFTER_HOP}")
    res = cli("validate", "-c", write(tmp_path, text), env={"AFTER_HOP": secret})
    assert res.returncode == 2 and secret not in res.stderr, res.stderr
    assert "${AFTER_HOP}" in res.stderr


def receiver_spec(port: int) -> str:
    return f"""
service: shop
collectors:
  webhook: {{host: 127.0.0.1, port: {port}, secret_path: s3cretpath, allow_unauthenticated: true}}
steps:
  approval:
    inject:
      http: {{url: "http://127.0.0.1:9/approvals", json: {{id: "{{trace_id}}"}}}}
    hops:
      - name: notified
        target: 1s
        webhook: {{path: events}}
"""


def test_a_receiver_port_already_taken_is_a_setup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = write(tmp_path, receiver_spec(port))
        if cli("validate", "-c", spec).returncode != 0:  # older receiver options
            spec = write(tmp_path, receiver_spec(port).replace(", allow_unauthenticated: true", ""))
        res = cli("check", "-c", spec, "--samples", "1")
    assert_usage_error(res, "collectors.webhook: cannot start")


@pytest.mark.parametrize("option", ["--junit", "--html"])
def test_an_unwritable_report_path_fails_before_any_probe(tmp_path: Path, option: str) -> None:
    spec = write(tmp_path, GOOD)
    started = time.monotonic()
    res = cli("check", "-c", spec, "--samples", "1", option, str(tmp_path / "no" / "such" / "dir" / "r.xml"))
    assert_usage_error(res, f"{option} ")
    assert time.monotonic() - started < 15  # no probe was waited for
