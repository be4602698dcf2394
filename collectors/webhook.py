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
- Authenticated by default: a receiver without ``secret_path`` or ``hmac_secret`` lets anyone
  who learns a trace id turn a lost probe into ``ok``, so the config refuses it unless the
  section says ``allow_unauthenticated: true`` (loopback only; a warning at start).
  ``hmac_scheme: timestamped`` (``t=<unix>,v1=<hex HMAC(secret, "<t>.<body>")>``) adds replay
  protection: a signature older or newer than ``hmac_tolerance`` is refused.
- Slow clients never crowd out deliveries (``_Guard``): the request head must arrive within
  ``header_timeout`` and the body within ``body_timeout``; at ``max_connections`` the connection
  that has waited longest for its head (idle or trickling) is shed to admit the new one (blind
  only if it was younger than ``SHED_AGE``: then it may have been a delivery). Only when nothing can be shed is a
  connection refused (503): that is counted (``health()["rejected"]``, ``/metrics``), marks the
  collector blind at that moment (``Coverage.failed`` then the next ``looked``), so a hop whose
  delivery may have been refused becomes ``unknown``, never ``lost``; the log line is
  rate-limited.

Evidence: the last deliveries (time, path, outcome and why, watched trace ids; no bodies, no
secrets) stay in a bounded ring (``tracer.receipts``), so a lost hop says what reached its path
instead (``explain``). The preflight binds the port once and names the authentication in use.

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
import math
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ClassVar, Literal, NoReturn
from urllib.parse import parse_qs

import h11
import uvicorn
from pydantic import Field, field_validator, model_validator
from uvicorn.protocols.http.h11_impl import H11Protocol

from tracer import clock, receipts
from tracer.evidence import Evidence
from tracer.net import is_loopback
from tracer.payload import strings_in, value_at
from tracer.plugins import Finding, SinkPlugin
from tracer.probe import TRACE_ID
from tracer.ratelog import Throttle
from tracer.schema import Duration, Model, Secret
from tracer.supervise import Supervisor
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
    hmac_scheme: Literal["body", "timestamped"] = Field(
        "body",
        description="body: hex HMAC of the raw body; timestamped: 't=<unix>,v1=<hex HMAC of \"<t>.<body>\">' "
        "(Stripe-style), refused outside hmac_tolerance: replay protection",
    )
    hmac_tolerance: Duration = Field(
        300.0, gt=0, description="timestamped scheme: how far a signature's t may be from our clock"
    )
    allow_unauthenticated: bool = Field(
        False, description="accept sightings without secret_path/hmac_secret (loopback only; warns at start)"
    )
    max_body: int = Field(256 * 1024, gt=0, description="bytes; larger bodies get 413")
    max_connections: int = Field(
        100, gt=0, description="open connections; at the cap the oldest idle/slow one is shed, else 503"
    )
    header_timeout: Duration = Field(10.0, gt=0, description="the request head must arrive within this")
    body_timeout: Duration = Field(10.0, gt=0, description="the body must arrive within this of the head")
    heartbeat: Duration = Field(0.5, gt=0, description="how often a running server certifies coverage")

    @field_validator("secret_path")
    @classmethod
    def _one_segment(cls, v: Secret | None) -> Secret | None:
        if v is not None and not re.fullmatch(_SEGMENT, v.get_secret_value()):
            raise ValueError("secret_path must be one URL path segment (letters, digits, . _ ~ -)")
        return v

    @property
    def authenticated(self) -> bool:
        return self.secret_path is not None or self.hmac_secret is not None

    @model_validator(mode="after")
    def _authenticated_and_loopback_unless_public(self) -> WebhookConfig:
        if not is_loopback(self.host):
            if not self.allow_public:
                raise ValueError(
                    f"host {self.host} is not loopback; set allow_public: true to expose the receiver"
                )
            if not self.authenticated:
                raise ValueError(
                    "a receiver on a non-loopback address always needs secret_path or hmac_secret "
                    "(allow_unauthenticated does not apply)"
                )
        elif not self.authenticated and not self.allow_unauthenticated:
            raise ValueError(
                "unauthenticated receiver: anyone who learns a trace id could post a sighting; set "
                "secret_path or hmac_secret (or allow_unauthenticated: true on a test bench)"
            )
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

    def __init__(
        self, status: int, counter: str, message: str, why: str, close: bool = False, delivery: bool = False
    ) -> None:
        super().__init__(message)
        self.status, self.counter, self.message = status, counter, message
        self.close = close or status == 413  # 413: the rest of the body is not worth reading
        # Past authentication (or before it could be checked: an HMAC needs the whole body), so
        # this may have been the funnel's delivery that we could not read: blind, not a miss.
        self.delivery = delivery
        self.why = f"{counter}: {why}"  # the evidence's label; never names a secret


