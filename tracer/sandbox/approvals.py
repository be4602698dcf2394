"""Approval requests: the funnel step whose SLO is "approval request -> notification < 5 min".

``POST /api/v1/approvals`` with ``{resource, requester, payload, metadata?}`` answers 201 at
once and, in the background, notifies the approver the ways real SaaS apps do: a Slack
incoming-webhook post, a Slack Web API ``chat.postMessage`` (bot token, to a channel), a
generic JSON webhook and an email (text + HTML). Each channel has its
own delay and loss knob on ``ApprovalSettings`` (``ctx.extra["approvals"]``, read per request
so tests can turn knobs while the app runs), which is how tests create a late or lost
notification with a known ground truth.

The probe's trace id travels the way an app would carry it: in ``metadata``/``payload`` (e.g.
``canary_trace_id``) or in a W3C ``traceparent`` header; notifications show it so a receiver
can match it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import logging
import random
import re
import secrets
import smtplib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tracer.sandbox import auth

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from tracer.sandbox.funnel import FunnelContext

log = logging.getLogger(__name__)

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ApprovalSettings:
    """Where and how the approver is notified. ``None`` URLs/hosts disable a channel."""

    slack_url: str | None = None  # a Slack incoming webhook
    # The Slack Web API (chat.postMessage with a bot token), e.g. Sandbox.slack_api_url.
    slack_api_url: str | None = None
    slack_token: str = "xoxb-sandbox-0000-token"
    slack_channel: str = "C0APPROVALS"
    webhook_url: str | None = None
    smtp_host: str | None = None
    smtp_port: int = 25
    mail_from: str = "approvals@funnel.invalid"
    approver_email: str = "approver@funnel.invalid"
    # seconds between accepting the request and sending each notification
    slack_delay: float = 0.0
    slack_api_delay: float = 0.0
    webhook_delay: float = 0.0
    email_delay: float = 0.0
    # fraction of requests whose notification on that channel is never sent
    slack_drop_rate: float = 0.0
    slack_api_drop_rate: float = 0.0
    webhook_drop_rate: float = 0.0
    email_drop_rate: float = 0.0
    # outgoing webhook auth, so notifications pass the receiver's checks
    secret_path: str | None = None  # inserted as the first path segment of both webhook URLs
    hmac_secret: str | None = None
    hmac_header: str = "X-Signature"
    hmac_prefix: str = "sha256="  # body scheme only
    # body: <prefix><hex HMAC(body)>; timestamped: t=<unix>,v1=<hex HMAC("<t>.<body>")> (replay-safe)
    hmac_scheme: Literal["body", "timestamped"] = "body"
    # outgoing mail auth: SMTP AUTH credentials (a recipient token goes in approver_email)
    smtp_user: str | None = None
    smtp_password: str | None = None
    email_encoding: Literal["quoted-printable", "base64"] = "quoted-printable"
    emit_event: bool = True  # also emit an ``approval_requested`` PostHog event
    event_delay: float = 0.0


CHANNELS = ("slack", "slack_api", "webhook", "email")


@dataclass
class ApprovalStats:
    """What the funnel did, for tests: requests accepted, notifications sent/dropped/failed."""

    requested: int = 0
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))
    failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))


_Sender = Callable[[ApprovalSettings, dict[str, Any]], Awaitable[None]]


def approval_routes(ctx: FunnelContext) -> list[Route]:
    ctx.extra.setdefault("approvals", ApprovalSettings())
    ctx.extra.setdefault("approval_stats", ApprovalStats())
    records: dict[str, dict[str, Any]] = ctx.extra.setdefault("approval_records", {})

    async def create_approval(request: Request) -> JSONResponse:
        if (refused := auth.refuse(ctx, request)) is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not _valid(body):
            return JSONResponse(
                {
                    "detail": "a JSON object with string resource and requester (and object payload) is required"
                },
                status_code=422,
            )
        settings: ApprovalSettings = ctx.extra["approvals"]
        stats: ApprovalStats = ctx.extra["approval_stats"]
        approval = {
            "id": f"apr_{secrets.token_hex(6)}",
            "resource": body["resource"],
            "requester": body["requester"],
            "payload": body.get("payload") or {},
            "metadata": body.get("metadata") or {},
            "trace_id": _trace_id(body, request.headers.get("traceparent")),
        }
        stats.requested += 1
        synthetic = request.headers.get("x-synthetic", "").lower() == "true" or (
            approval["metadata"].get("synthetic") is True
        )
        records[approval["id"]] = {"id": approval["id"], "status": "pending", "synthetic": synthetic}
        for channel, delay, drop, send in (
            ("slack", settings.slack_delay, settings.slack_drop_rate, _send_slack),
            ("slack_api", settings.slack_api_delay, settings.slack_api_drop_rate, _send_slack_api),
            ("webhook", settings.webhook_delay, settings.webhook_drop_rate, _send_webhook),
            ("email", settings.email_delay, settings.email_drop_rate, _send_email),
        ):
            if not _configured(settings, channel):
                continue
            if random.random() < drop:
                stats.dropped[channel] += 1
                continue
            _spawn(ctx, _deliver(channel, delay, send, settings, approval, stats))
        if settings.emit_event:
            props = {
                "approval_id": approval["id"],
                "resource": approval["resource"],
                "requester": approval["requester"],
                **approval["metadata"],
            }
            if approval["trace_id"]:
                props.setdefault("canary_trace_id", approval["trace_id"])
            if "traceparent" in request.headers:
                props["traceparent"] = request.headers["traceparent"]
            ctx.emit_later(settings.event_delay, "approval_requested", approval["requester"], props)
        return JSONResponse({"id": approval["id"], "status": "pending"}, status_code=201)

    async def delete_approval(request: Request) -> JSONResponse:
        """Withdraw a pending request (a canary's cleanup), so it never trips the app's own SLA alert."""
        if (refused := auth.refuse(ctx, request)) is not None:
            return refused
        if records.pop(request.path_params["approval_id"], None) is None:
            return JSONResponse({"detail": "no such approval"}, status_code=404)
        return JSONResponse({"deleted": True})

    return [
        Route("/api/v1/approvals", create_approval, methods=["POST"]),
        Route("/api/v1/approvals/{approval_id}", delete_approval, methods=["DELETE"]),
    ]


def _valid(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("resource"), str)
        and isinstance(body.get("requester"), str)
        and isinstance(body.get("payload", {}) or {}, dict)
        and isinstance(body.get("metadata", {}) or {}, dict)
    )


def _trace_id(body: dict[str, Any], traceparent: str | None) -> str | None:
    """The probe's trace id as an app would find it: explicit field first, then traceparent."""
    for source in (body.get("metadata") or {}, body.get("payload") or {}):
        for key in ("canary_trace_id", "trace_id"):
            value = str(source.get(key, "")).lower()
            if _TRACE_ID.match(value):
                return value
    m = _TRACEPARENT.match((traceparent or "").strip().lower())
    return m.group(1) if m else None


def _configured(settings: ApprovalSettings, channel: str) -> bool:
    return {
        "slack": settings.slack_url is not None,
        "slack_api": settings.slack_api_url is not None,
        "webhook": settings.webhook_url is not None,
        "email": settings.smtp_host is not None,
    }[channel]


def _spawn(ctx: FunnelContext, coro: Coroutine[Any, Any, None]) -> None:
    """Run in the background, tracked by the context so shutdown cancels it."""
    task = asyncio.get_running_loop().create_task(coro)
    ctx._tasks.add(task)
    task.add_done_callback(ctx._tasks.discard)


async def _deliver(
    channel: str,
    delay: float,
    send: _Sender,
    settings: ApprovalSettings,
    a: dict[str, Any],
    stats: ApprovalStats,
) -> None:
    await asyncio.sleep(delay)
    try:
        await send(settings, a)
    except (httpx.HTTPError, OSError, smtplib.SMTPException, SlackApiError) as exc:
        stats.failed[channel] += 1
        log.warning("approval notification by %s failed: %s", channel, type(exc).__name__)
        return
    stats.sent[channel] += 1


# -- channels -------------------------------------------------------------------
def _summary(a: dict[str, Any]) -> str:
    trace = f" (trace {a['trace_id']})" if a["trace_id"] else ""
    return f"Approval requested: {a['requester']} wants {a['resource']} [{a['id']}]{trace}"


def _slack_blocks(a: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": "Approval requested"}},
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": f"*{a['requester']}* wants *{a['resource']}*\nRequest `{a['id']}`",
            },
        },
    ]
    if a["trace_id"]:
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"trace `{a['trace_id']}`"}]}
        )
    return blocks


