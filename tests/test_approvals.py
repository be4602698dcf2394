"""The sandbox's approval step: 201 at once, then Slack, webhook and email notifications with
their own delay and loss knobs, signed so they pass the receivers' checks."""

from __future__ import annotations

import asyncio
import email
import hashlib
import hmac
import time
from email import policy
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
import uvicorn
from aiosmtpd.smtp import SMTP
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from collectors.webhook import WebhookCollector, WebhookConfig
from tracer.probe import new_trace_id
from tracer.sandbox.approvals import ApprovalSettings, ApprovalStats
from tracer.sandbox.runner import Sandbox

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def sandbox() -> Any:
    with Sandbox() as sb:
        yield sb


@pytest.fixture()
def sb(sandbox: Sandbox) -> Any:
    sandbox.ctx.extra["approval_stats"] = ApprovalStats()  # fresh counters per test
    yield sandbox
    sandbox.ctx.extra["approvals"] = ApprovalSettings()


class Inbox:
    """Captures what reaches the receivers: webhook bodies by path (via ``route``) and raw mails."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[Any]] = {}
        self.mails: list[EmailMessage] = []
        self.changed = asyncio.Event()

    def on(self, path: str) -> Any:
        def on_body(body: Any, received: float) -> None:
            self.bodies.setdefault(path, []).append(body)
            self.changed.set()

        return on_body

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append(email.message_from_bytes(envelope.original_content, policy=policy.default))
        self.changed.set()
        return "250 OK"

    async def wait(self, done: Any, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while not done():
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.01, end - time.monotonic()))


async def with_receivers(main: Any, **hook_config: Any) -> None:
    """A webhook receiver (``slack`` and ``events`` routed into an inbox) and an SMTP server."""
    inbox = Inbox()
    hook = WebhookCollector(WebhookConfig(**{"allow_unauthenticated": True, **hook_config}))
    await hook.start()
    for path in ("slack", "events"):
        hook.route(path, inbox.on(path))
    loop = asyncio.get_running_loop()
    mx = await loop.create_server(lambda: SMTP(inbox, hostname="mx.invalid", loop=loop), "127.0.0.1", 0)
    try:
        await main(hook, mx.sockets[0].getsockname()[1], inbox)
    finally:
        mx.close()
        await hook.close()


async def request(sb: Sandbox, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(f"{sb.url}/api/v1/approvals", json=body, headers=headers)


REQUEST = {"resource": "prod-db", "requester": "ana@example.com", "payload": {"reason": "migration"}}


def test_validation_and_201(sb: Sandbox) -> None:
    async def main() -> None:
        for bad in (
            {},
            {"resource": "x"},
            {"resource": 1, "requester": "a"},
            {**REQUEST, "payload": [1]},
            [1],
        ):
            assert (await request(sb, bad)).status_code == 422, bad
        resp = await request(sb, REQUEST)
        assert resp.status_code == 201
        assert resp.json()["id"].startswith("apr_") and resp.json()["status"] == "pending"

    sb.ctx.extra["approvals"] = ApprovalSettings(emit_event=False)
    asyncio.run(main())
    stats: ApprovalStats = sb.ctx.extra["approval_stats"]
    assert stats.requested == 1 and sum(stats.sent.values()) == 0  # no channel configured


def test_every_channel_carries_the_trace_id(sb: Sandbox) -> None:
    async def main(hook: WebhookCollector, smtp_port: int, inbox: Inbox) -> None:
        sb.ctx.extra["approvals"] = ApprovalSettings(
            slack_url=f"http://127.0.0.1:{hook.port}/slack",
            webhook_url=f"http://127.0.0.1:{hook.port}/events",
            smtp_host="127.0.0.1",
            smtp_port=smtp_port,
            email_encoding="base64",
        )
        tid = new_trace_id()
        resp = await request(sb, REQUEST, {"traceparent": f"00-{tid}-{'cd' * 8}-01"})
        assert resp.status_code == 201
        await inbox.wait(lambda: len(inbox.bodies) == 2 and inbox.mails)

        slack = inbox.bodies["slack"][0]
        assert tid in slack["text"] and "prod-db" in slack["text"]
        assert any(tid in str(b) for b in slack["blocks"])
        event = inbox.bodies["events"][0]
        assert event["type"] == "approval.requested"
        assert event["data"]["trace_id"] == tid and event["data"]["id"] == resp.json()["id"]

        mail = inbox.mails[0]
        assert mail["To"] == "approver@funnel.invalid" and "prod-db" in mail["Subject"]
        text, page = mail.get_body(("plain",)), mail.get_body(("html",))
        assert text is not None and page is not None
        assert tid in text.get_content() and tid in page.get_content()
        assert page["Content-Transfer-Encoding"] == "base64"

        # The approval_requested event reached the sandbox PostHog with the trace id.
        for _ in range(50):
            events = [e for e in sb.posthog.events() if e.get("event") == "approval_requested"]
            if events:
                break
            await asyncio.sleep(0.05)
        assert events and events[-1]["properties"]["canary_trace_id"] == tid

    asyncio.run(with_receivers(main))
    stats: ApprovalStats = sb.ctx.extra["approval_stats"]
    assert stats.sent == {"slack": 1, "slack_api": 0, "webhook": 1, "email": 1}  # no Slack API configured


def test_drop_rate_one_never_sends(sb: Sandbox) -> None:
    async def main(hook: WebhookCollector, smtp_port: int, inbox: Inbox) -> None:
        sb.ctx.extra["approvals"] = ApprovalSettings(
            slack_url=f"http://127.0.0.1:{hook.port}/slack",
            webhook_url=f"http://127.0.0.1:{hook.port}/events",
            smtp_host="127.0.0.1",
            smtp_port=smtp_port,
            slack_drop_rate=1.0,
            webhook_drop_rate=1.0,
            email_drop_rate=1.0,
            emit_event=False,
        )
        for _ in range(3):
            assert (await request(sb, REQUEST)).status_code == 201
        await asyncio.sleep(0.3)
        assert not inbox.bodies and not inbox.mails

    asyncio.run(with_receivers(main))
    stats: ApprovalStats = sb.ctx.extra["approval_stats"]
    assert (
        stats.dropped == {"slack": 3, "slack_api": 0, "webhook": 3, "email": 3}
        and sum(stats.sent.values()) == 0
    )


def test_signed_webhooks_pass_the_receivers_auth_and_wrong_secrets_do_not(sb: Sandbox) -> None:
    async def main(hook: WebhookCollector, smtp_port: int, inbox: Inbox) -> None:
        settings = ApprovalSettings(
            slack_url=f"http://127.0.0.1:{hook.port}/slack",
            secret_path="p4th",
            hmac_secret="k3y",
            emit_event=False,
        )
        sb.ctx.extra["approvals"] = settings
        assert (await request(sb, REQUEST)).status_code == 201
        await inbox.wait(lambda: "slack" in inbox.bodies)

        settings.hmac_secret = "wrong"  # knobs are read per request
        assert (await request(sb, REQUEST)).status_code == 201
        stats: ApprovalStats = sb.ctx.extra["approval_stats"]
        for _ in range(50):
            if stats.failed["slack"]:
                break
            await asyncio.sleep(0.05)
        assert stats.failed["slack"] == 1 and stats.sent["slack"] == 1
        assert hook.health()["unauthenticated"] == 1 and len(inbox.bodies["slack"]) == 1

    asyncio.run(with_receivers(main, secret_path="p4th", hmac_secret="k3y"))


def test_signature_is_over_the_exact_bytes(sb: Sandbox) -> None:
    """What the receiver checks, computed independently: hex HMAC-SHA256 of the raw body."""
    seen: list[tuple[bytes, str]] = []

    async def main() -> None:
        async def capture(request: Request) -> PlainTextResponse:
            seen.append((await request.body(), request.headers["x-sig"]))
            return PlainTextResponse("ok")

        app = Starlette(routes=[Route("/s/hook", capture, methods=["POST"])])
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        sb.ctx.extra["approvals"] = ApprovalSettings(
            webhook_url=f"http://127.0.0.1:{port}/hook",
            secret_path="s",
            hmac_secret="k",
            hmac_header="X-Sig",
            hmac_prefix="",
            emit_event=False,
        )
        assert (await request(sb, REQUEST)).status_code == 201
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        server.should_exit = True
        await task

    asyncio.run(main())
    raw, sig = seen[0]
    assert sig == hmac.new(b"k", raw, hashlib.sha256).hexdigest()
