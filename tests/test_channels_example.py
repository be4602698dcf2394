"""examples/channels.yaml (real inbox, Slack channel, CRM search) validates, and bad channel
configs are named by their YAML path without echoing secrets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import tmp_yaml
from tracer.spec import load_spec

ENV = {
    "FUNNEL_API_URL": "https://api.example.com",
    "IMAP_HOST": "imap.gmail.com",
    "IMAP_USER": "approver-canary@example.com",
    "IMAP_PASSWORD": "app-password-123",
    "SLACK_BOT_TOKEN": "xoxb-1-2-abc",
    "SLACK_CHANNEL_ID": "C0123456789",
    "HUBSPOT_TOKEN": "pat-na1-secret",
}


def test_channels_example_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    spec = load_spec("examples/channels.yaml")
    sinks = {h.sink for step in spec.steps.values() for h in step.hops}
    assert sinks == {"imap", "slack", "http_json"}
    hop = next(h for h in spec.steps["approval"].hops if h.sink == "imap")
    assert hop.sink_spec.to == ENV["IMAP_USER"] and hop.sink_spec.where == ["subject", "body"]


def test_bad_channel_config_names_the_path_and_hides_the_secret() -> None:
    bad = tmp_yaml(
        """
service: x
collectors:
  slack: {token: "not-a-slack-token-s3cret", channels: [C1]}
  imap: {host: imap.example.com, username: a, password: "hunter2-s3cret", tls: none}
steps:
  a:
    inject: {http: {url: "https://api.example.com/x"}}
    hops: [{name: h, target: 1s, slack: {}}]
"""
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "validate", "-c", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "collectors.slack.token" in proc.stderr and "collectors.imap" in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout
