"""HTTP injector: send a templated request (lead, payment webhook, approval), or several in order, for one probe.

Every request carries a ``traceparent`` naming its own CLIENT span in the probe's trace (so an
instrumented funnel joins it) and the synthetic markers (``tracer.synthetic``). A request may
name a credential of the spec's ``auth:`` map (``tracer.inject.auth``).

Several requests (``requests: [...]``) model a two-step creation: each may ``capture`` values
from its JSON response (``{lead_id: id}``), which later requests, the hop matchers and the step's
``cleanup:`` use as ``{capture.lead_id}``. The probe starts (hops measure from) the request
marked ``start: true``, by default the last. Any request failing makes the probe ``inject_failed``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal
from urllib.parse import urlencode, urlsplit

import httpx
from pydantic import Field, model_validator

from tracer import clock, net, synthetic
from tracer.evidence import excerpt
from tracer.inject import CleanupOutcome, Injection
from tracer.inject.auth import Authenticator, AuthError
from tracer.inject.signing import Signing
from tracer.net import redact_url
from tracer.payload import value_at
from tracer.plugins import Finding, InjectContext, InjectorPlugin
from tracer.probe import CAPTURE_REF, Probe
from tracer.schema import Duration, HttpUrl, Model

_CAPTURE_PATH = r"^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*$"


class HttpRequest(Model):
    """One templated HTTP request: an injection request, or a cleanup request."""

    name: str | None = Field(None, description="label in reports and spans (default: METHOD path)")
    method: Literal["POST", "PUT", "PATCH", "GET", "DELETE"] = "POST"
    url: HttpUrl = Field(description="templated, e.g. {FUNNEL_URL}/leads/{capture.lead_id}")
    headers: dict[str, str] = {}
    json_body: Any = Field(None, alias="json", description="JSON body, templated")
    form: dict[str, str] | None = Field(None, description="form body, templated")
    timeout: Duration = Field(10.0, ge=0.1, description="give up on the request after this (at least 100ms)")
    sign: Signing | None = None
    auth: str | None = Field(None, description="name of an entry of the top-level auth map")
    capture: dict[
        Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")],
        Annotated[str, Field(pattern=_CAPTURE_PATH)],
    ] = Field(
        default_factory=dict,
        description="name: JSON path in the response, e.g. {lead_id: id}; used later as {capture.lead_id}",
    )
    start: bool = Field(
        False, description="multi-request: this request is the probe's start (default: the last)"
    )
    accept_status: list[Annotated[str, Field(pattern=r"^([1-5]xx|[1-5][0-9][0-9])$")]] = Field(
        default_factory=lambda: ["2xx"],
        description="answers that mean the probe was delivered, e.g. [2xx] or, for a forged webhook, [2xx, 4xx]",
    )

    def accepts(self, status: int) -> bool:
        return any(
            a == str(status) or (a.endswith("xx") and a[0] == str(status)[0]) for a in self.accept_status
        )

    def label(self) -> str:
        return self.name or f"{self.method} {redact_url(self.url)}"

    def capture_refs(self) -> set[str]:
        """Names of ``{capture.X}`` this request's templates use."""
        text = json.dumps([self.url, self.headers, self.json_body, self.form], default=str)
        return set(CAPTURE_REF.findall(text))

    @model_validator(mode="after")
    def _one_body(self) -> HttpRequest:
        if self.json_body is not None and self.form is not None:
            raise ValueError("give either json or form, not both")
        if self.sign is not None and self.sign.scheme == "body_token" and self.json_body is None:
            raise ValueError("sign.scheme body_token puts the secret in a JSON body: give json, not form")
        return self


