"""SMTP receiver: the funnel mails the approver, and this collector is the approver's MX.

It runs aiosmtpd's protocol on the engine's own loop (``loop.create_server``), not aiosmtpd's
threaded ``Controller``: one loop, one clock, and a sighting is stamped the moment ``DATA``
completes.

Why parse, not grep: mailers hide the needle. The trace id may sit in an RFC 2047 encoded
subject, in a quoted-printable part where a soft line break splits it, or in a base64 HTML
part. Every leaf part is decoded with the stdlib ``email`` package (``policy.default``) before
matching, and HTML entities are unescaped.

Honesty rules are the webhook receiver's: not retroactive (a mail bounced or queued elsewhere
while we were down may never arrive), a heartbeat certifies coverage while the server listens,
``at == not_before`` for every sighting.

Under pressure (one hostile mail froze a canary for 70 s once):
- MIME parsing runs in a thread executor, never on the event loop, and is bounded: a pre-scan
  refuses mails with more lines than ``max_lines`` or more delimiter lines than ``max_parts``
  allows before the parser builds anything, then parts, nesting depth, header count and ``parse_timeout`` are checked. A mail
  over a bound gets a 5xx/4xx reply and, since it may have been a notification we could not
  read, the collector is blind at that moment (hops become ``unknown``, never ``lost``).
- The ``DATA`` body is read by our own reader (``collectors.smtp_data``) in bounded segments
  with a turn for the loop after each: aiosmtpd's keeps one buffer per line and joins them all
  at once, which held the loop 80-140 ms on a 400,000-line mail. Replies are aiosmtpd's.
- At most ``max_connections`` SMTP sessions; beyond that a connection gets ``421`` (counted,
  blind). Log lines for these are rate-limited.
- Authenticated by default: AUTH credentials (``auth_username``/``auth_password``) or a
  ``rcpt_token`` the funnel must put in the recipient's subaddress (``approver+<token>@...``);
  ``allow_unauthenticated: true`` on loopback only, with a warning at start. The token is
  stripped from every recipient before matching and reporting.

Evidence: the last deliveries (time, recipient, outcome and why, watched trace ids; no bodies, no
secrets) stay in a bounded ring (``tracer.receipts``), so a lost hop says what reached its recipient
instead (``explain``). The preflight binds the port once and names the authentication in use.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, ClassVar, Literal

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session
from pydantic import Field, field_validator, model_validator

from collectors import smtp_data
from tracer import clock, mime, receipts
from tracer.evidence import Evidence
from tracer.net import is_loopback
from tracer.plugins import Finding, SinkPlugin
from tracer.probe import trace_ids
from tracer.ratelog import Throttle
from tracer.schema import Duration, Model, Secret
from tracer.supervise import Supervisor
from tracer.watch import Coverage, Observation, Watch, WatchIndex

log = logging.getLogger(__name__)

Where = Literal["subject", "headers", "body"]

OVERLOAD_WINDOW = 30.0  # seconds: health says "not up" this long after a refused connection


class SmtpConfig(Model):
    host: str = Field("127.0.0.1", description="bind address; anything but loopback needs allow_public")
    port: int = Field(0, ge=0, le=65535, description="0: an ephemeral port (see SmtpCollector.port)")
    allow_public: bool = Field(False, description="explicit opt-in to bind a non-loopback address")
    hostname: str = Field("funnel-tracer.invalid", description="name in the banner (no DNS lookup at start)")
    data_size_limit: int = Field(4 * 1024 * 1024, gt=0, description="bytes; larger mails get 552")
    idle_timeout: Duration = Field(60.0, gt=0, description="drop a silent client after this")
    heartbeat: Duration = Field(0.5, gt=0, description="how often a listening server certifies coverage")
    auth_username: str | None = Field(None, min_length=1, description="require SMTP AUTH with this user")
    auth_password: Secret | None = Field(None, description="password for auth_username")
    rcpt_token: Secret | None = Field(
        None, description="require this subaddress in the recipient (approver+<token>@...); others get 550"
    )
    allow_unauthenticated: bool = Field(
        False, description="accept mail without AUTH or rcpt_token (loopback only; warns at start)"
    )
    max_connections: int = Field(50, gt=0, description="concurrent SMTP sessions; beyond that, 421")
    max_parts: int = Field(200, gt=0, description="MIME parts in one mail; more gets 552")
    max_depth: int = Field(10, gt=0, description="multipart nesting depth; deeper gets 552")
    max_headers: int = Field(1000, gt=0, description="header lines over all parts; more gets 552")
    max_lines: int = Field(
        200_000, gt=0, description="lines in one mail (4 MB of base64 is ~55,000); more gets 552"
    )
    parse_timeout: Duration = Field(5.0, gt=0, description="time to parse one mail; longer gets 451")

    @field_validator("rcpt_token")
    @classmethod
    def _subaddress(cls, v: Secret | None) -> Secret | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_-]{8,}", v.get_secret_value()):
            raise ValueError(
                "rcpt_token must be 8 or more letters, digits, '_' or '-' (it goes in an address)"
            )
        return v

    @property
    def authenticated(self) -> bool:
        return self.auth_username is not None or self.rcpt_token is not None

    @model_validator(mode="after")
    def _authenticated_and_loopback_unless_public(self) -> SmtpConfig:
        if (self.auth_username is None) != (self.auth_password is None):
            raise ValueError("auth_username and auth_password go together")
        if not is_loopback(self.host):
            if not self.allow_public:
                raise ValueError(
                    f"host {self.host} is not loopback; set allow_public: true to expose the receiver"
                )
            if not self.authenticated:
                raise ValueError(
                    "a receiver on a non-loopback address always needs auth_username/auth_password or "
                    "rcpt_token (allow_unauthenticated does not apply)"
                )
        elif not self.authenticated and not self.allow_unauthenticated:
            raise ValueError(
                "unauthenticated receiver: anyone who learns a trace id could mail a sighting; set "
                "auth_username/auth_password or rcpt_token (or allow_unauthenticated: true on a test bench)"
            )
        return self


class SmtpHop(Model):
    to: str | None = Field(
        None, description="only mail to this address (envelope, To or Cc), case-insensitive"
    )
    where: list[Where] = Field(
        default_factory=lambda: ["subject", "headers", "body"],
        min_length=1,
        description="where the trace id may appear; 'headers' means every header but Subject",
    )


class _Handler:
    """aiosmtpd handler: checks the recipient token, hands every mail to the collector."""

    def __init__(self, collector: SmtpCollector) -> None:
        self._collector = collector

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self._collector.config.auth_username is not None and not session.authenticated:
            self._collector._count("unauthenticated")
            self._collector.receipts.add(clock.now(), (), "unauthenticated: no SMTP AUTH")
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        token = self._collector.config.rcpt_token
        if token is not None and not _has_token(address, token.get_secret_value()):
            self._collector._count("unauthenticated")
            self._collector.receipts.add(
                clock.now(), (_bare(address),), "unauthenticated: recipient without the rcpt_token"
            )
            return "550 5.7.1 recipient not accepted"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return await self._collector.deliver(envelope.original_content or b"", envelope, clock.now())


class _CappedSMTP(SMTP):
    """aiosmtpd's protocol with a cap on concurrent sessions: the one past the cap gets 421 and
    is closed before any handler runs."""

    collector: SmtpCollector
    _refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        c = self.collector
        if self._original_transport is None and c._accept_probe.claim(transport.get_extra_info("peername")):
            self._refused = True  # the heartbeat's connection to ourselves: accepted, never served
            transport.close()
            return
        if self._original_transport is None and len(c._sessions) >= c.config.max_connections:
            self._refused = True
            c._refuse(clock.now())
            transport.write(b"421 4.3.2 too many connections, try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        c._sessions.add(self)
        super().connection_made(transport)

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(reader, writer)
        _yielding(reader)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's ``DATA`` with the body read by ``smtp_data`` in bounded segments (aiosmtpd's
        own reader joins 400,000 line buffers of a hostile mail in one stretch on the loop).
        Replies, state and the ``handle_DATA`` hook are aiosmtpd 1.4's (tests/test_smtp_data.py
        compares them with a stock server); the deprecated ``process_message`` is not called."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        body = smtp_data.Body(self.data_size_limit, self.line_length_limit)
        try:
            complete = await smtp_data.read_body(self._reader, body, lambda: self.transport is not None)
        except asyncio.CancelledError:  # the connection went away during DATA
            log.info("connection lost during DATA")
            self._writer.close()
            raise
        if not complete:
            self._writer.close()
            return
        if body.state is smtp_data.State.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
        elif body.state is smtp_data.State.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
        if body.state is not smtp_data.State.NOMINAL:
            self._set_post_data_state()
            return
        original = body.content()
        content: str | bytes = original
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        self.envelope.content = content
        self.envelope.original_content = original
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def push(self, status: str) -> None:
        # aiosmtpd refuses an oversized mail itself (SIZE= on MAIL, or too much DATA): record it.
        if status.startswith("552 Error:"):
            rcpts = self.envelope.rcpt_tos if self.envelope is not None else []
            self.collector.receipts.add(
                clock.now(), [_bare(a) for a in rcpts], "oversized: over data_size_limit"
            )
        await super().push(status)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self.collector._sessions.discard(self)
        super().connection_lost(error)


YIELD_EVERY = 256  # reads


def _yielding(reader: asyncio.StreamReader) -> None:
    """``readuntil`` does not suspend while its buffer holds a line: a flood of pipelined
    commands (or of short pieces of a ``DATA`` body) would run on the loop in long unbroken
    stretches. Give the loop a turn every ``YIELD_EVERY`` reads."""
    original = reader.readuntil
    calls = 0

    async def readuntil(separator: bytes = b"\n") -> bytes:
        nonlocal calls
        calls += 1
        if calls % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        return await original(separator)

    reader.readuntil = readuntil  # type: ignore[method-assign]


class TooComplex(Exception):
    """A mail over one of the parsing bounds; ``str()`` names the bound (never the content)."""


@dataclass
class Parsed:
    """What matching needs from one mail, computed off the loop: trace ids per section."""

    ids: dict[str, set[str]] = field(default_factory=dict)
    rcpts: set[str] = field(default_factory=set)  # To and Cc addresses
    message_id: str = ""


@dataclass(frozen=True)
class Limits:
    parts: int
    depth: int
    headers: int
    deadline: float  # clock.now() value
    lines: int = 200_000


def parse_mail(raw: bytes, limits: Limits) -> Parsed:
    """Parse and search one mail within ``limits``; raises ``TooComplex``. Runs in a worker
    thread: everything slow (the MIME parser, decoding, the regex) happens here."""
    # The parser joins and frees every line in single C calls that hold the GIL (2,000,000 empty
    # lines stalled the loop ~100 ms): count them first.
    if raw.count(b"\n") > limits.lines:
        raise TooComplex(f"more than {limits.lines} lines")
    # Every part needs a delimiter line ("--boundary"): count them before the parser builds
    # anything (100,000 tiny parts once took 70 s to parse).
    delimiters = raw.count(b"\n--") + raw.startswith(b"--")
    if delimiters > 2 * limits.parts + 2:
        raise TooComplex(f"more than {limits.parts} MIME parts")
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    _check(msg, limits)
    out = Parsed(message_id=str(msg.get("message-id", "")))
    texts = (
        ("subject", mime.subject(msg)),
        ("headers", mime.headers(msg)),
        ("body", mime.body(msg, limits.deadline)),
    )
    for where, text in texts:
        out.ids[where] = trace_ids(text)  # in windows: a long regex call holds the GIL
    out.rcpts = mime.recipients(msg)
    if clock.now() > limits.deadline:
        raise TimeoutError
    return out


def _check(msg: EmailMessage, limits: Limits) -> None:
    """Exact bounds on the parsed tree (iterative: depth is what is being checked)."""
    stack: list[tuple[EmailMessage, int]] = [(msg, 1)]
    parts = headers = 0
    while stack:
        part, depth = stack.pop()
        parts += 1
        headers += len(part.keys())  # raw names: no header parsing yet
        if parts > limits.parts:
            raise TooComplex(f"more than {limits.parts} MIME parts")
        if depth > limits.depth:
            raise TooComplex(f"multipart nesting deeper than {limits.depth}")
        if headers > limits.headers:
            raise TooComplex(f"more than {limits.headers} header lines")
        if clock.now() > limits.deadline:
            raise TimeoutError
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            stack.extend((p, depth + 1) for p in payload if isinstance(p, EmailMessage))


def _has_token(address: str, token: str) -> bool:
    local = address.rpartition("@")[0] or address
    return any(hmac.compare_digest(tag.encode(), token.encode()) for tag in local.split("+")[1:])


def _bare(address: str) -> str:
    """``approver+anything@x`` -> ``approver@x``, lower case: a refused recipient's subaddress may
    be a wrong (or old) token, so none is kept."""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    return (local.split("+")[0] + (f"@{domain}" if at else "")).lower()


def _untoken(address: str, token: str | None) -> str:
    """``approver+<token>@x`` -> ``approver@x``: the token never reaches matching or a report."""
    if not token:
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    kept = [t for i, t in enumerate(local.split("+")) if i == 0 or t.lower() != token.lower()]
    return "+".join(kept) + (f"@{domain}" if at else "")


class SmtpCollector:
    sink: ClassVar[str] = "smtp"

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self.coverage = Coverage(retroactive=False)
        self._supervisor = Supervisor("smtp-heartbeat", self.coverage)
        self.port: int | None = None
        self._index = WatchIndex()
        self._handler = _Handler(self)
        self._server: asyncio.base_events.Server | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing = False
        self._sessions: set[_CappedSMTP] = set()
        self._accept_probe = receipts.AcceptProbe()  # the heartbeat: can we accept right now?
        # Two workers: one slow (bounded) mail never holds up the next good one.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="smtp-parse")
        self._parsing = 0
        self._throttle = Throttle(log)
        self._last_refused = -math.inf
        self.receipts = receipts.Receipts()  # the last mails, for ``explain``
        self.counters = dict.fromkeys(("received", "matched", "unparsable"), 0)
        self.rejected = dict.fromkeys(("unauthenticated", "too_complex", "parse_timeout", "refused"), 0)

    # -- Collector protocol -------------------------------------------------
    @property
    def error_bar(self) -> float:
        return 0.0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        if not cfg.authenticated:
            log.warning(
                "smtp receiver runs unauthenticated (allow_unauthenticated: true): any local "
                "process that learns a trace id can mail a sighting"
            )
        auth: dict[str, Any] = {}
        if cfg.auth_username is not None:
            # No TLS here: AUTH PLAIN/LOGIN travel in clear (loopback, or a TLS-terminating proxy).
            # (auth_required is enforced by _Handler.handle_MAIL: aiosmtpd's own flag warns on
            # every connection when TLS is not required.)
            auth = {"authenticator": self._authenticate, "auth_require_tls": False}
        protocol_class = type("_ReceiverSMTP", (_CappedSMTP,), {"collector": self})

        def protocol() -> SMTP:
            return protocol_class(
                self._handler,
                data_size_limit=cfg.data_size_limit,
                enable_SMTPUTF8=True,
                hostname=cfg.hostname,
                timeout=cfg.idle_timeout,
                loop=loop,
                **auth,
            )

        self._server = await loop.create_server(protocol, host=cfg.host, port=cfg.port)
        self.port = self._server.sockets[0].getsockname()[1]
        receipts.hold(cfg.host, self.port)
        self.coverage.looked(clock.now())
        self._heartbeat = self._supervisor.start(self._beat)
        log.info("smtp receiver listening on %s:%d", cfg.host, self.port)

    async def close(self) -> None:
        self._closing = True
        if self._heartbeat:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self.port is not None:
            receipts.release(self.config.host, self.port)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def watch(self, w: Watch) -> None:
        self._index.add(w)

    def unwatch(self, w: Watch) -> None:
        self._index.discard(w)

    async def explain(self, w: Watch, start: float, end: float, base: Evidence) -> Evidence:
        """What mail reached the hop's recipient (any, without ``to``) in its window: rejections
        by reason, mails without the trace id, the trace id mailed to someone else. A rejection
        before any recipient was named (no AUTH) counts for every hop."""
        hop: SmtpHop = w.sink_spec
        to = hop.to.lower() if hop.to else None
        place = to or "the receiver"

        def on_place(r: receipts.Receipt) -> bool:
            return to is None or not r.where or to in r.where

        return receipts.explain(base, self.receipts, w.trace_id, start, end, place, on_place, WORDING)

    def health(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "port": self.port,
            "in_flight": len(self._index),
            "connections": len(self._sessions),
            "overloaded": self.overloaded,
            **self.counters,
            **self.rejected,
            "rejected": dict(self.rejected),
        }

    @property
    def up(self) -> bool:
        serving = self._server is not None and self._server.is_serving()
        return serving and not self.coverage.blind_now and not self.overloaded

    @property
    def overloaded(self) -> bool:
        return clock.now() - self._last_refused < OVERLOAD_WINDOW

    # -- receiving ----------------------------------------------------------------
    async def _beat(self) -> None:
        while True:
            now = clock.now()
            if self._server is not None and self._server.is_serving() and self.port is not None:
                if await self._accept_probe.accepts(self.config.host, self.port):
                    self.coverage.looked(now)
                else:
                    self._blind(
                        now, "accept", "the receiver cannot accept connections (out of file descriptors?)"
                    )
            elif not self._closing and not self.coverage.blind_now:
                log.error("smtp receiver stopped listening; mail from now on may be missed")
                self.coverage.failed(clock.now())
            await asyncio.sleep(self.config.heartbeat)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        cfg = self.config
        assert cfg.auth_username is not None and cfg.auth_password is not None
        ok = (
            isinstance(auth_data, LoginPassword)
            and hmac.compare_digest(auth_data.login, cfg.auth_username.encode())
            and hmac.compare_digest(auth_data.password, cfg.auth_password.get_secret_value().encode())
        )
        if not ok:
            self._count("unauthenticated")
        return AuthResult(success=ok, handled=False)  # aiosmtpd answers 535 on failure

    def _count(self, reason: str) -> None:
        self.rejected[reason] += 1

    def _blind(self, now: float, kind: str, msg: str, *args: Any) -> None:
        """A mail that may have been a notification was not read: blind at ``now`` (the next
        heartbeat certifies again), one rate-limited warning."""
        self.coverage.failed(now)
        self._throttle.log(kind, logging.WARNING, "smtp receiver: " + msg, *args)

    def _refuse(self, now: float) -> None:
        self._count("refused")
        self.receipts.add(now, (), "overload: too many connections (421)")
        self._last_refused = now
        self._blind(now, "refused", "refused a connection (421): %d sessions open", len(self._sessions))

    async def deliver(self, raw: bytes, envelope: Envelope, received: float) -> str:
        """Match one mail against the watches in flight; the SMTP reply to give the sender.

        A mail that fits the bounds is accepted (250) whatever it contains: a mailer that got a
        5xx from the approver's MX would tell the funnel the approver does not exist. One over a
        bound is refused (it is hostile or broken) and leaves the collector blind for that moment."""
        self.coverage.looked(received)
        self.counters["received"] += 1
        cfg = self.config
        token = cfg.rcpt_token.get_secret_value() if cfg.rcpt_token else None
        envelope_rcpts = [_untoken(a, token).lower() for a in envelope.rcpt_tos]
        if not len(self._index):
            self.receipts.add(received, envelope_rcpts)
            return "250 OK"
        reply, rejected, ids, matched, rcpts = await self._deliver(raw, envelope, received, token)
        where = [*envelope_rcpts, *sorted(rcpts - set(envelope_rcpts))]  # envelope first, then To/Cc
        self.receipts.add(clock.now() if rejected else received, where, rejected, ids, matched)
        return reply

    async def _deliver(
        self, raw: bytes, envelope: Envelope, received: float, token: str | None
    ) -> tuple[str, str | None, set[str], set[str], set[str]]:
        """(SMTP reply, rejection label or None, watched trace ids carried, those matched, the
        recipients from the envelope and the To/Cc headers; token-free)."""
        cfg = self.config
        if self._parsing >= 4:  # both workers busy and a queue: ask the sender to come back
            self._count("refused")
            self._blind(received, "busy", "mail parsers busy; a mail was deferred (451)")
            return "451 4.3.2 busy, try again later", "overload: mail parsers busy (451)", set(), set(), set()
        limits = Limits(
            cfg.max_parts, cfg.max_depth, cfg.max_headers, clock.now() + cfg.parse_timeout, cfg.max_lines
        )
        loop = asyncio.get_running_loop()
        self._parsing += 1
        try:
            job = loop.run_in_executor(self._executor, parse_mail, raw, limits)
            parsed = await asyncio.wait_for(job, timeout=cfg.parse_timeout)
        except TooComplex as exc:
            self._count("too_complex")
            self._blind(clock.now(), "too_complex", "refused a mail: %s", exc)
            return f"552 5.3.4 message too complex: {exc}", f"too complex: {exc}", set(), set(), set()
        except (TimeoutError, asyncio.TimeoutError):
            self._count("parse_timeout")
            self._blind(
                clock.now(), "parse_timeout", "a mail took over %gs to parse; deferred", cfg.parse_timeout
            )
            return (
                "451 4.3.0 message took too long to inspect",
                "parse timeout: over parse_timeout",
                set(),
                set(),
                set(),
            )
        except Exception as exc:  # the parser is lenient; anything left is a mail we cannot read
            self.counters["unparsable"] += 1
            self._blind(clock.now(), "unparsable", "could not parse a received mail: %s", type(exc).__name__)
            return "250 OK", "malformed: unparsable mail", set(), set(), set()
        finally:
            self._parsing -= 1
        ids: set[str] = set()
        matched: set[str] = set()
        rcpts = {_untoken(a, token).lower() for a in (*envelope.rcpt_tos, *parsed.rcpts)}
        for where, found in parsed.ids.items():
            for tid in found:
                watches = list(self._index.get(tid))
                if watches:
                    ids.add(tid)
                for w in watches:
                    hop: SmtpHop = w.sink_spec
                    if where not in hop.where or (hop.to is not None and hop.to.lower() not in rcpts):
                        continue
                    detail = {"where": where, "rcpt": sorted(rcpts), "message_id": parsed.message_id}
                    w.observe(Observation(at=received, not_before=received, source="push", detail=detail))
                    self._index.discard(w)
                    self.counters["matched"] += 1
                    matched.add(tid)
        return "250 OK", None, ids, matched, rcpts


WORDING = receipts.Wording(
    noun=("mail", "mails"),
    field="to",
    outside="outside the hop's where (subject, headers, body)",
    auth_hint="the funnel's rcpt_token (approver+<token>@...) or SMTP AUTH does not match collectors.smtp",
)


async def _preflight(config: SmtpConfig, hops: list[SmtpHop]) -> list[Finding]:
    """The port can be bound (see ``receipts.port_finding`` for the canary, where our own
    receiver holds it already) and the authentication in use, by name only."""
    where = "collectors.smtp"
    how = [
        name for name, on in (("SMTP AUTH", config.auth_username), ("rcpt_token", config.rcpt_token)) if on
    ]
    return [
        receipts.port_finding(where, config.host, config.port),
        receipts.auth_finding(where, " and ".join(how) or None),
    ]


plugin = SinkPlugin(
    name="smtp",
    config=SmtpConfig,
    hop=SmtpHop,
    factory=SmtpCollector,
    summary="an SMTP server that receives e-mail notifications",
    preflight=_preflight,
)