class _Server(uvicorn.Server):
    """uvicorn, minus signal capture: the engine owns SIGINT/SIGTERM, and a receiver that shut
    itself down on Ctrl+C would turn blind before the engine could report."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


OVERSIZED_SCAN = 64  # x max_body: how far an oversized body is read (kept: nothing) for a trace id
SHED_AGE = 0.5  # seconds: shedding a head younger than this may lose a delivery (blind)
OVERLOAD_WINDOW = 30.0  # seconds: health says "not up" this long after a refused connection
_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nretry-after: 1\r\nconnection: close\r\n\r\n"


class _Guard:
    """Per-receiver connection bookkeeping: which phase each connection is in and since when.

    Phases: ``idle`` (no byte of the next request yet), ``head`` (part of a request head),
    ``body`` (head done, body arriving), ``busy`` (request read, our app answering: quick).
    ``sweep`` closes heads and bodies past their timeouts; ``admit`` makes room at the cap by
    shedding the connection that has waited longest for its head (idle or trickling), and
    refuses the newcomer only when every connection is past its head (body or busy)."""

    def __init__(self, collector: WebhookCollector) -> None:
        self.collector = collector
        self.conns: dict[_GuardedH11, None] = {}  # insertion-ordered set
        self.probes = receipts.AcceptProbe()  # the heartbeat's connections to ourselves

    def admit(self, p: _GuardedH11) -> bool:
        cfg = self.collector.config
        if len(self.conns) >= cfg.max_connections:
            now = clock.now()
            victims = [q for q in self.conns if q.phase in ("idle", "head")]
            if not victims:
                self.collector._refused(now)
                self.collector.receipts.add(now, (), "overload: refused (503), every connection busy")
                p.refused = True
                p.transport.write(_503)
                # Closing at once, with the request unread, would reset the connection before
                # the sender reads the 503: read and discard for a moment, then close.
                asyncio.get_running_loop().call_later(0.2, p.transport.close)
                return False
            # The oldest one waiting for its head: a real sender's head arrives in one packet,
            # so the longest wait is the likeliest slow client (and the newcomer is kept).
            victim = min(victims, key=lambda q: q.since)
            self.collector._count("shed")
            if now - victim.since < SHED_AGE:
                # Connections churn faster than a head arrives: the victim may be a delivery.
                self.collector._blind(
                    now,
                    "shed_young",
                    "shed a connection %.0f ms old under a connection flood",
                    1000 * (now - victim.since),
                )
                self.collector.receipts.add(now, (), "overload: shed under a connection flood")
            self.drop(victim)
        self.conns[p] = None
        return True

    def sweep(self, now: float) -> None:
        cfg = self.collector.config
        for p in list(self.conns):
            if p.phase in ("idle", "head") and now - p.since > cfg.header_timeout:
                self.collector._count("timed_out")
                self.drop(p)
            elif p.phase == "body" and now - p.since > cfg.body_timeout:
                # The head passed: this may have been a delivery we will never see.
                self.collector._count("timed_out")
                self.collector.receipts.add(now, (), "timed out: the body took over body_timeout")
                self.collector._blind(
                    now, "body_timeout", "a request body took over %gs; dropped", cfg.body_timeout
                )
                self.drop(p)

    def drop(self, p: _GuardedH11) -> None:
        self.conns.pop(p, None)
        if p.transport.is_closing():
            return
        if p.phase == "head" and p.conn.our_state is h11.IDLE:
            p.transport.write(_408)  # a slow head gets an answer; an idle keep-alive just a close
        p.transport.close()


class _QuietLog:
    """uvicorn's per-connection logger with warnings rate-limited (a flood of bad requests would
    otherwise write one identical line each)."""

    def __init__(self, logger: logging.Logger, throttle: Throttle) -> None:
        self._logger, self._throttle = logger, throttle

    def warning(self, msg: str, *args: Any, **_: Any) -> None:
        self._throttle.log(f"uvicorn:{msg}", logging.WARNING, "webhook receiver: " + msg, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with phase tracking for ``_Guard`` (one subclass per receiver,
    made in ``WebhookCollector.start``, carries the guard)."""

    guard: ClassVar[_Guard]
    phase: str = "idle"
    since: float = 0.0
    refused: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _QuietLog(self.logger, self.guard.collector._throttle)  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.guard.probes.claim(transport.get_extra_info("peername")):  # never admitted
            self.refused = True
            transport.close()
            return
        super().connection_made(transport)
        self.phase, self.since = "idle", clock.now()
        self.guard.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.conns.pop(self, None)
        if self.refused and self.transport is None:
            return  # an accept probe: uvicorn never saw this connection
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # answered 503 already
        super().data_received(data)
        self._update()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update()

    def send_400_response(self, msg: str) -> None:
        self.guard.collector._count("malformed")
        self.guard.collector.receipts.add(clock.now(), (), "malformed: not valid HTTP")
        super().send_400_response(msg)

    def _update(self) -> None:
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            phase = "body"
        elif state is h11.IDLE:
            phase = "head" if self.conn.trailing_data[0] else "idle"
        else:
            phase = "busy"
        if phase != self.phase:
            if not (self.phase == "idle" and phase == "head"):  # a head's clock starts when idle began
                self.since = clock.now()
            self.phase = phase


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
        self._supervisor = Supervisor("webhook-heartbeat", self.coverage)
        self.port: int | None = None  # the bound port, once started
        self._index = WatchIndex()
        self._routes: dict[str, list[OnBody]] = {}
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing = False
        self._guard = _Guard(self)
        self._throttle = Throttle(log)
        self._last_refused = -math.inf
        self.receipts = receipts.Receipts()  # the last deliveries, for ``explain``
        self.counters = dict.fromkeys(("accepted", "matched", "routed", "handler_errors"), 0)
        # Requests or connections turned away, by reason (health()["rejected"], /metrics).
        self.rejected = dict.fromkeys(
            ("unauthenticated", "replayed", "malformed", "oversized", "timed_out", "shed", "refused"), 0
        )

    # -- Collector protocol -------------------------------------------------
    @property
    def error_bar(self) -> float:
        return 0.0  # a push is stamped on arrival

    async def start(self) -> None:
        if not self.config.authenticated:
            log.warning(
                "webhook receiver runs unauthenticated (allow_unauthenticated: true): any local "
                "process that learns a trace id can post a sighting"
            )
        sock = bind(self.config.host, self.config.port)
        self.port = sock.getsockname()[1]
        receipts.hold(self.config.host, self.port)
        protocol = type("_ReceiverH11", (_GuardedH11,), {"guard": self._guard})
        uv_config = uvicorn.Config(
            self._app,
            interface="asgi3",
            http=protocol,  # type: ignore[arg-type]
            lifespan="off",
            log_config=None,  # leave the engine's logging alone
            log_level="warning",
            access_log=False,  # would print the secret path
            limit_concurrency=None,  # _Guard sheds slow clients instead of refusing new ones
            timeout_keep_alive=min(5.0, self.config.header_timeout),
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
        self._heartbeat = self._supervisor.start(self._beat)
        log.info("webhook receiver listening on %s:%d", self.config.host, self.port)

    async def close(self) -> None:
        self._closing = True
        if self._heartbeat:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self.port is not None:
            receipts.release(self.config.host, self.port)
        for p in list(self._guard.conns):  # half-sent requests would hold the shutdown up
            if p.phase != "busy":
                self._guard.drop(p)
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

    async def explain(self, w: Watch, start: float, end: float, base: Evidence) -> Evidence:
        """What reached the hop's path in its window (``tracer.receipts``): rejections by reason,
        deliveries without the trace id, and the trace id seen on another path."""
        path = w.sink_spec.path
        return receipts.explain(
            base,
            self.receipts,
            w.trace_id,
            start,
            end,
            f"/{path}",
            lambda r: r.where[:1] == (path,),
            WORDING,
        )

    def health(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "port": self.port,
            "in_flight": len(self._index),
            "routes": len(self._routes),
            "connections": len(self._guard.conns),
            "overloaded": self.overloaded,
            **self.counters,
            **self.rejected,  # flat too, as before: the per-reason counts
            "rejected": dict(self.rejected),
        }

    # -- for senders and other collectors ---------------------------------------
    @property
    def up(self) -> bool:
        serving = self._serving is not None and not self._serving.done()
        return serving and not self.coverage.blind_now and not self.overloaded

    @property
    def overloaded(self) -> bool:
        """A connection was refused recently: deliveries may be bouncing (``/healthz`` says so)."""
        return clock.now() - self._last_refused < OVERLOAD_WINDOW

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
            now = clock.now()
            self._guard.sweep(now)
            if self._serving is not None and not self._serving.done():
                if await self._accepts():
                    # Closes a blind window a refusal opened: from here on we are admitting again.
                    self.coverage.looked(now)
                else:
                    self._blind(
                        now,
                        "accept",
                        "the receiver cannot accept connections (out of file descriptors?); hops may be unknown",
                    )
            await asyncio.sleep(self.config.heartbeat)

    async def _accepts(self) -> bool:
        assert self.port is not None
        return await self._guard.probes.accepts(self.config.host, self.port)

    def _count(self, reason: str) -> None:
        self.rejected[reason] += 1

    def _blind(self, now: float, kind: str, msg: str, *args: Any) -> None:
        """Something that may have been a delivery was turned away: blind at ``now`` (the next
        heartbeat or request certifies again), one rate-limited warning."""
        self.coverage.failed(now)
        self._throttle.log(kind, logging.WARNING, "webhook receiver: " + msg, *args)

    def _refused(self, now: float) -> None:
        self._count("refused")
        self._last_refused = now
        self._blind(
            now,
            "refused",
            "refused a connection (503): all %d open connections are past their head; hops may be unknown",
            len(self._guard.conns),
        )

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
        close = False
        try:
            status, text = self._handle(scope, await self._read(scope, receive))
        except _Rejected as rej:
            self.rejected[rej.counter] += 1
            path = scope.get("funnel_tracer.path")
            self.receipts.add(clock.now(), (path,) if path else (), rej.why)
            status, text, close = rej.status, rej.message, rej.close
            if rej.delivery:
                self._blind(
                    clock.now(),
                    f"unreadable:{rej.counter}",
                    "could not read a delivery on an authenticated path (%s); hops in flight may be unknown",
                    rej.why,
                )
        except Exception:  # a receiver bug answers 500 and keeps serving
            self.counters["handler_errors"] += 1
            log.exception("webhook receiver failed on a request")
            status, text = 500, "internal error\n"
        payload = text.encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(payload)).encode()),
        ]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _read(
        self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]]
    ) -> tuple[str, bytes, float]:
        """Authenticate the path, then read at most ``max_body`` bytes. Returns the hop path,
        the raw body and when it finished arriving."""
        if scope["method"] != "POST":
            raise _Rejected(405, "malformed", "POST only\n", "not a POST")
        path = scope["funnel_tracer.path"] = self._hop_path(scope)
        limit = self.config.max_body
        length = _header(scope, b"content-length")
        if length is not None and _header(scope, b"transfer-encoding") is not None:
            # Two framings: a proxy in front may have read the body differently, so what
            # follows on this connection may be a smuggled request (RFC 9112 6.1: refuse
            # and close, never read on).
            raise _Rejected(
                400,
                "malformed",
                "both Content-Length and Transfer-Encoding\n",
                "ambiguous framing",
                close=True,
            )
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._oversized(receive, b"", int(length) if length.isdigit() else None)
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Rejected(400, "malformed", "client went away\n", "the sender went away mid-body")
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            more = message.get("more_body", False)
            if size > limit:
                await self._oversized(receive, b"".join(chunks), None, more)
        return path, b"".join(chunks), clock.now()

    async def _oversized(
        self,
        receive: Callable[[], Awaitable[dict[str, Any]]],
        head: bytes,
        length: int | None,
        more: bool = True,
    ) -> NoReturn:
        """A body over ``max_body`` is refused (413), but it may have been a probe's delivery we
        cannot read. Read on, keeping nothing, up to ``OVERSIZED_SCAN`` x ``max_body``, looking
        for the trace id of a probe in flight: only when one is there, or the body could not be
        scanned to its end, is the receiver blind for that moment (``_Rejected.delivery``)."""
        cap = OVERSIZED_SCAN * self.config.max_body
        suspect = self._watched_in(head)
        size, tail = len(head), head[-32:]
        scanned = length is None or length <= cap
        while more and scanned and not suspect:
            message = await receive()
            if message["type"] == "http.disconnect":
                scanned = False
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            suspect = self._watched_in(tail + chunk)  # overlap: an id split across two chunks
            tail = chunk[-32:]
            more = message.get("more_body", False)
            scanned = size <= cap
        raise _Rejected(
            413, "oversized", "body too large\n", "over max_body", delivery=suspect or not scanned or more
        )

    def _watched_in(self, data: bytes) -> bool:
        """Does ``data`` (raw bytes, no parsing) carry the trace id of a probe in flight?"""
        if not len(self._index) or not data:
            return False
        return any(self._index.get(t) for t in _ids(data.decode("latin-1")))

    def _hop_path(self, scope: dict[str, Any]) -> str:
        """Strip and check the secret segment; what remains is the hop path."""
        path = scope["path"].strip("/")
        if self.config.secret_path is not None:
            first, _, path = path.partition("/")
            expected = self.config.secret_path.get_secret_value()
            if not hmac.compare_digest(first.encode(), expected.encode()):
                # For the evidence: what follows the (wrong) secret segment, or the one segment
                # posted without any. The segment itself is never kept.
                scope["funnel_tracer.path"] = path or first
                raise _Rejected(401, "unauthenticated", "unauthorized\n", "wrong or missing secret")
        if not path:
            raise _Rejected(404, "malformed", "no receiver path\n", "no receiver path")
        return path

    def _handle(self, scope: dict[str, Any], read: tuple[str, bytes, float]) -> tuple[int, str]:
        path, raw, received = read
        if self.config.hmac_secret is not None:
            self._verify(scope, raw)
        try:
            body = _parse(raw, _header(scope, b"content-type") or "")
        except _Rejected as rej:
            # Unreadable: a probe's delivery only if it shows a watched trace id, or if it is not
            # even text (compressed, another charset), where no id could show.
            rej.delivery = self._watched_in(raw) or not _is_utf8(raw)
            raise
        self.counters["accepted"] += 1
        ids: set[str] = set()
        matched: set[str] = set()
        if len(self._index):
            ids, matched = self._match(path, body, received)
        self.receipts.add(received, (path,), None, ids, matched)
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
        cfg = self.config
        assert cfg.hmac_secret is not None
        got = (_header(scope, cfg.hmac_header.lower().encode()) or "").strip()
        key = cfg.hmac_secret.get_secret_value().encode()
        if cfg.hmac_scheme == "body":
            want = hmac.new(key, raw, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(got.removeprefix("sha256=").lower().encode(), want.encode()):
                raise _Rejected(401, "unauthenticated", "bad signature\n", "wrong or missing signature")
            return
        ts, sigs = _timestamped(got)
        if ts is None:
            raise _Rejected(401, "unauthenticated", "bad signature\n", "wrong or missing signature")
        want = hmac.new(key, ts.encode() + b"." + raw, hashlib.sha256).hexdigest().encode()
        # Every v1 is compared (senders send several while rotating secrets).
        if not any(hmac.compare_digest(sig.lower().encode(), want) for sig in sigs):
            raise _Rejected(401, "unauthenticated", "bad signature\n", "wrong or missing signature")
        # After the signature: only an authentic but old (or future) delivery counts as a replay.
        if abs(time.time() - int(ts)) > cfg.hmac_tolerance:
            raise _Rejected(401, "replayed", "timestamp outside tolerance\n", "signed outside hmac_tolerance")

    def _match(self, path: str, body: Body, received: float) -> tuple[set[str], set[str]]:
        """Observe the watches this body is a sighting for. Returns the watched trace ids it
        carried and those it matched (for the evidence)."""
        watched: set[str] = set()
        matched: set[str] = set()
        at_path: dict[str, set[str]] = {}  # json_path -> the trace ids found there (once a body)
        for tid in _ids("\n".join(strings_in(body))):
            watches = list(self._index.get(tid))
            if watches:
                watched.add(tid)
            for w in watches:
                hop: WebhookHop = w.sink_spec
                if hop.path != path:
                    continue
                if hop.json_path is not None and tid not in _ids_at(body, hop.json_path, at_path):
                    continue
                w.observe(Observation(at=received, not_before=received, source="push", detail={"path": path}))
                self._index.discard(w)
                self.counters["matched"] += 1
                matched.add(tid)
        return watched, matched


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _ids(text: str) -> set[str]:
    """Trace ids in ``text``: whole 32-hex tokens only, so a longer hex run (a hash, a
    signature) that merely contains one is not a sighting."""
    return set(TRACE_ID.findall(text.lower()))


def _ids_at(body: Body, json_path: str, cache: dict[str, set[str]]) -> set[str]:
    if json_path not in cache:
        cache[json_path] = _ids("\n".join(strings_in(value_at(body, json_path))))
    return cache[json_path]


def _timestamped(value: str) -> tuple[str | None, list[str]]:
    """``t=<unix seconds>,v1=<hex>[,v1=<hex>...]`` -> (t, [v1...]); (None, []) if malformed."""
    ts: str | None = None
    sigs: list[str] = []
    for item in value.split(","):
        k, _, v = item.strip().partition("=")
        if k == "t" and v.isascii() and v.isdigit() and len(v) <= 12:
            ts = v
        elif k == "v1" and v:
            sigs.append(v)
    return (ts, sigs) if ts is not None and sigs else (None, [])


def timestamped_signature(secret: str, body: bytes, at: float | None = None) -> str:
    """The header value a sender puts on ``body`` for ``hmac_scheme: timestamped`` (for senders
    configured from the tracer, and tests)."""
    ts = str(int(time.time() if at is None else at))
    digest = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _parse(raw: bytes, content_type: str) -> Body:
    """JSON (the default), Slack's legacy ``payload=<json>`` form, or ``text/*``. Anything that
    does not decode is malformed (400)."""
    ctype, _, params = content_type.partition(";")
    ctype = ctype.strip().lower()
    charset = "utf-8"
    if ctype.startswith("text/"):  # JSON is UTF-8 by definition; text says what it is
        for param in params.split(";"):
            k, _, v = param.partition("=")
            if k.strip().lower() == "charset" and v.strip().strip('"'):
                charset = v.strip().strip('"')
    try:
        text = raw.decode(charset)
        if ctype == "application/x-www-form-urlencoded":
            form = {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True, strict_parsing=True).items()}
            body = json.loads(form["payload"]) if "payload" in form else form
        elif ctype.startswith("text/"):
            if not text.strip():
                raise ValueError("empty body")
            return text
        else:
            body = json.loads(text)
    except (ValueError, KeyError, LookupError, RecursionError) as exc:
        raise _Rejected(
            400, "malformed", "malformed body\n", "body not JSON, form or text", delivery=True
        ) from exc
    if not isinstance(body, (dict, list, str)):
        raise _Rejected(
            400,
            "malformed",
            "expected a JSON object, array or string\n",
            "not an object or array",
            delivery=True,
        )
    return body


WORDING = receipts.Wording(
    noun=("delivery", "deliveries"),
    field="path",
    outside="outside the hop's json_path",
    auth_hint="the funnel's webhook secret or URL path does not match collectors.webhook",
)


async def _preflight(config: WebhookConfig, hops: list[WebhookHop]) -> list[Finding]:
    """The port can be bound (see ``receipts.port_finding`` for the canary, where our own
    receiver holds it already) and the authentication in use, by name only."""
    where = "collectors.webhook"
    how = [
        name for name, on in (("secret_path", config.secret_path), ("hmac_secret", config.hmac_secret)) if on
    ]
    if config.hmac_secret is not None and config.hmac_scheme == "timestamped":
        how[-1] += " (timestamped)"
    return [
        receipts.port_finding(where, config.host, config.port),
        receipts.auth_finding(where, " and ".join(how) or None),
    ]


plugin = SinkPlugin(
    name="webhook",
    config=WebhookConfig,
    hop=WebhookHop,
    factory=WebhookCollector,
    summary="an HTTP receiver for Slack-style or generic JSON webhook notifications",
    preflight=_preflight,
)