async def _send_slack(settings: ApprovalSettings, a: dict[str, Any]) -> None:
    assert settings.slack_url is not None
    await _post(settings, settings.slack_url, {"text": _summary(a), "blocks": _slack_blocks(a)})


class SlackApiError(Exception):
    """The Web API answered ``ok: false`` (e.g. ``channel_not_found``)."""


async def _send_slack_api(settings: ApprovalSettings, a: dict[str, Any]) -> None:
    """``chat.postMessage`` with a bot token, as a Slack app posts to a channel."""
    assert settings.slack_api_url is not None
    body = {"channel": settings.slack_channel, "text": _summary(a), "blocks": _slack_blocks(a)}
    headers = {"Authorization": f"Bearer {settings.slack_token}"}
    async with httpx.AsyncClient(timeout=5.0) as client:
        resp = await client.post(
            f"{settings.slack_api_url.rstrip('/')}/chat.postMessage", json=body, headers=headers
        )
        resp.raise_for_status()
        if not resp.json().get("ok"):
            raise SlackApiError(str(resp.json().get("error")))


async def _send_webhook(settings: ApprovalSettings, a: dict[str, Any]) -> None:
    event = {"type": "approval.requested", "id": f"evt_{secrets.token_hex(6)}", "data": a}
    assert settings.webhook_url is not None
    await _post(settings, settings.webhook_url, event)


