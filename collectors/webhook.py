"""Webhook receiver: one HTTP server, many paths, on the engine's own event loop.

Notification channels (Slack incoming webhooks, generic JSON webhooks, PostHog realtime
destinations) *push* to us, so this collector is a small HTTP server instead of a poller. The
sender is told ``http://<host>:<port>/<secret>/<path>``; each hop names the ``path`` it expects.

Honesty rules:
- A push receiver is not retroactive: a delivery made while it was down may never come back.
  Coverage is certified by a heartbeat while the server runs (and on every request); if the
  server stops without being asked to, the collector turns blind (``Coverage.failed``).
- A sighting is stamped when the whole body has been read, so ``at == not_before`` (no error
  bar beyond the receiver's own scheduling, which ``bench/receiver_detection.py`` measures).
- Unauthenticated (401), oversized (413) or malformed (400) requests never match a watch; they
  are counted for ``health()`` and the server keeps serving.
- Bodies that match nothing are dropped as soon as they are scanned: a flood of unrelated
  posts costs CPU, never memory. Secrets are compared in constant time and never logged
  (uvicorn's access log, which would print the secret path, is off).

Other collectors can receive pushes here too: ``route(path, on_body)`` hands them every
accepted body on ``path`` (the PostHog collector uses this for realtime destinations).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ClassVar
from urllib.parse import parse_qs

import uvicorn
from pydantic import Field, field_validator, model_validator

from tracer import clock
from tracer.net import is_loopback
from tracer.payload import strings_in, value_at
from tracer.plugins import SinkPlugin
from tracer.probe import TRACE_ID
from tracer.schema import Duration, Model, Secret
from tracer.watch import Coverage, Observation, Watch, WatchIndex

log = logging.getLogger(__name__)

Body = dict | list | str
"""A parsed push: JSON object or array, or the text of a ``text/*`` body."""

OnBody = Callable[[Body, float], None]
"""``on_body(body, received)``: ``received`` is monotonic (``clock.now()``) when the body was read."""

_SEGMENT = r"[A-Za-z0-9._~-]+"
_PATH = rf"^/?{_SEGMENT}(/{_SEGMENT})*/?$"
_JSON_PATH = r"^[^.\[\]]+(\[\d+\]|\.[^.\[\]]+)*$"


class WebhookConfig(Model):
    host: str = Field("127.0.0.1", description="bind address; anything but loopback needs allow_public")
    port: int = Field(0, ge=0, le=65535, description="0: an ephemeral port (see WebhookCollector.port)")
    allow_public: bool = Field(False, description="explicit opt-in to bind a non-loopback address")
    secret_path: Secret | None = Field(None, description="senders must post to /<secret_path>/<path>")
    hmac_secret: Secret | None = Field(None, description="require hex HMAC-SHA256 of the raw body")
    hmac_header: str = Field(
        "X-Signature", min_length=1, description="header carrying the HMAC ('sha256=' prefix optional)"
    )
    max_body: int = Field(256 * 1024, gt=0, description="bytes; larger bodies get 413")
    max_connections: int = Field(100, gt=0, description="concurrent connections/requests; beyond that, 503")
    heartbeat: Duration = Field(0.5, gt=0, description="how often a running server certifies coverage")

    @field_validator("secret_path")
    @classmethod
    def _one_segment(cls, v: Secret | None) -> Secret | None:
        if v is not None and not re.fullmatch(_SEGMENT, v.get_secret_value()):
            raise ValueError("secret_path must be one URL path segment (letters, digits, . _ ~ -)")
        return v

    @model_validator(mode="after")
    def _loopback_unless_public(self) -> WebhookConfig:
        if not is_loopback(self.host):
            if not self.allow_public:
                raise ValueError(
                    f"host {self.host} is not loopback; set allow_public: true to expose the receiver"
                )
            if self.secret_path is None and self.hmac_secret is None:
                raise ValueError("a public receiver needs secret_path or hmac_secret")
        return self


class WebhookHop(Model):
    path: str = Field(
        pattern=_PATH, description="receiver path the sender posts to (after the secret segment)"
    )
    json_path: str | None = Field(
        None,
        pattern=_JSON_PATH,
        description="where the trace id is, e.g. blocks[0].text.text; default anywhere",
    )

    @field_validator("path")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip("/")


