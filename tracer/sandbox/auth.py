"""Login for the sandbox funnel: short-lived bearer tokens, like a real SaaS API's.

``POST /api/v1/auth/login`` takes ``{username, password}`` as JSON or a form and answers
``{access_token, token_type: Bearer, expires_in}``. With ``AuthSettings.required`` the lead and
approval endpoints answer 401 without a live token, so the tracer's login, refresh-before-expiry
and refresh-on-401 (``tracer.inject.auth``) are exercised against a real server. The TTL is a
knob (``token_ttl``) so a test can run a canary across several expiries in seconds.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from tracer.sandbox.funnel import FunnelContext

USERNAME = "canary"
PASSWORD = "sandbox-password"


@dataclass
class AuthSettings:
    required: bool = False  # leads and approvals need a token
    token_ttl: float = 1800.0  # seconds a token lives
    username: str = USERNAME
    password: str = PASSWORD


@dataclass
class AuthStats:
    logins: int = 0
    failed_logins: int = 0
    rejected: int = 0  # requests refused for a missing, unknown or expired token
    expired: int = 0  # of those, with a token that had expired
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (time.monotonic)


def settings(ctx: FunnelContext) -> AuthSettings:
    return ctx.extra.setdefault("auth", AuthSettings())


def stats(ctx: FunnelContext) -> AuthStats:
    return ctx.extra.setdefault("auth_stats", AuthStats())


def refuse(ctx: FunnelContext, request: Request) -> JSONResponse | None:
    """None when the request may proceed; else the 401 to answer."""
    cfg, st = settings(ctx), stats(ctx)
    if not cfg.required:
        return None
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    expiry = st.tokens.get(token)
    if expiry is not None and time.monotonic() < expiry:
        return None
    st.rejected += 1
    if expiry is not None:
        st.expired += 1
        st.tokens.pop(token, None)
    detail = "token expired" if expiry is not None else "a bearer token from /api/v1/auth/login is required"
    return JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def auth_routes(ctx: FunnelContext) -> list[Route]:
    settings(ctx)
    stats(ctx)

    async def login(request: Request) -> JSONResponse:
        cfg, st = settings(ctx), stats(ctx)
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            creds = _form(await request.body())
        else:
            try:
                creds = await request.json()
            except ValueError:
                creds = None
        if (
            not isinstance(creds, dict)
            or not secrets.compare_digest(str(creds.get("username", "")), cfg.username)
            or not secrets.compare_digest(str(creds.get("password", "")), cfg.password)
        ):
            st.failed_logins += 1
            return JSONResponse({"detail": "invalid credentials"}, status_code=401)
        return issue(cfg, st)

    async def oauth_token(request: Request) -> JSONResponse:
        """OAuth2 client credentials: HTTP Basic ``username:password`` as client id and secret."""
        cfg, st = settings(ctx), stats(ctx)
        form = _form(await request.body())
        want = "Basic " + base64.b64encode(f"{cfg.username}:{cfg.password}".encode()).decode()
        if form.get("grant_type") != "client_credentials" or not secrets.compare_digest(
            request.headers.get("authorization", ""), want
        ):
            st.failed_logins += 1
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        return issue(cfg, st)

    return [
        Route("/api/v1/auth/login", login, methods=["POST"]),
        Route("/oauth/token", oauth_token, methods=["POST"]),
    ]


def _form(raw: bytes) -> dict[str, str]:
    """A urlencoded body, parsed without python-multipart (not a dependency)."""
    return dict(parse_qsl(raw.decode(errors="replace")))


def issue(cfg: AuthSettings, st: AuthStats) -> JSONResponse:
    now = time.monotonic()
    for t, exp in list(st.tokens.items()):  # forget long-dead tokens
        if exp < now - 3600:
            del st.tokens[t]
    token = secrets.token_urlsafe(24)
    st.tokens[token] = now + cfg.token_ttl
    st.logins += 1
    return JSONResponse({"access_token": token, "token_type": "Bearer", "expires_in": cfg.token_ttl})
