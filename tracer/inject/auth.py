"""Auth for injection: credentials declared once (the spec's top-level ``auth:`` map) and used by
any HTTP request that names them (``auth: <name>``).

Why: a real funnel's lead or approval API wants a login token that expires (30 minutes is
common). A static secret in the spec would turn every probe of a long-running canary into
``inject_failed`` once it expires, so the tracer logs in itself, caches the token, refreshes it
before it expires and once more when the funnel answers 401 (the request is then retried once).

Four kinds, exactly one per entry::

    auth:
      api:      {token: "${API_TOKEN}"}                               # static bearer token
      key:      {token: "${API_KEY}", header: X-API-Key, prefix: ""}  # static header
      app:
        login:                                                        # a login request
          url: https://app.example.com/api/auth/login
          json: {username: canary, password: "${APP_PASSWORD}"}       # or form: {...}
          token: {json: access_token}                                 # or {header: X-Token} / {cookie: session}
          expires_in: {json: expires_in}                              # seconds; or ttl: 25m
      m2m:
        oauth2: {token_url: https://idp/oauth/token, client_id: canary, client_secret: "${SECRET}", scope: "leads:write"}
      gcloud:
        command: {argv: [gcloud, auth, print-identity-token], timeout: 10s, ttl: 30m}

Secrets never leave this module in text: every secret field is a ``Secret``, the login body is
kept out of reprs, and an ``AuthError`` says what failed ("login failed: HTTP 401") and never
with what (no body, no token, no command output).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode

import httpx
from pydantic import Field, field_validator, model_validator

from tracer import clock, net
from tracer.net import redact_url
from tracer.payload import value_at
from tracer.schema import Duration, HttpUrl, Model, Secret

log = logging.getLogger(__name__)

MAX_TOKEN = 64 * 1024  # bytes a token command may print: more is not a token


class TokenFrom(Model):
    """Where a login response carries the token: exactly one of a JSON path, a header or a cookie."""

    json_path: str | None = Field(
        None, alias="json", description="dotted path in the JSON body, e.g. data.token"
    )
    header: str | None = Field(None, description="response header, e.g. X-Auth-Token")
    cookie: str | None = Field(None, description="cookie set by the response, e.g. session")

    @model_validator(mode="after")
    def _one(self) -> TokenFrom:
        if sum(v is not None for v in (self.json_path, self.header, self.cookie)) != 1:
            raise ValueError("give exactly one of json, header, cookie")
        return self


class ExpiresFrom(Model):
    """Where a login response says how long the token lives (seconds)."""

    json_path: str = Field(alias="json", description="dotted path in the JSON body, e.g. expires_in")


class LoginAuth(Model):
    """A login request whose response carries the token."""

    method: Literal["POST", "PUT", "GET"] = "POST"
    url: HttpUrl = Field(description="the login endpoint")
    headers: dict[str, Secret] = Field(default_factory=dict, description="extra request headers (secret)")
    json_body: Any = Field(None, alias="json", repr=False, description="JSON credentials (never printed)")
    form: dict[str, Secret] | None = Field(None, description="form credentials (never printed)")
    token: TokenFrom = Field(
        default_factory=lambda: TokenFrom(json="access_token"),
        description="where the token is in the response (default: JSON access_token)",
    )
    expires_in: ExpiresFrom | None = Field(
        None, description="where the response says the token's lifetime in seconds; unset: use ttl"
    )
    ttl: Duration | None = Field(
        None, gt=0, description="token lifetime when the response does not say; unset: until a 401"
    )
    timeout: Duration = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _one_body(self) -> LoginAuth:
        if self.json_body is not None and self.form is not None:
            raise ValueError("give either json or form, not both")
        return self


class OAuth2Auth(Model):
    """OAuth2 client credentials grant (RFC 6749 section 4.4)."""

    token_url: HttpUrl
    client_id: str = Field(min_length=1)
    client_secret: Secret
    scope: str | None = Field(None, description="space-separated scopes")
    audience: str | None = Field(None, description="sent as 'audience' (Auth0 and others want it)")
    client_auth: Literal["basic", "post"] = Field(
        "basic", description="basic: HTTP Basic client_id:client_secret; post: both in the form body"
    )
    timeout: Duration = Field(10.0, gt=0)


class CommandAuth(Model):
    """A command whose stdout is the token (run directly, never through a shell)."""

    argv: list[str] = Field(
        min_length=1, description="program and arguments, e.g. [vault, read, -field=token, ...]"
    )
    timeout: Duration = Field(10.0, gt=0)
    ttl: Duration = Field(300.0, gt=0, description="how long its token is reused")


class AuthSpec(Model):
    """One named credential: exactly one of ``token``, ``login``, ``oauth2``, ``command``; the
    token goes out as ``<header>: <prefix><token>``."""

    token: Secret | None = Field(None, description="a static token")
    login: LoginAuth | None = None
    oauth2: OAuth2Auth | None = None
    command: CommandAuth | None = None
    header: str = Field("Authorization", min_length=1, description="request header the token goes in")
    prefix: str = Field(
        "Bearer ", description='text before the token, e.g. "Bearer ", "Token " or "session="'
    )
    refresh_before: Duration = Field(
        30.0,
        ge=0,
        description="refresh this long before the token expires (at most a fifth of its lifetime)",
    )

    @model_validator(mode="after")
    def _one(self) -> AuthSpec:
        kinds = [k for k in ("token", "login", "oauth2", "command") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"an auth entry needs exactly one of token, login, oauth2, command; found {', '.join(kinds) or 'none'}"
            )
        return self

    @field_validator("token")
    @classmethod
    def _not_empty(cls, v: Secret | None) -> Secret | None:
        if v is not None and not v.get_secret_value():
            raise ValueError("must not be empty (is its environment variable set?)")
        return v

    @property
    def kind(self) -> str:
        return next(k for k in ("token", "login", "oauth2", "command") if getattr(self, k) is not None)


class AuthError(Exception):
    """Getting a token failed. The message is secret-free by construction."""


@dataclass
class _Token:
    value: str
    refresh_at: float  # monotonic; inf: until a 401


def _unwrap(node: Any) -> Any:
    if isinstance(node, Secret):
        return node.get_secret_value()
    if isinstance(node, dict):
        return {k: _unwrap(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unwrap(v) for v in node]
    return node


class Authenticator:
    """One named credential at run time: the cached token, shared by every step and probe that
    names it; one refresh at a time (concurrent probes wait for the same login)."""

    def __init__(self, name: str, spec: AuthSpec, http: httpx.AsyncClient) -> None:
        self.name, self.spec, self.http = name, spec, http
        self._token: _Token | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0  # logins / token requests / command runs made (for health and tests)

    async def headers(self) -> dict[str, str]:
        """The header carrying a valid token, fetching one first when needed. Raises ``AuthError``."""
        token = self._token
        if token is None or clock.now() >= token.refresh_at:
            token = await self._refresh(token)
        return {self.spec.header: f"{self.spec.prefix}{token.value}"}

    def rejected(self, sent_headers: dict[str, str]) -> None:
        """The funnel answered 401 to a request carrying these headers: forget that token (unless
        another probe already replaced it), so the retry gets a fresh one."""
        if self.spec.kind == "token":
            return
        current = self._token
        sent = sent_headers.get(self.spec.header)
        if current is not None and sent == f"{self.spec.prefix}{current.value}":
            self._token = None

    @property
    def refreshable(self) -> bool:
        return self.spec.kind != "token"

    async def _refresh(self, seen: _Token | None) -> _Token:
        async with self._lock:
            if self._token is not None and self._token is not seen and clock.now() < self._token.refresh_at:
                return self._token  # another probe refreshed it while we waited
            value, lifetime = await self._fetch()
            if not value:
                raise AuthError(f"auth '{self.name}': no token in the {self.spec.kind} response")
            now = clock.now()
            if lifetime is None:
                refresh_at = float("inf")
            else:
                refresh_at = now + lifetime - min(self.spec.refresh_before, lifetime / 5)
            self._token = _Token(value, refresh_at)
            self.fetches += 1
            return self._token

    async def _fetch(self) -> tuple[str, float | None]:
        spec = self.spec
        if spec.token is not None:
            return spec.token.get_secret_value(), None
        if spec.login is not None:
            return await self._login(spec.login)
        if spec.oauth2 is not None:
            return await self._oauth2(spec.oauth2)
        assert spec.command is not None
        return await self._command(spec.command)

    async def _post(self, what: str, method: str, url: str, timeout: float, **kw: Any) -> httpx.Response:
        try:
            resp = await net.request(self.http, method, url, timeout=timeout, **kw)
        except httpx.TimeoutException:
            raise AuthError(f"auth '{self.name}': {what} timed out after {timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise AuthError(
                f"auth '{self.name}': {what} to {redact_url(url)} failed ({type(exc).__name__})"
            ) from None
        if not 200 <= resp.status_code < 300:
            raise AuthError(f"auth '{self.name}': {what} failed: HTTP {resp.status_code}")
        return resp

    async def _login(self, login: LoginAuth) -> tuple[str, float | None]:
        headers = _unwrap(login.headers)
        kw: dict[str, Any] = {"headers": headers}
        if login.json_body is not None:
            kw["content"] = json.dumps(_unwrap(login.json_body)).encode()
            headers.setdefault("Content-Type", "application/json")
        elif login.form is not None:
            kw["content"] = urlencode(_unwrap(login.form)).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        resp = await self._post("login", login.method, login.url, login.timeout, **kw)
        where = login.token
        body: Any = None
        if where.json_path is not None or login.expires_in is not None:
            try:
                body = resp.json()
            except ValueError:
                body = None
        if where.json_path is not None:
            value = value_at(body, where.json_path) if isinstance(body, dict) else None
            if not isinstance(value, str):
                raise AuthError(
                    f"auth '{self.name}': login response has no text at JSON path {where.json_path}"
                )
        elif where.header is not None:
            value = resp.headers.get(where.header)
        else:
            value = resp.cookies.get(str(where.cookie))
        if value is None:
            source = f"header {where.header}" if where.header else f"cookie {where.cookie}"
            raise AuthError(f"auth '{self.name}': login response has no {source}")
        lifetime = login.ttl
        if login.expires_in is not None:
            raw = value_at(body, login.expires_in.json_path) if isinstance(body, dict) else None
            try:
                lifetime = float(raw) if raw is not None and float(raw) > 0 else lifetime
            except (TypeError, ValueError):
                log.warning("auth '%s': %s is not a number of seconds", self.name, login.expires_in.json_path)
        return value, lifetime

    async def _oauth2(self, o: OAuth2Auth) -> tuple[str, float | None]:
        form = {"grant_type": "client_credentials"}
        if o.scope:
            form["scope"] = o.scope
        if o.audience:
            form["audience"] = o.audience
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        secret = o.client_secret.get_secret_value()
        if o.client_auth == "basic":
            pair = f"{o.client_id}:{secret}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        else:
            form.update(client_id=o.client_id, client_secret=secret)
        resp = await self._post(
            "token request", "POST", o.token_url, o.timeout, headers=headers, content=urlencode(form)
        )
        try:
            body = resp.json()
        except ValueError:
            body = None
        value = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(value, str):
            raise AuthError(f"auth '{self.name}': token response has no access_token")
        try:
            lifetime = float(body["expires_in"]) if body.get("expires_in") is not None else None
        except (TypeError, ValueError):
            lifetime = None
        return value, lifetime

    async def _command(self, c: CommandAuth) -> tuple[str, float | None]:
        """Run the token command in a session of its own, so a timeout kills what it started
        too (a helper's child holding stdout open would otherwise outlive the timeout); its
        stdout is read up to ``MAX_TOKEN`` bytes."""
        program = c.argv[0]
        try:
            proc = await asyncio.create_subprocess_exec(
                *c.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,  # may echo secrets: never read
                start_new_session=True,
            )
        except OSError as exc:
            raise AuthError(f"auth '{self.name}': cannot run {program}: {exc.strerror}") from None
        assert proc.stdout is not None
        finished = False
        try:
            async with asyncio.timeout(c.timeout):
                out = b""
                while len(out) <= MAX_TOKEN:
                    chunk = await proc.stdout.read(MAX_TOKEN + 1 - len(out))
                    if not chunk:  # EOF: the command is done writing
                        break
                    out += chunk
                else:
                    raise AuthError(
                        f"auth '{self.name}': {program} printed more than {MAX_TOKEN} bytes: not a token"
                    )
                await proc.wait()
                finished = True
        except TimeoutError:
            raise AuthError(f"auth '{self.name}': {program} timed out after {c.timeout:g}s") from None
        finally:
            if not finished:  # timed out, flooded or cancelled: end all it started
                await _kill(proc)
        if proc.returncode != 0:
            raise AuthError(f"auth '{self.name}': {program} exited with status {proc.returncode}")
        return out.decode(errors="replace").strip(), c.ttl

    def health(self) -> dict[str, Any]:
        """No token, no secret: whether one is held and how many were fetched."""
        return {"kind": self.spec.kind, "has_token": self._token is not None, "fetches": self.fetches}


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """End the command's whole session (it may have left children), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2.0):
            if proc.stdout is not None:
                await proc.stdout.read()  # EOF, so the pipe's transport is closed too
            await proc.wait()


def build(specs: dict[str, AuthSpec], http: httpx.AsyncClient) -> dict[str, Authenticator]:
    return {name: Authenticator(name, spec, http) for name, spec in specs.items()}
