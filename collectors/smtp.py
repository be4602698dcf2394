"""SMTP receiver: the funnel mails the approver, and this collector is the approver's MX.

It runs aiosmtpd's protocol on the engine's own loop (``loop.create_server``), not aiosmtpd's
threaded ``Controller``: one loop, one clock, and a sighting is stamped the moment ``DATA``
completes.

Why parse, not grep: mailers hide the needle (RFC 2047 subjects, quoted-printable soft line
breaks, base64 HTML parts). ``tracer.mime`` decodes every part, the same way for the IMAP
mailbox collector; parsing runs in a worker thread so a large mail never stalls the loop (and
the sighting is stamped before parsing, when ``DATA`` completed).

Honesty rules are the webhook receiver's: not retroactive (a mail bounced or queued elsewhere
while we were down may never arrive), a heartbeat certifies coverage while the server listens,
``at == not_before`` for every sighting.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import Field, model_validator

from tracer import clock, mime
from tracer.net import is_loopback
from tracer.plugins import SinkPlugin
from tracer.probe import TRACE_ID
from tracer.schema import Duration, Model
from tracer.watch import Coverage, Observation, Watch, WatchIndex

log = logging.getLogger(__name__)

Where = mime.Where


class SmtpConfig(Model):
    host: str = Field("127.0.0.1", description="bind address; anything but loopback needs allow_public")
    port: int = Field(0, ge=0, le=65535, description="0: an ephemeral port (see SmtpCollector.port)")
    allow_public: bool = Field(False, description="explicit opt-in to bind a non-loopback address")
    hostname: str = Field("funnel-tracer.invalid", description="name in the banner (no DNS lookup at start)")
    data_size_limit: int = Field(4 * 1024 * 1024, gt=0, description="bytes; larger mails get 552")
    idle_timeout: Duration = Field(60.0, gt=0, description="drop a silent client after this")
    heartbeat: Duration = Field(0.5, gt=0, description="how often a listening server certifies coverage")

    @model_validator(mode="after")
    def _loopback_unless_public(self) -> SmtpConfig:
        if not is_loopback(self.host) and not self.allow_public:
            raise ValueError(
                f"host {self.host} is not loopback; set allow_public: true to expose the receiver"
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
    """aiosmtpd handler: accepts every mail, hands it to the collector."""

    def __init__(self, collector: SmtpCollector) -> None:
        self._collector = collector

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return await self._collector.deliver(envelope.original_content or b"", envelope, clock.now())


class SmtpCollector:
    sink: ClassVar[str] = "smtp"

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self.coverage = Coverage(retroactive=False)
        self.port: int | None = None
        self._index = WatchIndex()
        self._handler = _Handler(self)
        self._server: asyncio.base_events.Server | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing = False
        self.counters = dict.fromkeys(("received", "matched", "unparsable"), 0)

    # -- Collector protocol -------------------------------------------------
    @property
    def error_bar(self) -> float:
        return 0.0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config

        def protocol() -> SMTP:
            return SMTP(
                self._handler,
                data_size_limit=cfg.data_size_limit,
                enable_SMTPUTF8=True,
                hostname=cfg.hostname,
                timeout=cfg.idle_timeout,
                loop=loop,
            )

        self._server = await loop.create_server(protocol, host=cfg.host, port=cfg.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.coverage.looked(clock.now())
        self._heartbeat = asyncio.create_task(self._beat(), name="smtp-heartbeat")
        log.info("smtp receiver listening on %s:%d", cfg.host, self.port)

    async def close(self) -> None:
        self._closing = True
        if self._heartbeat:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def watch(self, w: Watch) -> None:
        self._index.add(w)

    def unwatch(self, w: Watch) -> None:
        self._index.discard(w)

    def health(self) -> dict[str, Any]:
        return {"up": self.up, "port": self.port, "in_flight": len(self._index), **self.counters}

    @property
    def up(self) -> bool:
        return self._server is not None and self._server.is_serving() and not self.coverage.blind_now

    # -- receiving ----------------------------------------------------------------
    async def _beat(self) -> None:
        while True:
            if self._server is not None and self._server.is_serving():
                self.coverage.looked(clock.now())
            elif not self._closing and not self.coverage.blind_now:
                log.error("smtp receiver stopped listening; mail from now on may be missed")
                self.coverage.failed(clock.now())
            await asyncio.sleep(self.config.heartbeat)

    async def deliver(self, raw: bytes, envelope: Envelope, received: float) -> str:
        """Match one mail against the watches in flight; the SMTP reply to give the sender.

        Mail is always accepted (250) once it fits the size limit: a mailer that got a 5xx from
        the approver's MX would tell the funnel the approver does not exist."""
        self.coverage.looked(received)
        self.counters["received"] += 1
        if not len(self._index):
            return "250 OK"
        try:
            mail = await asyncio.to_thread(mime.read, raw)
        except Exception as exc:  # the parser is lenient; anything left is a mail we cannot read
            self.counters["unparsable"] += 1
            log.warning("could not parse a received mail: %s", type(exc).__name__)
            return "250 OK"
        rcpts = set(mail.recipients) | {addr.lower() for addr in envelope.rcpt_tos}
        for where, text in mail.sections.items():
            for tid in set(TRACE_ID.findall(text.lower())):
                for w in list(self._index.get(tid)):
                    hop: SmtpHop = w.sink_spec
                    if where not in hop.where or (hop.to is not None and hop.to.lower() not in rcpts):
                        continue
                    detail = {
                        "where": where,
                        "rcpt": sorted(rcpts),
                        "message_id": mail.message_id,
                    }
                    w.observe(Observation(at=received, not_before=received, source="push", detail=detail))
                    self._index.discard(w)
                    self.counters["matched"] += 1
        return "250 OK"


plugin = SinkPlugin(
    name="smtp",
    config=SmtpConfig,
    hop=SmtpHop,
    factory=SmtpCollector,
    summary="an SMTP server that receives e-mail notifications",
)
