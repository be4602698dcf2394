"""A whole spec over real processes: lead -> CRM contact (http_json), approval -> the approver's
real mailbox (imap, on a private Dovecot behind an SMTP relay) and -> the Slack channel's history
(slack), run by `funnel-tracer check` against the sandbox funnel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests import dovecot
from tests.support import tmp_yaml
from tracer.sandbox.approvals import ApprovalSettings
from tracer.sandbox.runner import Sandbox

pytestmark = pytest.mark.timeout(120)

if not dovecot.available():
    if os.environ.get("CI") == "true":
        raise RuntimeError(dovecot.HOW_TO_GET)
    pytest.skip(dovecot.HOW_TO_GET, allow_module_level=True)

SPEC = """
service: sandbox-channels
collectors:
  imap:
    host: 127.0.0.1
    port: {imaps}
    tls: imaps
    ca_file: {cert}
    username: ana
    password: ana-secret
    idle_refresh: 1s
    cleanup: delete
  slack:
    api_url: {slack}
    token: xoxb-sandbox-0000-token
    channels: [C0APPROVALS]
    requests_per_minute: 600
    budget_share: 1.0
    min_interval: 250ms
  http_json:
    request:
      method: POST
      url: {funnel}/crm/v3/objects/contacts/search
      json:
        filterGroups: [{{filters: [{{propertyName: canary_trace_id, operator: IN, values: "{{trace_ids}}"}}]}}]
        properties: [email, canary_trace_id]
        limit: 100
    bearer: pat-sandbox-crm
    items: results
    match: {{path: properties.canary_trace_id, mode: equals}}
    timestamp: createdAt
    requests_per_minute: 600
    budget_share: 1.0
    min_interval: 250ms
steps:
  lead:
    spacing: 200ms
    inject:
      http:
        url: {funnel}/api/v1/leads
        json: {{email: "canary+{{trace_id}}@example.com", name: Canary, metadata: {{canary_trace_id: "{{trace_id}}"}}}}
    hops:
      - {{name: crm_contact, target: 5s, deadline: 20s, http_json: {{}}}}
  approval:
    spacing: 200ms
    inject:
      http:
        url: {funnel}/api/v1/approvals
        json: {{resource: "invoice/{{probe_id}}", requester: "canary+{{trace_id}}@example.com",
               metadata: {{canary_trace_id: "{{trace_id}}"}}}}
    hops:
      - {{name: inbox, target: 10s, deadline: 30s, imap: {{to: ana@funnel.invalid, where: [body]}}}}
      - {{name: slack_channel, target: 10s, deadline: 30s, slack: {{channel: C0APPROVALS}}}}
"""


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[dovecot.Dovecot, Sandbox]]:
    d = dovecot.Dovecot().start()
    relay = dovecot.SmtpRelay(d)
    approvals = ApprovalSettings(
        smtp_host="127.0.0.1", smtp_port=relay.port, approver_email="ana@funnel.invalid"
    )
    sb = Sandbox(approvals=approvals).start()
    approvals.slack_api_url = sb.slack_api_url
    sb.ctx.crm.delay = 0.3
    try:
        yield d, sb
    finally:
        sb.stop()
        relay.stop()
        d.close()


def test_spec_measures_inbox_slack_and_crm_hops(world: tuple[dovecot.Dovecot, Sandbox]) -> None:
    d, sb = world
    spec = tmp_yaml(SPEC.format(imaps=d.imaps_port, cert=d.cert, slack=sb.slack_api_url, funnel=sb.url))
    proc = subprocess.run(
        # p50 at 75 % confidence: two clean probes per hop show it (0.5^2 <= 0.25).
        [sys.executable, "-m", "tracer.cli", "check", "-c", str(spec), "--samples", "2"]
        + ["--quantile", "0.5", "--confidence", "0.75", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=100,
        env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    hops = {(s["step"], h["hop"]): h for s in report["steps"] for h in s["hops"]}
    assert set(hops) == {("lead", "crm_contact"), ("approval", "inbox"), ("approval", "slack_channel")}
    for key, hop in hops.items():
        assert hop["verdicts"]["ok"] == 2, (key, hop)
    assert hops[("lead", "crm_contact")]["lag_s"]["p50"] >= 0.3, hops  # the CRM sync delay
    assert (
        "ana-secret" not in proc.stdout + proc.stderr and "pat-sandbox-crm" not in proc.stdout + proc.stderr
    )