class HttpInject(HttpRequest):
    """One request (the fields below), or several in order (``requests:``). A later request, the
    hop matchers and the step's cleanup can use what an earlier one captured."""

    url: HttpUrl | None = Field(None, description="the request (or use requests)")  # type: ignore[assignment]
    requests: list[HttpRequest] | None = Field(
        None,
        min_length=1,
        description="several requests sent in order, instead of one; the start is the one marked start: true (default the last)",
    )

    @model_validator(mode="after")
    def _one_or_many(self) -> HttpInject:
        if self.requests is None:
            if self.url is None:
                raise ValueError("give url (one request) or requests (several)")
            if self.capture_refs():
                raise ValueError("a single request cannot use {capture.*}: nothing is captured before it")
            return self
        extra = sorted(self.model_fields_set - {"requests"})
        if extra:
            raise ValueError(f"with requests, give {', '.join(extra)} in each request, not beside them")
        if sum(r.start for r in self.requests) > 1:
            raise ValueError("at most one request may be the start")
        seen: set[str] = set()
        for i, r in enumerate(self.requests):
            missing = sorted(r.capture_refs() - seen)
            if missing:
                raise ValueError(
                    f"requests[{i}] uses {{capture.{missing[0]}}}, which no earlier request captures"
                )
            dup = seen & set(r.capture)
            if dup:
                raise ValueError(f"requests[{i}] captures '{sorted(dup)[0]}' again")
            seen |= set(r.capture)
        # `timeout` bounds one send, so a probe's duration: here the requests' sum.
        object.__setattr__(self, "timeout", sum(r.timeout for r in self.requests))
        return self

    def request_list(self) -> list[HttpRequest]:
        if self.requests is not None:
            return list(self.requests)
        fields = {k: getattr(self, k) for k in HttpRequest.model_fields}
        return [HttpRequest.model_construct(_fields_set=self.model_fields_set - {"requests"}, **fields)]

    def start_index(self) -> int:
        reqs = self.request_list()
        return next((i for i, r in enumerate(reqs) if r.start), len(reqs) - 1)

    def captured_names(self) -> set[str]:
        return {n for r in self.request_list() for n in r.capture}

    def auth_names(self) -> list[tuple[str, str]]:
        if self.requests is None:
            return [("auth", self.auth)] if self.auth else []
        return [(f"requests[{i}].auth", r.auth) for i, r in enumerate(self.requests) if r.auth]


def build_request(
    spec: HttpRequest, probe: Probe, extra_headers: dict[str, str]
) -> tuple[str, str, dict[str, str], bytes]:
    """Render templates and serialize the body; the bytes returned are the bytes signed and sent."""
    headers = {probe.render_text(k): probe.render_text(str(v)) for k, v in spec.headers.items()}
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
    return spec.method, probe.render_text(str(spec.url)), headers, body


# A request that cannot be sent as rendered: a header that is not ASCII, a URL that does not parse
# (``${VAR}`` and captures are filled in at run time). UnicodeEncodeError is a ValueError.
_UNSENDABLE = (ValueError, httpx.InvalidURL, httpx.CookieConflict)


async def exchange(
    client: httpx.AsyncClient,
    spec: HttpRequest,
    probe: Probe,
    extra_headers: dict[str, str],
    auth: Authenticator | None = None,
    redact: tuple[str, ...] = (),
) -> tuple[Injection, httpx.Response | None]:
    """``_exchange``, with a request that cannot be built an ``inject_failed`` saying so (the
    exception's type only: its text may quote a header value)."""
    try:
        return await _exchange(client, spec, probe, extra_headers, auth, redact)
    except _UNSENDABLE as exc:
        now = clock.now()
        attrs = {
            "http.request.method": spec.method,
            "error.type": type(exc).__name__,
            "user_agent.synthetic.type": "test",
        }
        error = f"cannot send the request as rendered ({type(exc).__name__}): check its URL and headers"
        return Injection(now, now, ok=False, error=error, attributes=attrs), None


async def _exchange(
    client: httpx.AsyncClient,
    spec: HttpRequest,
    probe: Probe,
    extra_headers: dict[str, str],
    auth: Authenticator | None = None,
    redact: tuple[str, ...] = (),
) -> tuple[Injection, httpx.Response | None]:
    """Send one request (with ``auth``'s token; on a 401, once more with a fresh one) and keep
    the response for captures. The time spent logging in is before ``sent_at``: a login is not
    the funnel's lag."""
    method = spec.method
    url = probe.render_text(str(spec.url))
    parts = urlsplit(url)
    attrs: dict[str, Any] = {
        "http.request.method": method,
        "url.full": redact_url(url),
        "server.address": parts.hostname or "",
        "server.port": parts.port or (443 if parts.scheme == "https" else 80),
        "user_agent.synthetic.type": "test",
    }
    retried = False
    while True:
        auth_headers: dict[str, str] = {}
        if auth is not None:
            try:
                auth_headers = await auth.headers()
            except AuthError as exc:
                now = clock.now()
                attrs["error.type"] = "auth"
                return Injection(now, now, ok=False, error=str(exc), attributes=attrs), None
        method, url, headers, body = build_request(spec, probe, {**extra_headers, **auth_headers})
        left = _FirstByte()
        queued = clock.now()
        try:
            resp = await net.request(
                client,
                method,
                url,
                headers=headers,
                content=body,
                timeout=spec.timeout,
                extensions={"trace": left},
            )
        except httpx.PoolTimeout:
            # Our own connection pool was full (the tracer's load, not the funnel's): nothing
            # left, so nothing can be said about the funnel.
            attrs["error.type"] = "pool_timeout"
            err = f"no free connection within {spec.timeout:g}s (tracer overloaded)"
            return Injection(left.at or queued, clock.now(), ok=False, error=err, attributes=attrs), None
        except httpx.ConnectTimeout:
            attrs["error.type"] = "connect_timeout"  # like a refused connection: no answer to judge
            err = f"connect timeout after {spec.timeout:g}s"
            return Injection(left.at or queued, clock.now(), ok=False, error=err, attributes=attrs), None
        except httpx.TimeoutException:
            # The whole timeout went before the request left: nothing to judge the funnel by.
            if left.at is None:  # waiting for a connection of our own pool
                attrs["error.type"] = "pool_timeout"
                err = f"no free connection within {spec.timeout:g}s (tracer overloaded)"
            elif not left.head_sent:
                attrs["error.type"] = "connect_timeout"
                err = f"connect timeout after {spec.timeout:g}s"
            else:
                attrs["error.type"] = "timeout"
                err = f"timeout after {spec.timeout:g}s"
            return Injection(left.at or queued, clock.now(), ok=False, error=err, attributes=attrs), None
        except httpx.HTTPError as exc:
            attrs["error.type"] = type(exc).__name__
            return Injection(
                left.at or queued, clock.now(), ok=False, error=_short_error(exc), attributes=attrs
            ), None
        sent = left.at or queued
        if resp.status_code == 401 and auth is not None and auth.refreshable and not retried:
            auth.rejected(headers)  # expired or revoked: log in again and retry once
            retried = True
            attrs["funnel.auth.retried"] = True
            continue
        break
    done = clock.now()
    attrs["http.response.status_code"] = resp.status_code
    ok = spec.accepts(resp.status_code)
    if resp.status_code >= 400:
        attrs["error.type"] = str(resp.status_code)
    error = None if ok else f"HTTP {resp.status_code}"
    answer = None if ok else _answer(resp, spec, headers, redact) or None
    injection = Injection(
        sent, done, ok=ok, status=resp.status_code, error=error, attributes=attrs, response=answer
    )
    return injection, resp


