"""Receivers explain a lost hop (what reached them instead, and why it was turned away) and the
doctor checks their ports and authentication; real sockets, the sandbox funnel, the engine."""

from __future__ import annotations

import asyncio
import json
import smtplib
import socket
import subprocess
import sys
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
import yaml

from collectors import webhook
from collectors.webhook import WebhookCollector, WebhookConfig
from tests.support import free_port, tmp_yaml
from tracer import clock
from tracer.engine import Engine
from tracer.evidence import Evidence
from tracer.probe import Probe, new_trace_id
from tracer.receipts import Receipts
from tracer.sandbox.approvals import ApprovalSettings
from tracer.sandbox.runner import Sandbox
from tracer.spec import HopSpec, parse_spec
from tracer.watch import Watch

pytestmark = pytest.mark.timeout(60)

SECRET = "right-secret-1"
TOKEN = "righttoken123"
APPROVER = "approver@funnel.invalid"

SPEC = """
service: shop
collectors:
  webhook: {{port: {hook}, secret_path: {secret}, max_body: 4096}}
  smtp: {{port: {mx}, rcpt_token: {token}}}
steps:
  approval:
    inject:
      http:
        url: "{funnel}/api/v1/approvals"
        json: {{resource: db, requester: "canary+{{trace_id}}@example.com", payload: {{}}}}
        timeout: 2s
    hops:
      - {{name: slack, target: 1s, deadline: 1s, webhook: {{path: slack}}}}
      - {{name: email, target: 1s, deadline: 1s, smtp: {{to: "{approver}"}}}}
"""


@pytest.fixture(scope="module")
def sandbox() -> Any:
    with Sandbox() as sb:
        yield sb


def spec_for(sb: Sandbox, hook: int, mx: int) -> Any:
    text = SPEC.format(hook=hook, mx=mx, secret=SECRET, token=TOKEN, funnel=sb.url, approver=APPROVER)
    return parse_spec(yaml.safe_load(text))


def unrelated_mail() -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "x@funnel.invalid", APPROVER, "weekly digest"
    msg.set_content(f"nothing to approve (trace {new_trace_id()})")
    return msg


