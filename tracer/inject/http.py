"""HTTP injector: send a templated request (lead, payment webhook, approval) for one probe.

Every request carries the probe's ``traceparent`` (so an instrumented funnel joins the probe's
trace) and the synthetic markers (``tracer.synthetic``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal
from urllib.parse import urlencode, urlsplit

import httpx
from pydantic import Field, model_validator

from tracer import clock, synthetic
from tracer.evidence import excerpt
from tracer.inject import Injection
from tracer.inject.signing import Signing
from tracer.net import redact_url
from tracer.plugins import Finding, InjectContext, InjectorPlugin
from tracer.probe import Probe
from tracer.schema import Duration, Model


class HttpInject(Model):
    method: Literal["POST", "PUT", "PATCH", "GET", "DELETE"] = "POST"
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = {}
    json_body: Any = Field(None, alias="json")
    form: dict[str, str] | None = None
    timeout: Duration = Field(10.0, ge=0.1, description="give up on the request after this (at least 100ms)")
    sign: Signing | None = None
    accept_status: list[Annotated[str, Field(pattern=r"^([1-5]xx|[1-5][0-9][0-9])$")]] = Field(
        default_factory=lambda: ["2xx"],
        description="answers that mean the probe was delivered, e.g. [2xx] or, for a forged webhook, [2xx, 4xx]",
    )

    def accepts(self, status: int) -> bool:
        return any(
            a == str(status) or (a.endswith("xx") and a[0] == str(status)[0]) for a in self.accept_status
        )

    @model_validator(mode="after")
    def _one_body(self) -> HttpInject:
        if self.json_body is not None and self.form is not None:
            raise ValueError("give either json or form, not both")
        if self.sign is not None and self.sign.scheme == "body_token" and self.json_body is None:
            raise ValueError("sign.scheme body_token puts the secret in a JSON body: give json, not form")
        return self


def build_request(
    spec: HttpInject, probe: Probe, extra_headers: dict[str, str]
) -> tuple[str, str, dict[str, str], bytes]:
    """Render templates and serialize the body; the bytes returned are the bytes signed and sent."""
    headers = {k: str(v) for k, v in probe.render(spec.headers).items()}
    body = b""
    if spec.json_body is not None:
        obj = probe.render(spec.json_body)
        if spec.sign is not None:
            obj = spec.sign.prepare(obj)
        body = json.dumps(obj, separators=(",", ":")).encode()
        headers.setdefault("Content-Type", "application/json")
    elif spec.form is not None:
        body = urlencode(probe.render(spec.form)).encode()
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    if spec.sign is not None:
        headers.update(spec.sign.headers(body))
    headers.update(extra_headers)
    return spec.method, probe.render(spec.url), headers, body


async def send(
    client: httpx.AsyncClient, spec: HttpInject, probe: Probe, extra_headers: dict[str, str]
) -> Injection:
    method, url, headers, body = build_request(spec, probe, extra_headers)
    parts = urlsplit(url)
    attrs: dict[str, Any] = {
        "http.request.method": method,
        "url.full": redact_url(url),
        "server.address": parts.hostname or "",
        "server.port": parts.port or (443 if parts.scheme == "https" else 80),
        "user_agent.synthetic.type": "test",
    }
    sent = clock.now()
    try:
        resp = await client.request(method, url, headers=headers, content=body, timeout=spec.timeout)
    except httpx.TimeoutException:
        err = f"timeout after {spec.timeout:g}s"
        attrs["error.type"] = "timeout"
        return Injection(sent, clock.now(), ok=False, error=err, attributes=attrs)
    except httpx.HTTPError as exc:
        attrs["error.type"] = type(exc).__name__
        return Injection(sent, clock.now(), ok=False, error=_short_error(exc), attributes=attrs)
    done = clock.now()
    attrs["http.response.status_code"] = resp.status_code
    ok = spec.accepts(resp.status_code)
    if resp.status_code >= 400:
        attrs["error.type"] = str(resp.status_code)
    return Injection(
        sent,
        done,
        ok=ok,
        status=resp.status_code,
        error=None if ok else f"HTTP {resp.status_code}",
        attributes=attrs,
        response=None if ok else _answer(resp, spec, headers) or None,
    )


_CREDENTIAL_HEADERS = ("authorization", "cookie", "x-api-key", "api-key", "x-auth-token")


def _answer(resp: httpx.Response, spec: HttpInject, sent_headers: dict[str, str]) -> str:
    """The first ~300 characters of a refusal (422 bodies name the missing field), with every
    secret we sent replaced: the signing secret and credential headers' values."""
    secrets = [v for k, v in sent_headers.items() if k.lower() in _CREDENTIAL_HEADERS]
    secrets += [v.split(" ", 1)[-1] for v in secrets]  # "Bearer <token>": the token alone too
    if spec.sign is not None:
        secrets.append(spec.sign.secret.get_secret_value())
    return excerpt(resp.content[:2048], secrets)


def _short_error(exc: Exception) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or unreachable"
    return type(exc).__name__


class HttpInjector:
    """One step's HTTP injection: the template, marked as synthetic once, sent per probe over
    the engine's shared client."""

    def __init__(self, config: HttpInject, ctx: InjectContext) -> None:
        self.marker = ctx.synthetic
        self.client: httpx.AsyncClient = ctx.http
        marked = synthetic.mark_body(self.marker, config.url, config.json_body, config.form)
        if marked is not None:
            config = config.model_copy(update={"json_body": marked[0], "form": marked[1]})
        self.spec = config
        self.timeout = config.timeout

    async def send(self, probe: Probe) -> Injection:
        extra = {**synthetic.header(self.marker, self.spec.headers), "traceparent": probe.traceparent}
        return await send(self.client, self.spec, probe, extra)

    async def close(self) -> None:
        """The client is the engine's."""


async def _preflight(config: HttpInject, step: str) -> list[Finding]:
    """Does the injection URL answer at all (a HEAD: nothing is injected)? Any HTTP answer counts:
    a 405 to HEAD still proves the host and port are right. (An empty signing secret is already
    refused by ``validate``.)"""
    url = Probe(step=step).render(config.url)
    where = f"steps.{step}.inject.http"
    out: list[Finding] = []
    try:
        async with httpx.AsyncClient(timeout=min(config.timeout, 5.0)) as client:
            resp = await client.head(url, headers={"User-Agent": "funnel-tracer doctor"})
        out.append(Finding(f"{where}: {redact_url(url)} answers", True, f"HTTP {resp.status_code} to HEAD"))
    except httpx.HTTPError as exc:
        out.append(
            Finding(
                f"{where}: {redact_url(url)} answers",
                False,
                _short_error(exc) if not isinstance(exc, httpx.TimeoutException) else "timeout",
                fix="check the URL, that the funnel is running, and that this host can reach it",
            )
        )
    return out


def _body_strings(config: HttpInject) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, str):
            out.append((path, node))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(config.json_body, "json")
    walk(config.form, "form")
    return out


plugin = InjectorPlugin(
    name="http",
    config=HttpInject,
    factory=HttpInjector,
    summary="send a templated HTTP request (optionally signed) for each probe",
    body_strings=_body_strings,
    preflight=_preflight,
)