class _FirstByte:
    """httpcore's ``trace`` hook: when the request's first byte left, i.e. the TCP connect of a new
    connection, or the request head on a pooled one. Stamping before ``client.request`` would
    count the wait for a free connection in our own pool (the tracer's load) as funnel lag."""

    STARTS = ("connection.connect_tcp.started", "connection.connect_unix_socket.started")

    def __init__(self) -> None:
        self.at: float | None = None
        self.head_sent = False  # the request head went out (connected)

    async def __call__(self, name: str, info: dict[str, Any]) -> None:
        if self.at is None and (name in self.STARTS or name.endswith("send_request_headers.started")):
            self.at = clock.now()
        if name.endswith("send_request_headers.started"):
            self.head_sent = True


async def send(
    client: httpx.AsyncClient,
    spec: HttpRequest,
    probe: Probe,
    extra_headers: dict[str, str],
    auth: Authenticator | None = None,
) -> Injection:
    return (await exchange(client, spec, probe, extra_headers, auth))[0]


def take_captures(spec: HttpRequest, resp: httpx.Response, probe: Probe) -> str | None:
    """Copy ``spec.capture``'s values from the response into ``probe.captures``; an error (no
    JSON, nothing at a path) as short text, never the response body."""
    if not spec.capture:
        return None
    if resp.extensions.get("truncated"):
        return f"capture: the response to {spec.label()} is larger than {net.MAX_BODY} bytes"
    try:
        body = resp.json()
    except ValueError:
        return f"capture: the response to {spec.label()} is not JSON"
    for name, path in spec.capture.items():
        value = value_at(body, path)
        if value is None:
            return f"capture '{name}': nothing at {path} in the response to {spec.label()}"
        probe.captures[name] = value
    return None


_CREDENTIAL_HEADERS = ("authorization", "cookie", "x-api-key", "api-key", "x-auth-token")


def _answer(
    resp: httpx.Response, spec: HttpInject, sent_headers: dict[str, str], redact: tuple[str, ...] = ()
) -> str:
    """The first ~300 characters of a refusal (422 bodies name the missing field), with every
    secret we sent replaced: the signing secret, credential headers' values and every value
    the spec took from the environment (a funnel may echo the body it refused)."""
    secrets = list(redact) + [v for k, v in sent_headers.items() if k.lower() in _CREDENTIAL_HEADERS]
    secrets += [v.split(" ", 1)[-1] for v in secrets]  # "Bearer <token>": the token alone too
    if spec.sign is not None:
        secrets.append(spec.sign.secret.get_secret_value())
    return excerpt(resp.content[:2048], secrets)


def _short_error(exc: Exception) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or unreachable"
    return type(exc).__name__


def _marked(spec: HttpRequest, marker: synthetic.SyntheticSpec) -> HttpRequest:
    url = str(spec.url)
    marked = synthetic.mark_body(marker, url, spec.json_body, spec.form)
    if marked is None:
        return spec
    return spec.model_copy(update={"json_body": marked[0], "form": marked[1]})