async def _post(settings: ApprovalSettings, url: str, obj: Any) -> None:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json"}
    if settings.hmac_secret is not None:
        key = settings.hmac_secret.encode()
        if settings.hmac_scheme == "timestamped":
            ts = str(int(time.time()))
            digest = hmac.new(key, ts.encode() + b"." + raw, hashlib.sha256).hexdigest()
            headers[settings.hmac_header] = f"t={ts},v1={digest}"
        else:
            digest = hmac.new(key, raw, hashlib.sha256).hexdigest()
            headers[settings.hmac_header] = settings.hmac_prefix + digest
    async with httpx.AsyncClient(timeout=5.0) as client:
        resp = await client.post(_with_secret_path(url, settings.secret_path), content=raw, headers=headers)
        resp.raise_for_status()


def _with_secret_path(url: str, secret: str | None) -> str:
    if not secret:
        return url
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, f"/{secret}/{p.path.lstrip('/')}", p.query, p.fragment))


async def _send_email(settings: ApprovalSettings, a: dict[str, Any]) -> None:
    msg = approval_email(settings, a)
    assert settings.smtp_host is not None

    def send() -> None:
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=5) as smtp:
            if settings.smtp_user is not None:
                smtp.login(settings.smtp_user, settings.smtp_password or "")
            smtp.send_message(msg)

    await asyncio.to_thread(send)


def approval_email(settings: ApprovalSettings, a: dict[str, Any]) -> EmailMessage:
    """Multipart/alternative text + HTML, both transfer-encoded per ``email_encoding``; the
    trace id is in the bodies (not the subject), as in a real notification's footer."""
    msg = EmailMessage()
    msg["Subject"] = f"Approval needed: {a['resource']}"
    msg["From"] = settings.mail_from
    msg["To"] = settings.approver_email
    msg["Message-ID"] = make_msgid(domain="funnel.invalid")
    msg["X-Approval-Id"] = a["id"]
    trace = f"\nTrace: {a['trace_id']}\n" if a["trace_id"] else ""
    text = f"{a['requester']} asks for approval of {a['resource']}.\nRequest: {a['id']}\n{trace}"
    esc = html.escape
    trace_html = (
        f'<p style="color:#888">Trace: <code>{esc(a["trace_id"])}</code></p>' if a["trace_id"] else ""
    )
    page = (
        f"<html><body><h1>Approval needed</h1><p><b>{esc(a['requester'])}</b> asks for approval of "
        f"<b>{esc(a['resource'])}</b>.</p><p>Request <code>{esc(a['id'])}</code></p>{trace_html}</body></html>"
    )
    msg.set_content(text, cte=settings.email_encoding)
    msg.add_alternative(page, subtype="html", cte=settings.email_encoding)
    return msg