def smtp_send(port: int, msg: EmailMessage, to: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.send_message(msg, to_addrs=[to])


async def noise(hook: WebhookCollector, mx_port: int) -> None:
    """What else reaches the receivers while the probe's notifications are misdirected: one
    post without the secret, one oversized, one unrelated but authentic; one unrelated mail."""
    async with httpx.AsyncClient(timeout=5) as client:
        base = f"http://127.0.0.1:{hook.port}"
        assert (await client.post(f"{base}/slack", json={"text": "no secret"})).status_code == 401
        big = json.dumps({"text": "x" * 5000})
        resp = await client.post(
            hook.endpoint("slack"), content=big, headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == 413
        other = {"text": f"deploy finished (trace {new_trace_id()})"}
        assert (await client.post(hook.endpoint("slack"), json=other)).status_code == 200
    await asyncio.to_thread(smtp_send, mx_port, unrelated_mail(), f"approver+{TOKEN}@funnel.invalid")


def run_probe(sb: Sandbox, with_noise: bool) -> dict[str, Any]:
    hook_port, mx_port = free_port(), free_port()
    # The funnel is misconfigured: the wrong webhook secret and the wrong recipient token.
    sb.ctx.extra["approvals"] = ApprovalSettings(
        slack_url=f"http://127.0.0.1:{hook_port}/slack",
        secret_path="old-secret-9",
        smtp_host="127.0.0.1",
        smtp_port=mx_port,
        approver_email="approver+oldtoken999@funnel.invalid",
        emit_event=False,
    )

    async def go() -> Any:
        async with Engine(spec_for(sb, hook_port, mx_port)) as engine:
            hook = engine.collectors["webhook"]
            tasks: list[asyncio.Task[None]] = []

            def injected(_: Any) -> None:
                if with_noise:
                    tasks.append(asyncio.create_task(noise(hook, mx_port)))

            result = await engine.run_probe("approval", on_injected=injected)
            await asyncio.gather(*tasks)
            return result

    try:
        result = asyncio.run(go())
    finally:
        sb.ctx.extra["approvals"] = ApprovalSettings()
    assert result.injection.ok, result.injection
    return {h.hop: h for h in result.hops}


def test_lost_hops_count_what_reached_the_receivers_and_why(sandbox: Sandbox) -> None:
    hops = run_probe(sandbox, with_noise=True)
    slack, email = hops["slack"], hops["email"]
    assert slack.verdict == "lost" and email.verdict == "lost", (slack.reason, email.reason)
    ev = slack.evidence
    assert ev["near_misses"] == 4
    assert ev["found"]["rejected"] == {
        "unauthenticated: wrong or missing secret": 2,  # the funnel's and the secret-less post
        "oversized: over max_body": 1,
    }
    assert ev["found"]["accepted_without_trace_id"] == 1
    assert (
        "4 deliveries reached /slack in the window: 3 rejected (2 unauthenticated: wrong or missing "
        "secret, 1 oversized: over max_body), 1 without the trace id"
    ) in slack.reason
    assert "old-secret-9" not in json.dumps(ev) and SECRET not in json.dumps(ev)

    ev = email.evidence
    assert ev["near_misses"] == 2
    assert ev["found"]["rejected"] == {"unauthenticated: recipient without the rcpt_token": 1}
    assert (
        f"2 mails reached {APPROVER} in the window: 1 rejected (1 unauthenticated: recipient "
        "without the rcpt_token), 1 without the trace id"
    ) in email.reason
    assert "oldtoken999" not in json.dumps(ev) and TOKEN not in json.dumps(ev)


def test_only_auth_rejections_hint_at_the_secret(sandbox: Sandbox) -> None:
    hops = run_probe(sandbox, with_noise=False)
    slack, email = hops["slack"], hops["email"]
    assert slack.verdict == "lost" and slack.evidence["near_misses"] == 1
    assert "1 delivery reached /slack in the window: 1 rejected (1 unauthenticated" in slack.reason
    assert slack.reason.endswith("the funnel's webhook secret or URL path does not match collectors.webhook")
    assert email.verdict == "lost" and email.evidence["near_misses"] == 1
    assert "rcpt_token (approver+<token>@...) or SMTP AUTH does not match collectors.smtp" in email.reason


def test_the_trace_id_on_another_path_names_the_path() -> None:
    async def go() -> Evidence:
        hook = WebhookCollector(WebhookConfig(secret_path=SECRET))
        await hook.start()
        try:
            w = Watch(
                probe=Probe(step="a"), hop=HopSpec(name="h", target=5, webhook={"path": "slack"}), since=0
            )
            hook.watch(w)
            start = clock.now()
            async with httpx.AsyncClient(timeout=5) as client:
                resp = await client.post(hook.endpoint("alerts"), json={"text": f"trace {w.trace_id}"})
                assert resp.status_code == 200
            assert w.first is None
            return await hook.explain(w, start, clock.now(), Evidence(searched={"sink": "webhook"}))
        finally:
            await hook.close()

    ev = asyncio.run(go())
    assert (
        ev.summary
        == "no delivery reached /slack in the window (1 delivery went elsewhere: alerts); the trace id reached alerts instead"
    )
    assert ev.near_misses == 1 and ev.hint and "check the hop's path" in ev.hint


def test_explain_after_1000_deliveries_stays_bounded() -> None:
    async def go() -> tuple[int, Evidence]:
        hook = WebhookCollector(WebhookConfig(secret_path=SECRET))
        hook.receipts = Receipts(500)  # a smaller ring than the default, so the test turns it over
        await hook.start()
        try:
            w = Watch(
                probe=Probe(step="a"), hop=HopSpec(name="h", target=5, webhook={"path": "slack"}), since=0
            )
            hook.watch(w)
            start = clock.now()
            async with httpx.AsyncClient(timeout=10) as client:
                for i in range(1000):
                    resp = await client.post(hook.endpoint("slack"), json={"text": f"unrelated {i}"})
                    assert resp.status_code == 200
            ev = await hook.explain(w, start, clock.now(), Evidence(searched={"sink": "webhook"}))
            return len(hook.receipts), ev
        finally:
            await hook.close()

    kept, ev = asyncio.run(go())
    assert kept == 500
    assert ev.found["truncated"] is True and ev.found["received"] == 500 and ev.near_misses == 500
    assert ev.summary == "at least 500 deliveries reached /slack in the window: 500 without the trace id"


# -- preflight ------------------------------------------------------------------------------
DOCTOR_SPEC = """
service: shop
collectors:
  webhook: {{port: {hook}, {auth}}}
  smtp: {{port: {mx}, rcpt_token: {token}}}
steps:
  approval:
    inject:
      http: {{url: "{funnel}/api/v1/approvals", json: {{resource: db}}, timeout: 2s}}
    hops:
      - {{name: slack, target: 1s, webhook: {{path: slack}}}}
      - {{name: email, target: 1s, smtp: {{}}}}
"""


def doctor(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracer.cli", "doctor", "-c", str(tmp_yaml(text))],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_doctor_a_taken_receiver_port_is_exit_1_with_the_fix(sandbox: Sandbox) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        mx = free_port()
        text = DOCTOR_SPEC.format(
            hook=taken, mx=mx, auth=f"secret_path: {SECRET}", token=TOKEN, funnel=sandbox.url
        )
        res = doctor(text)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"FAIL collectors.webhook: port {taken} on 127.0.0.1 can be bound (already in use)" in res.stdout
    assert f"fix: another process holds port {taken}" in res.stdout
    assert f"ok   collectors.smtp: port {mx} on 127.0.0.1 can be bound (free)" in res.stdout
    assert "ok   collectors.webhook: authentication (secret_path)" in res.stdout
    assert "ok   collectors.smtp: authentication (rcpt_token)" in res.stdout
    assert SECRET not in res.stdout and TOKEN not in res.stdout
    assert "1 problem(s) found" in res.stdout


def test_doctor_free_ports_pass_and_unauthenticated_is_said(sandbox: Sandbox) -> None:
    text = DOCTOR_SPEC.format(
        hook=free_port(), mx=free_port(), auth="allow_unauthenticated: true", token=TOKEN, funnel=sandbox.url
    )
    res = doctor(text)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (
        "ok   collectors.webhook: authentication (unauthenticated: any process that learns a trace id "
        "can forge a sighting)"
    ) in res.stdout


def test_a_port_held_by_our_own_running_receiver_is_fine() -> None:
    """The canary runs the preflight after its receivers started: their port is not a problem."""
    port = free_port()
    config = WebhookConfig(port=port, secret_path=SECRET)

    async def go() -> tuple[Any, Any]:
        hook = WebhookCollector(config)
        await hook.start()
        try:
            running = (await webhook.plugin.preflight(config, []))[0]
        finally:
            await hook.close()
        return running, (await webhook.plugin.preflight(config, []))[0]

    running, after = asyncio.run(go())
    assert running.ok and running.detail == "held by this process's receiver"
    assert after.ok and after.detail == "free"