class HttpInjector:
    """One step's HTTP injection: its request(s), marked as synthetic once, sent per probe over
    the engine's shared client, each carrying a ``traceparent`` naming its own span."""

    def __init__(self, config: HttpInject, ctx: InjectContext) -> None:
        self.marker = ctx.synthetic
        self.client: httpx.AsyncClient = ctx.http
        self.auth: dict[str, Authenticator] = dict(ctx.auth or {})
        self.redact = tuple(getattr(ctx, "redact", ()))
        self.requests = [_marked(r, self.marker) for r in config.request_list()]
        self.start = config.start_index()
        self.multi = config.requests is not None
        self.spec = self.requests[0]
        self.timeout = config.timeout

    async def send(self, probe: Probe) -> Injection:
        done: list[Injection] = []
        for i, req in enumerate(self.requests):
            span_id = probe.request_span_id(i, self.start)
            extra = {
                **synthetic.header(self.marker, req.headers),
                "traceparent": f"00-{probe.trace_id}-{span_id}-01",
            }
            inj, resp = await exchange(
                self.client, req, probe, extra, self.auth.get(req.auth or ""), self.redact
            )
            if inj.ok and resp is not None:
                error = take_captures(req, resp, probe)
                if error is not None:
                    inj.ok, inj.error = False, error
            if self.multi:
                inj.attributes.update(
                    {
                        "funnel.request.index": i,
                        "funnel.request.name": req.label(),
                        "funnel.request.start": i == self.start,
                    }
                )
            done.append(inj)
            if not inj.ok:
                break
        if not self.multi:
            return done[0]
        failed = next((r for r in done if not r.ok), None)
        start = done[self.start] if len(done) > self.start else done[-1]
        error = None
        if failed is not None:
            error = f"request {len(done)} of {len(self.requests)} ({self.requests[len(done) - 1].label()}): {failed.error}"
        return Injection(
            sent_at=start.sent_at,
            done_at=done[-1].done_at,
            ok=failed is None,
            status=(failed or start).status,
            error=error,
            attributes=dict(start.attributes),
            requests=done,
            start_index=self.start,
        )

    async def close(self) -> None:
        """The client is the engine's."""


async def _preflight(config: HttpInject, step: str) -> list[Finding]:
    """Does the injection URL answer at all (a HEAD: nothing is injected)? Any HTTP answer counts:
    a 405 to HEAD still proves the host and port are right. (An empty signing secret is already
    refused by ``validate``.)"""
    where = f"steps.{step}.inject.http"
    out: list[Finding] = []
    urls = {Probe(step=step).render_text(str(r.url)) for r in config.request_list()}
    async with httpx.AsyncClient(timeout=min(config.timeout, 5.0)) as client:
        for url in sorted(u for u in urls if not CAPTURE_REF.search(u)):  # captured ids: not known yet
            try:
                resp = await client.head(url, headers={"User-Agent": "funnel-tracer doctor"})
                out.append(
                    Finding(f"{where}: {redact_url(url)} answers", True, f"HTTP {resp.status_code} to HEAD")
                )
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


async def run_cleanup(requests: list[HttpRequest], probe: Probe, ctx: InjectContext) -> list[CleanupOutcome]:
    """A step's ``cleanup:`` requests, in order, after its probe resolved. A request whose
    captures were never made (the injection failed first) is skipped and says so."""
    out: list[CleanupOutcome] = []
    for req in requests:
        what = req.label()
        missing = sorted(req.capture_refs() - set(probe.captures))
        if missing:
            out.append(CleanupOutcome(what, ok=False, error=f"skipped: nothing captured as '{missing[0]}'"))
            continue
        extra = synthetic.header(ctx.synthetic, req.headers)
        inj, _ = await exchange(
            ctx.http, req, probe, extra, (ctx.auth or {}).get(req.auth or ""), tuple(ctx.redact)
        )
        out.append(CleanupOutcome(what, ok=inj.ok, error=inj.error, status=inj.status))
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

    if config.requests is None:
        walk(config.json_body, "json")
        walk(config.form, "form")
    for i, r in enumerate(config.requests or []):
        walk(r.json_body, f"requests[{i}].json")
        walk(r.form, f"requests[{i}].form")
    return out


plugin = InjectorPlugin(
    name="http",
    config=HttpInject,
    factory=HttpInjector,
    summary="send a templated HTTP request (optionally signed) for each probe",
    body_strings=_body_strings,
    preflight=_preflight,
    captures=lambda config: config.captured_names(),
    auth_names=lambda config: config.auth_names(),
    request=HttpRequest,
    run_requests=run_cleanup,
)