class _Rejected(Exception):
    """A request we answer with an error status; never a crash, never a match."""

    def __init__(self, status: int, counter: str, message: str) -> None:
        super().__init__(message)
        self.status, self.counter, self.message = status, counter, message


class _Server(uvicorn.Server):
    """uvicorn, minus signal capture: the engine owns SIGINT/SIGTERM, and a receiver that shut
    itself down on Ctrl+C would turn blind before the engine could report."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket; bound before serving so port 0 is known at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class WebhookCollector:
    sink: ClassVar[str] = "webhook"

    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self.coverage = Coverage(retroactive=False)
        self.port: int | None = None  # the bound port, once started
        self._index = WatchIndex()
        self._routes: dict[str, list[OnBody]] = {}
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing = False
        self.counters = dict.fromkeys(
            ("accepted", "matched", "routed", "unauthenticated", "malformed", "oversized", "handler_errors"),
            0,
        )

    # -- Collector protocol -------------------------------------------------
    @property
    def error_bar(self) -> float:
        return 0.0  # a push is stamped on arrival

    async def start(self) -> None:
        sock = bind(self.config.host, self.config.port)
        self.port = sock.getsockname()[1]
        uv_config = uvicorn.Config(
            self._app,
            interface="asgi3",
            lifespan="off",
            log_config=None,  # leave the engine's logging alone
            log_level="warning",
            access_log=False,  # would print the secret path
            limit_concurrency=self.config.max_connections,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(uv_config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]), name="webhook-receiver")
        while not self._server.started:
            if self._serving.done():
                self._serving.result()  # raise what stopped it
                raise RuntimeError("webhook receiver stopped during start-up")
            await asyncio.sleep(0.005)
        self._serving.add_done_callback(self._on_server_exit)
        self.coverage.looked(clock.now())
        self._heartbeat = asyncio.create_task(self._beat(), name="webhook-heartbeat")
        log.info("webhook receiver listening on %s:%d", self.config.host, self.port)

    async def close(self) -> None:
        self._closing = True
        if self._heartbeat:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self._server and self._serving and not self._serving.done():
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._serving), timeout=5)
            except asyncio.TimeoutError:
                self._serving.cancel()
                await asyncio.gather(self._serving, return_exceptions=True)

    def watch(self, w: Watch) -> None:
        self._index.add(w)

    def unwatch(self, w: Watch) -> None:
        self._index.discard(w)

    def health(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "port": self.port,
            "in_flight": len(self._index),
            "routes": len(self._routes),
            **self.counters,
        }

    # -- for senders and other collectors ---------------------------------------
    @property
    def up(self) -> bool:
        return self._serving is not None and not self._serving.done() and not self.coverage.blind_now

    def route(self, path: str, on_body: OnBody) -> None:
        """Hand every accepted body posted to ``path`` to ``on_body`` (called on the loop thread,
        after authentication and parsing). Hops on the same path still match as usual."""
        self._routes.setdefault(path.strip("/"), []).append(on_body)

    def endpoint(self, path: str) -> str:
        """The URL a sender must post to for ``path``, secret segment included. For configuring
        senders (and tests); it contains the secret, so never log it."""
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        prefix = f"/{self.config.secret_path.get_secret_value()}" if self.config.secret_path else ""
        return f"http://{host}:{self.port}{prefix}/{path.strip('/')}"

    # -- serving --------------------------------------------------------------
    async def _beat(self) -> None:
        while True:
            if self.up:
                self.coverage.looked(clock.now())
            await asyncio.sleep(self.config.heartbeat)

    def _on_server_exit(self, task: asyncio.Task[None]) -> None:
        if self._closing:
            return
        error = "cancelled" if task.cancelled() else repr(task.exception()) if task.exception() else "exited"
        log.error("webhook receiver stopped unexpectedly (%s); deliveries from now on may be missed", error)
        self.coverage.failed(clock.now())

    async def _app(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            return
        self.coverage.looked(clock.now())
        try:
            status, text = self._handle(scope, await self._read(scope, receive))
        except _Rejected as rej:
            self.counters[rej.counter] += 1
            status, text = rej.status, rej.message
        except Exception:  # a receiver bug answers 500 and keeps serving
            self.counters["handler_errors"] += 1
            log.exception("webhook receiver failed on a request")
            status, text = 500, "internal error\n"
        payload = text.encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(payload)).encode()),
        ]
        if status == 413:
            headers.append((b"connection", b"close"))  # the rest of the body is not worth reading
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _read(
        self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]]
    ) -> tuple[str, bytes, float]:
        """Authenticate the path, then read at most ``max_body`` bytes. Returns the hop path,
        the raw body and when it finished arriving."""
        if scope["method"] != "POST":
            raise _Rejected(405, "malformed", "POST only\n")
        path = self._hop_path(scope["path"])
        limit = self.config.max_body
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise _Rejected(413, "oversized", "body too large\n")
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Rejected(400, "malformed", "client went away\n")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _Rejected(413, "oversized", "body too large\n")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return path, b"".join(chunks), clock.now()

    def _hop_path(self, raw: str) -> str:
        """Strip and check the secret segment; what remains is the hop path."""
        path = raw.strip("/")
        if self.config.secret_path is not None:
            first, _, path = path.partition("/")
            expected = self.config.secret_path.get_secret_value()
            if not hmac.compare_digest(first.encode(), expected.encode()):
                raise _Rejected(401, "unauthenticated", "unauthorized\n")
        if not path:
            raise _Rejected(404, "malformed", "no receiver path\n")
        return path

    def _handle(self, scope: dict[str, Any], read: tuple[str, bytes, float]) -> tuple[int, str]:
        path, raw, received = read
        if self.config.hmac_secret is not None:
            self._verify(scope, raw)
        body = _parse(raw, _header(scope, b"content-type") or "")
        self.counters["accepted"] += 1
        if len(self._index):
            self._match(path, body, received)
        status = 200
        for on_body in self._routes.get(path, ()):
            self.counters["routed"] += 1
            try:
                on_body(body, received)
            except Exception:  # another collector's bug must not take the receiver down
                self.counters["handler_errors"] += 1
                log.exception("push handler for /%s failed", path)
                status = 500  # let the sender retry; a repeat sighting of one source is ignored
        return status, "ok" if status == 200 else "handler error\n"

    def _verify(self, scope: dict[str, Any], raw: bytes) -> None:
        assert self.config.hmac_secret is not None
        got = (_header(scope, self.config.hmac_header.lower().encode()) or "").strip()
        got = got.removeprefix("sha256=").lower()
        key = self.config.hmac_secret.get_secret_value().encode()
        want = hmac.new(key, raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(got.encode(), want.encode()):
            raise _Rejected(401, "unauthenticated", "bad signature\n")

    def _match(self, path: str, body: Body, received: float) -> None:
        for tid in set(TRACE_ID.findall("\n".join(strings_in(body)).lower())):
            for w in list(self._index.get(tid)):
                hop: WebhookHop = w.sink_spec
                if hop.path != path:
                    continue
                if (
                    hop.json_path is not None
                    and tid not in "\n".join(strings_in(value_at(body, hop.json_path))).lower()
                ):
                    continue
                w.observe(Observation(at=received, not_before=received, source="push", detail={"path": path}))
                self._index.discard(w)
                self.counters["matched"] += 1


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _parse(raw: bytes, content_type: str) -> Body:
    """JSON (the default), Slack's legacy ``payload=<json>`` form, or ``text/*``. Anything that
    does not decode is malformed (400)."""
    ctype = content_type.split(";")[0].strip().lower()
    try:
        text = raw.decode("utf-8")
        if ctype == "application/x-www-form-urlencoded":
            form = {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True, strict_parsing=True).items()}
            return json.loads(form["payload"]) if "payload" in form else form
        if ctype.startswith("text/"):
            if not text.strip():
                raise ValueError("empty body")
            return text
        body = json.loads(text)
    except (ValueError, KeyError, RecursionError) as exc:
        raise _Rejected(400, "malformed", "malformed body\n") from exc
    if not isinstance(body, (dict, list, str)):
        raise _Rejected(400, "malformed", "expected a JSON object, array or string\n")
    return body


plugin = SinkPlugin(
    name="webhook",
    config=WebhookConfig,
    hop=WebhookHop,
    factory=WebhookCollector,
    summary="an HTTP receiver for Slack-style or generic JSON webhook notifications",
)
