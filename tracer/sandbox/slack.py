"""A small Slack-Web-API-compatible server: where the sandbox's approvals post, and what the
Slack collector reads.

Only what a notifier and a history reader use, with Slack's own contract (pinned by
tests/test_slack.py with the official ``slack_sdk`` client):

- ``POST /api/auth.test``, ``POST /api/chat.postMessage`` (JSON or form body),
  ``GET|POST /api/conversations.history`` (``channel``, ``oldest``, ``latest``, ``inclusive``,
  ``limit``, ``cursor``; newest first, ``has_more`` and ``response_metadata.next_cursor``).
- Auth by bot token (``Authorization: Bearer xoxb-...`` or a ``token`` field); errors are HTTP 200
  with ``{"ok": false, "error": "invalid_auth" | "not_authed" | "channel_not_found" | ...}``.
- Rate limits: ``history_per_minute`` (Tier 3 is ~50) answers 429 with ``Retry-After`` beyond
  it; ``retry_after`` forces 429s; ``fault`` forces an HTTP status (e.g. 503) on every call.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass
class SlackState:
    bot_token: str = "xoxb-sandbox-0000-token"
    team: str = "funnel-sandbox"
    bot_user: str = "U0FUNNELBOT"
    channels: dict[str, str] = field(
        default_factory=lambda: {"C0APPROVALS": "approvals", "C0GENERAL": "general"}
    )
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # channel -> oldest first
    history_per_minute: int | None = None  # None: no limit (Slack's Tier 3 is ~50)
    retry_after: float | None = None  # every call gets 429 with this Retry-After while set
    fault: int | None = None  # every call answers this HTTP status while set
    calls: dict[str, int] = field(default_factory=dict)
    _recent: deque[float] = field(default_factory=deque, repr=False)
    _last_ts: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def post(self, channel: str, text: str, blocks: Any = None, attachments: Any = None) -> dict[str, Any]:
        """Store a message the way Slack does: a unique, increasing ``ts`` ("epoch.micro")."""
        with self._lock:
            ts = max(time.time(), self._last_ts + 1e-6)
            self._last_ts = ts
            msg: dict[str, Any] = {"type": "message", "user": self.bot_user, "text": text, "ts": f"{ts:.6f}"}
            if blocks:
                msg["blocks"] = blocks
            if attachments:
                msg["attachments"] = attachments
            self.messages.setdefault(channel, []).append(msg)
            return msg

    def channel_id(self, name_or_id: str) -> str | None:
        if name_or_id in self.channels:
            return name_or_id
        name = name_or_id.lstrip("#")
        return next((cid for cid, n in self.channels.items() if n == name), None)

    def _rate_limited(self) -> bool:
        if self.history_per_minute is None:
            return False
        now = time.monotonic()
        while self._recent and now - self._recent[0] > 60:
            self._recent.popleft()
        if len(self._recent) >= self.history_per_minute:
            return True
        self._recent.append(now)
        return False


def _cursor(offset: int) -> str:
    return base64.b64encode(f"offset:{offset}".encode()).decode()


def _offset(cursor: str) -> int | None:
    try:
        kind, _, n = base64.b64decode(cursor.encode(), validate=True).decode().partition(":")
        return int(n) if kind == "offset" else None
    except (ValueError, UnicodeError):
        return None


async def _args(request: Request) -> dict[str, Any]:
    args: dict[str, Any] = dict(request.query_params)
    raw = await request.body()
    if raw:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            if isinstance(body, dict):
                args.update(body)
        else:
            args.update({k: v[-1] for k, v in parse_qs(raw.decode(errors="replace")).items()})
    return args


def create_app(state: SlackState) -> Starlette:
    def ok(**data: Any) -> JSONResponse:
        return JSONResponse({"ok": True, **data})

    def err(error: str, status: int = 200, **headers: str) -> JSONResponse:
        return JSONResponse({"ok": False, "error": error}, status_code=status, headers=headers)

    async def call(request: Request) -> Response:
        method = request.path_params["method"]
        state.calls[method] = state.calls.get(method, 0) + 1
        if state.fault is not None:
            return JSONResponse({"ok": False, "error": "fatal_error"}, status_code=state.fault)
        if state.retry_after is not None:
            return err("ratelimited", 429, **{"Retry-After": f"{state.retry_after:g}"})
        args = await _args(request)
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else str(args.get("token") or "")
        if not token:
            return err("not_authed")
        if token != state.bot_token:
            return err("invalid_auth")
        if method == "auth.test":
            return ok(url=f"https://{state.team}.slack.invalid/", team=state.team, user="funnel-bot",
                      team_id="T0SANDBOX", user_id=state.bot_user, bot_id="B0SANDBOX")  # fmt: skip
        if method == "chat.postMessage":
            channel = state.channel_id(str(args.get("channel") or ""))
            if channel is None:
                return err("channel_not_found")
            blocks, attachments = args.get("blocks"), args.get("attachments")
            if isinstance(blocks, str):  # form-encoded: JSON in a field, as Slack accepts
                blocks = json.loads(blocks or "null")
            if isinstance(attachments, str):
                attachments = json.loads(attachments or "null")
            text = str(args.get("text") or "")
            if not text and not blocks and not attachments:
                return err("no_text")
            msg = state.post(channel, text, blocks, attachments)
            return ok(channel=channel, ts=msg["ts"], message=msg)
        if method == "conversations.history":
            if state._rate_limited():
                return err("ratelimited", 429, **{"Retry-After": "1"})
            channel = state.channel_id(str(args.get("channel") or ""))
            if channel is None:
                return err("channel_not_found")
            try:
                oldest = float(args.get("oldest") or 0)
                latest = float(args.get("latest") or "inf")
                limit = min(999, max(1, int(args.get("limit") or 100)))
            except ValueError:
                return err("invalid_arguments")
            inclusive = str(args.get("inclusive", "")).lower() in ("1", "true")
            offset = 0
            if args.get("cursor"):
                found = _offset(str(args["cursor"]))
                if found is None:
                    return err("invalid_cursor")
                offset = found
            with state._lock:
                history = list(state.messages.get(channel, []))
            inside = [
                m for m in reversed(history)
                if ((oldest <= float(m["ts"]) <= latest) if inclusive else (oldest < float(m["ts"]) < latest))
            ]  # fmt: skip
            page = inside[offset : offset + limit]
            more = offset + limit < len(inside)
            meta = {"next_cursor": _cursor(offset + limit) if more else ""}
            return ok(messages=page, has_more=more, pin_count=0, response_metadata=meta)
        return err("unknown_method", 404)

    return Starlette(routes=[Route("/api/{method}", call, methods=["GET", "POST"])])
