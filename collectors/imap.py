"""IMAP mailbox: the approver's real inbox, watched with IDLE (polling where IDLE is missing).

The SMTP receiver measures a path the approver never sees; this collector reads the mailbox the
notification really lands in (Gmail, Microsoft 365, Fastmail, a company Dovecot).

Why stdlib ``imaplib`` in one worker thread, not an asyncio client (aioimaplib): imaplib is the
most used IMAP client there is, ships with Python (no dependency to keep up to date), and a
dedicated thread keeps both the socket waits and the MIME parsing (``tracer.mime``, the SMTP
receiver's decoding) off the engine's loop, which the issue asks for anyway. The thread hands
results to the loop with ``call_soon_threadsafe``; watches and ``Coverage`` are only touched on
the loop. Python 3.11's imaplib has no ``idle()`` (3.14 adds one), so IDLE (RFC 2177) is the
few lines in ``_idle``.

How a look works (the same in both modes): NOOP (the portable sync point), ``UID FETCH <last+1>:* (UID INTERNALDATE
RFC822.SIZE)`` lists what is new since the last look, then, only if probes are in flight,
``BODY.PEEK[]`` (never sets ``\\Seen``) fetches the new mails, parsed in the worker thread.
IDLE is only the wake-up: the fetch is the truth, so a missed push costs time, not a sighting.

Timing, honestly:
- IDLE: a mail announced by ``* n EXISTS`` while idling is stamped when the push arrived
  (``at == not_before``, like a push receiver). A mail already there when IDLE began (it landed
  between the previous look and the IDLE command) gets ``not_before`` = that previous look.
- Polling: ``at`` is when the answer came back, ``not_before`` the previous good look.
- INTERNALDATE (when the server stored the mail) is the sink's own time (``sink_time``).
- Coverage is certified only by proof from the server: a look's answer, the tagged OK that ends
  an IDLE (``idle_refresh``), or any line it sends while idling. A reconnect, an error or a
  timeout is ``coverage.failed``; the mailbox is retroactive (the next look after a reconnect
  still finds what arrived meanwhile, from the last UID seen), so blind windows make a hop
  ``unknown`` only where the timing was lost, never ``lost``.

Cleanup (optional): matched mails are moved to ``cleanup_folder`` (``UID MOVE``, or COPY +
``\\Deleted`` + EXPUNGE where MOVE is missing) or deleted, so a canary does not fill the inbox.
Without cleanup the folder is opened read-only (EXAMINE).
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import logging
import queue
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from tracer import clock, mime
from tracer.net import is_loopback
from tracer.plugins import SinkPlugin
from tracer.probe import TRACE_ID
from tracer.schema import Duration, Model, Secret
from tracer.supervise import Supervisor
from tracer.watch import Coverage, Observation, Watch, WatchIndex

log = logging.getLogger(__name__)

Tls = Literal["imaps", "starttls", "none"]


class ImapConfig(Model):
    host: str = Field(min_length=1, description="IMAP server, e.g. imap.gmail.com")
    port: int | None = Field(None, ge=1, le=65535, description="default 993 for imaps, else 143")
    tls: Tls = Field("imaps", description="imaps (TLS from the start), starttls, or none (loopback only)")
    ca_file: str | None = Field(None, description="PEM bundle to trust instead of the system CAs")
    username: str = Field(min_length=1)
    password: Secret | None = Field(None, description="LOGIN (an app password for Gmail / Microsoft 365)")
    oauth2_token: Secret | None = Field(None, description="XOAUTH2 bearer access token instead of a password")
    folder: str = Field("INBOX", min_length=1, description="the folder notifications land in")
    idle: bool = Field(True, description="use IDLE when the server offers it; else poll")
    idle_refresh: Duration = Field(
        10.0, gt=0, le=29 * 60, description="end and restart IDLE this often: proves the link is alive"
    )
    poll_interval: Duration = Field(5.0, gt=0, description="seconds between looks without IDLE")
    timeout: Duration = Field(10.0, gt=0, description="socket timeout for one command")
    heartbeat: Duration = Field(0.25, gt=0, description="how often the idling worker checks for work")
    max_backoff: Duration = Field(30.0, gt=0, description="longest pause between reconnects")
    max_bytes: int = Field(2 * 1024 * 1024, gt=0, description="larger mails are not downloaded or matched")
    cleanup: Literal["move", "delete"] | None = Field(None, description="what to do with a matched mail")
    cleanup_folder: str = Field("Trash", min_length=1, description="where cleanup: move puts them")

    @model_validator(mode="after")
    def _auth_and_tls(self) -> ImapConfig:
        if (self.password is None) == (self.oauth2_token is None):
            raise ValueError("give exactly one of password (LOGIN) and oauth2_token (XOAUTH2)")
        if self.tls == "none" and not is_loopback(self.host):
            raise ValueError(
                f"tls: none sends the password in clear; only allowed for loopback, not {self.host}"
            )
        return self

    @property
    def effective_port(self) -> int:
        return self.port or (993 if self.tls == "imaps" else 143)


class ImapHop(Model):
    to: str | None = Field(None, description="only mail to this address (To or Cc), case-insensitive")
    where: list[mime.Where] = Field(
        default_factory=lambda: ["subject", "headers", "body"],
        min_length=1,
        description="where the trace id may appear; 'headers' means every header but Subject",
    )


@dataclass(frozen=True)
class Found:
    """One new mail, read by the worker; matched on the loop."""

    uid: int
    at: float
    not_before: float
    internaldate: float | None
    mail: mime.MailText | None  # None: not downloaded (nothing in flight), or unreadable
    unread: str | None = None  # why part or all of a mail we meant to read was not read


class _Reader:
    """imaplib's ``file``, replaced: buffered reads that can also *wait* for a line with a
    timeout (``wait_line``). A timed-out read on the socket's own ``makefile`` poisons it for
    good ("cannot read from timed out object"), and ``select`` alone misses what TLS or a
    buffer already holds, so IDLE needs a reader that knows what it has."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def _fill(self, wait: float | None) -> None:
        if self.eof:
            return
        pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
        if wait is not None and not pending and not select.select([self.sock], [], [], wait)[0]:
            return
        try:
            chunk = self.sock.recv(65536)  # blocks at most the socket's command timeout
        except ssl.SSLWantReadError:  # half a TLS record so far
            return
        if not chunk:
            self.eof = True
        self.buf += chunk

    def wait_line(self, wait: float) -> bool:
        if b"\n" not in self.buf and not self.eof:
            self._fill(wait)
        return b"\n" in self.buf or self.eof

    def readline(self, limit: int = -1) -> bytes:
        while b"\n" not in self.buf and not self.eof and (limit < 0 or len(self.buf) < limit):
            self._fill(None)
        end = self.buf.find(b"\n") + 1 or len(self.buf)
        if limit >= 0:
            end = min(end, limit)
        line = bytes(self.buf[:end])
        del self.buf[:end]
        return line

    def read(self, size: int) -> bytes:
        while len(self.buf) < size and not self.eof:
            self._fill(None)
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data

    def close(self) -> None:
        self.buf.clear()


class ImapError(Exception):
    """The session broke (server said BAD/NO/BYE, or the socket failed): reconnect, blind."""


class LoginRefused(ImapError):
    """The server refused our credentials (RFC 5530 AUTHENTICATIONFAILED, Gmail's "Invalid
    credentials"): a setup error no retry fixes, so every wait ends now (``Coverage.broke``)."""


_REFUSED = ("AUTHENTICATIONFAILED", "AUTHORIZATIONFAILED", "INVALID CREDENTIALS", "EXPIRED")


_FETCH_META = re.compile(rb"UID (\d+)|INTERNALDATE \"([^\"]+)\"|RFC822\.SIZE (\d+)")
_EXISTS = re.compile(rb"^\* \d+ EXISTS", re.I)


def parse_internaldate(text: str) -> float | None:
    """``17-Jul-1996 02:44:25 -0700`` (day may be space-padded) -> epoch seconds."""
    try:
        return datetime.strptime(text.strip(), "%d-%b-%Y %H:%M:%S %z").timestamp()
    except ValueError:
        return None


class ImapCollector:
    sink: ClassVar[str] = "imap"

    def __init__(self, config: ImapConfig) -> None:
        self.config = config
        self.coverage = Coverage(retroactive=True)
        self._supervisor = Supervisor("imap-worker", self.coverage)  # its crashed(): one rule for all
        self._index = WatchIndex()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._cleanup: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._last_uid: int | None = None  # highest UID looked at (survives reconnects)
        self._uidvalidity: int | None = None
        self._caps: set[str] = set()
        self._reader: _Reader | None = None
        self._rescan_floor: float | None = None  # epoch: after a UIDVALIDITY change, skip older mail
        self.mode = "idle" if config.idle else "poll"
        self.last_error: str | None = None
        self.last_look_rtt = 0.0
        self.counters = dict.fromkeys(
            ("sessions", "looks", "pushes", "mails", "matched", "too_large", "unparsable", "cleaned"), 0
        )

    # -- Collector protocol -------------------------------------------------
    @property
    def error_bar(self) -> float:
        return self.last_look_rtt if self.mode == "idle" else self.config.poll_interval

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name="imap-collector", daemon=True)
        self._thread.start()
        # Wait for the first session so a spec run starts seeing; a mailbox that is down is not
        # fatal (the worker keeps trying, and until then the collector is blind).
        ok = await asyncio.to_thread(self._connected.wait, self.config.timeout + 1)
        if not ok:
            log.error("imap: no session with %s yet (%s); blind until one", self.config.host, self.last_error)

    async def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self.config.timeout + 2)

    def watch(self, w: Watch) -> None:
        self._index.add(w)

    def unwatch(self, w: Watch) -> None:
        self._index.discard(w)

    def health(self) -> dict[str, Any]:
        return {
            "up": not self.coverage.blind_now
            and self._connected.is_set()
            and self._thread is not None
            and self._thread.is_alive(),
            "mode": self.mode,
            "folder": self.config.folder,
            "in_flight": len(self._index),
            "last_error": self.last_error,
            "internal_errors": self._supervisor.crashes,
            **self.counters,
        }

    # -- loop side ----------------------------------------------------------------
    def _call(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed under a stopping worker
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_found(self, found: list[Found]) -> None:
        for f in found:
            before = self.counters["matched"]
            if f.unread is not None and f.mail is None:
                self._missed(f)
                continue
            if f.mail is None:
                continue
            for where, text in f.mail.sections.items():
                for tid in set(TRACE_ID.findall(text.lower())):
                    for w in list(self._index.get(tid)):
                        hop: ImapHop = w.sink_spec
                        if where not in hop.where or (
                            hop.to is not None and hop.to.lower() not in f.mail.recipients
                        ):
                            continue
                        detail = {
                            "where": where,
                            "uid": f.uid,
                            "folder": self.config.folder,
                            "message_id": f.mail.message_id,
                        }
                        w.observe(
                            Observation(
                                at=f.at,
                                not_before=min(f.at, max(f.not_before, w.since)),
                                source=self.mode,
                                sink_time=f.internaldate,
                                detail=detail,
                            )
                        )
                        self._index.discard(w)
                        self.counters["matched"] += 1
                        if self.config.cleanup:
                            self._cleanup.put(f.uid)
            if f.unread is not None and self.counters["matched"] == before:
                self._missed(f)

    def _missed(self, f: Found) -> None:
        """A mail we could not read whole and that was no probe's, as far as we read: it may have
        been any in-flight probe's notification, and no later look will read it better."""
        self.coverage.missed(f.not_before, f.at, f"a mail {f.unread}")

    # -- worker thread ------------------------------------------------------------
    def _work(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            conn: imaplib.IMAP4 | None = None
            try:
                conn = self._session()
                backoff = 0.0
                self._serve(conn)
            except (OSError, imaplib.IMAP4.error, ImapError, ssl.SSLError, EOFError) as exc:
                if self._stop.is_set():
                    break
                self.last_error = f"{type(exc).__name__}: {_clean(str(exc))}"
                if isinstance(exc, LoginRefused):
                    self._call(self.coverage.broke, clock.now(), str(exc))
                    backoff = self.config.max_backoff  # a password is not fixed in seconds
                else:
                    self._call(self.coverage.failed, clock.now(), self.last_error)
                    backoff = min(self.config.max_backoff, max(0.25, backoff * 2))
                log.warning("imap session failed (%s); reconnecting in %.2fs", self.last_error, backoff)
                self._stop.wait(backoff)
            except Exception as exc:  # noqa: BLE001 (never a silent death of the worker)
                # What a hostile or broken server can make imaplib (or our parsing) raise beyond
                # its own errors, e.g. UnicodeDecodeError on non-ASCII where it expects ASCII:
                # counted, logged once per kind, blind, and a new session like any failure.
                if self._stop.is_set():
                    break
                self.last_error = f"internal error ({type(exc).__name__})"
                self._call(self._supervisor.crashed, exc)
                backoff = min(self.config.max_backoff, max(1.0, backoff * 2))
                self._stop.wait(backoff)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.shutdown()

    def _session(self) -> imaplib.IMAP4:
        cfg = self.config
        ctx = ssl.create_default_context(cafile=cfg.ca_file) if cfg.tls != "none" else None
        if cfg.tls == "imaps":
            conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                cfg.host, cfg.effective_port, ssl_context=ctx, timeout=cfg.timeout
            )
        else:
            conn = imaplib.IMAP4(cfg.host, cfg.effective_port, timeout=cfg.timeout)
            if cfg.tls == "starttls":
                conn.starttls(ssl_context=ctx)
        conn.file = self._reader = _Reader(conn.sock)  # type: ignore[assignment]  # see _Reader
        try:
            if cfg.oauth2_token is not None:
                token = cfg.oauth2_token.get_secret_value()
                blob = f"user={cfg.username}\x01auth=Bearer {token}\x01\x01".encode()
                conn.authenticate("XOAUTH2", lambda _challenge: blob)
            else:
                assert cfg.password is not None
                conn.login(cfg.username, cfg.password.get_secret_value())
        except imaplib.IMAP4.error as exc:
            text = _clean(str(exc))  # the server's words; it never echoes the password
            if any(code in text.upper() for code in _REFUSED):
                raise LoginRefused(f"login refused: {text}") from None
            raise
        typ, caps = conn.capability()  # after auth: servers add IDLE, MOVE... once logged in
        self._caps = (
            set(caps[0].decode().upper().split())
            if typ == "OK" and caps and caps[0]
            else set(conn.capabilities)
        )
        typ, _ = conn.select(_quote(cfg.folder), readonly=cfg.cleanup is None)
        if typ != "OK":
            raise ImapError(f"cannot open folder {cfg.folder!r}")
        # imaplib files "* OK [UIDVALIDITY n]" under its response code.
        validity = _first_int(conn.untagged_responses.get("UIDVALIDITY", []))
        uidnext = _first_int(conn.untagged_responses.get("UIDNEXT", []))
        if self._last_uid is None:
            # First session: start from what is there now; probes are registered before
            # injection, so nothing older can be one of them.
            self._last_uid = (uidnext or 1) - 1
        elif validity != self._uidvalidity:
            # The folder was rebuilt (new UIDs): read it all again, but download only mail the
            # server stored after our last certified look (older mail was already seen).
            log.warning("imap: UIDVALIDITY of %s changed; re-reading the folder", cfg.folder)
            self._last_uid = 0
            if self.coverage.certified > float("-inf"):
                self._rescan_floor = clock.wall(self.coverage.certified) - 120.0
        self._uidvalidity = validity
        self.mode = "idle" if cfg.idle and "IDLE" in self._caps else "poll"
        self.counters["sessions"] += 1
        return conn

    def _serve(self, conn: imaplib.IMAP4) -> None:
        # Anything that landed while we were away is on the server: the first look finds it,
        # with ``not_before`` at the last moment certified before the outage.
        prev = self.coverage.certified if self.coverage.certified > float("-inf") else clock.now()
        prev = self._look(conn, not_before=prev, push_at=None)
        self._connected.set()
        while not self._stop.is_set():
            self._clean(conn)
            if self.mode == "idle":
                push_at, proof = self._idle(conn, prev)
                if push_at is None:
                    self._call(self.coverage.looked, proof)
                    prev = proof
                    continue
                prev = self._look(conn, not_before=prev, push_at=push_at)
            else:
                if self._stop.wait(self.config.poll_interval):
                    break
                prev = self._look(conn, not_before=prev, push_at=None)

    def _look(self, conn: imaplib.IMAP4, not_before: float, push_at: tuple[float, float] | None) -> float:
        """One look for new mail. Returns when it was sent (everything before is covered)."""
        conn.untagged_responses.clear()  # imaplib keeps EXISTS/RECENT lines forever otherwise
        sent = clock.now()
        # NOOP first: a server only shows new mail at a sync point (Dovecot does not rescan
        # the maildir for a FETCH), and NOOP is the portable one.
        typ, _ = conn.noop()
        if typ != "OK":
            raise ImapError(f"NOOP answered {typ}")
        typ, data = conn.uid("FETCH", f"{(self._last_uid or 0) + 1}:*", "(UID INTERNALDATE RFC822.SIZE)")
        answered = clock.now()
        self.last_look_rtt = answered - sent
        if typ != "OK":
            raise ImapError(f"UID FETCH answered {typ}")
        self.counters["looks"] += 1
        metas = [m for m in (_meta(item) for item in data) if m and m[0] > (self._last_uid or 0)]
        found: list[Found] = []
        if metas:
            if push_at is not None:
                # Pushed while idling: stamped at the push. Announced as IDLE began, it was
                # pending (it landed between the previous look and the IDLE command), so it
                # may have landed any time after that look.
                at, idle_began = push_at
                pending = at - idle_began < max(0.02, idle_began - not_before)
                lo = not_before if pending else at
            else:
                at, lo = answered, not_before
            want = len(self._index) > 0  # read after the answer: a watch added before is seen
            floor = self._rescan_floor
            fresh = [m for m in metas if floor is None or m[1] is None or m[1] >= floor]
            limit = self.config.max_bytes
            small = [uid for uid, _, size in fresh if size <= limit]
            big = {uid for uid, _, size in fresh if size > limit}
            self.counters["too_large"] += len(big)
            mails = self._read(conn, small) if want and small else {}
            if want and big:
                # Its first max_bytes: the head, where notifications carry the trace id.
                mails.update(self._read(conn, sorted(big), f"BODY.PEEK[]<0.{limit}>"))
            wanted = {uid for uid, _, _ in fresh} if want else set()
            for uid, idate, _ in sorted(metas):
                unread = None
                if uid in wanted and uid not in mails:
                    unread = "that could not be read (unparsable, or gone before we read it)"
                elif uid in big and uid in mails:
                    unread = f"over max_bytes, read only in its first {limit} bytes"
                found.append(Found(uid, at, min(lo, at), idate, mails.get(uid), unread))
                self._last_uid = max(self._last_uid or 0, uid)
            self.counters["mails"] += len(metas)
            self._call(self._on_found, found)
        self._call(self.coverage.looked, sent)
        return sent

    def _read(
        self, conn: imaplib.IMAP4, uids: list[int], section: str = "BODY.PEEK[]"
    ) -> dict[int, mime.MailText]:
        """Download and parse mails, 50 a command (a flood costs a few round trips, not one each)."""
        out: dict[int, mime.MailText] = {}
        for i in range(0, len(uids), 50):
            batch = ",".join(str(u) for u in uids[i : i + 50])
            typ, data = conn.uid("FETCH", batch, f"(UID {section})")
            if typ != "OK":
                raise ImapError(f"UID FETCH BODY answered {typ}")
            for item in data:
                if not (isinstance(item, tuple) and len(item) > 1):
                    continue  # the closing ")" of each item, or a mail expunged meanwhile
                m = re.search(rb"UID (\d+)", item[0])
                if m is None:
                    continue
                try:
                    out[int(m.group(1))] = mime.read(item[1])  # in this thread: never on the loop
                except Exception as exc:  # lenient parser; anything left is a mail we cannot read
                    self.counters["unparsable"] += 1
                    log.warning("imap: could not parse a mail: %s", type(exc).__name__)
        return out

    def _idle(self, conn: imaplib.IMAP4, prev: float) -> tuple[tuple[float, float] | None, float]:
        """IDLE until a mail is announced, cleanup is due, or ``idle_refresh`` passed.

        Returns ``((push time, IDLE start), _)`` on a push, else ``(None, proof)`` where ``proof``
        is the moment DONE was sent: the tagged OK after it shows the server would have told us
        of anything before then."""
        cfg = self.config
        tag = conn._new_tag().decode()  # type: ignore[attr-defined]  # imaplib has no public IDLE before 3.14
        conn.send(f"{tag} IDLE\r\n".encode())
        line = conn.readline()
        if not line.startswith(b"+"):
            raise ImapError(f"IDLE refused: {_clean(line.decode(errors='replace'))}")
        began = clock.now()
        push_at: float | None = None
        end = time.monotonic() + cfg.idle_refresh
        while (
            push_at is None and time.monotonic() < end and not self._stop.is_set() and self._cleanup.empty()
        ):
            assert self._reader is not None
            if not self._reader.wait_line(cfg.heartbeat):
                continue
            line = conn.readline()
            now = clock.now()
            if not line:  # EOF: imaplib's readline does not raise for it
                raise ImapError("server closed the connection while idling")
            if _EXISTS.match(line):
                push_at = now
                self.counters["pushes"] += 1
            elif line.startswith(b"* BYE"):
                raise ImapError("server said BYE while idling")
            else:  # "* OK Still here", flag updates...: the link is alive up to now
                self._call(self.coverage.looked, now)
        done_sent = clock.now()
        conn.send(b"DONE\r\n")
        while True:
            line = conn.readline()
            if not line:
                raise ImapError("server closed the connection ending IDLE")
            if line.startswith(tag.encode()):
                if b" OK" not in line[: len(tag) + 4].upper():
                    raise ImapError(f"IDLE ended with {_clean(line.decode(errors='replace'))}")
                break
            if _EXISTS.match(line) and push_at is None:
                push_at = clock.now()
        return ((push_at, began), done_sent) if push_at is not None else (None, done_sent)

    def _clean(self, conn: imaplib.IMAP4) -> None:
        uids: list[int] = []
        while not self._cleanup.empty():
            uids.append(self._cleanup.get())
        if not uids:
            return
        cfg, ids = self.config, ",".join(str(u) for u in sorted(set(uids)))
        if cfg.cleanup == "move" and "MOVE" in self._caps:
            typ, _ = conn.uid("MOVE", ids, _quote(cfg.cleanup_folder))
        else:
            if cfg.cleanup == "move":
                typ, _ = conn.uid("COPY", ids, _quote(cfg.cleanup_folder))
                if typ != "OK":
                    raise ImapError(f"COPY to {cfg.cleanup_folder!r} answered {typ}")
            typ, _ = conn.uid("STORE", ids, "+FLAGS.SILENT", r"(\Deleted)")
            if typ == "OK":
                typ, _ = conn.expunge()
        if typ != "OK":
            raise ImapError(f"cleanup answered {typ}")
        self.counters["cleaned"] += len(uids)


def _meta(item: Any) -> tuple[int, float | None, int] | None:
    """(uid, INTERNALDATE epoch, size) from one FETCH response item."""
    raw = item[0] if isinstance(item, tuple) else item
    if not isinstance(raw, bytes):
        return None
    uid = size = None
    idate = None
    for m in _FETCH_META.finditer(raw):
        if m.group(1):
            uid = int(m.group(1))
        elif m.group(2):
            idate = parse_internaldate(m.group(2).decode())
        elif m.group(3):
            size = int(m.group(3))
    return (uid, idate, size or 0) if uid is not None else None


def _first_int(items: list[Any]) -> int | None:
    for item in items:
        m = re.search(rb"(\d+)", item if isinstance(item, bytes) else b"")
        if m:
            return int(m.group(1))
    return None


def _quote(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _clean(text: str) -> str:
    """Server text for logs: one line, bounded (credentials are never in what we echo)."""
    return " ".join(text.split())[:200]


plugin = SinkPlugin(
    name="imap",
    config=ImapConfig,
    hop=ImapHop,
    factory=ImapCollector,
    summary="a real mailbox over IMAP (IDLE, or polling), TLS, LOGIN or XOAUTH2",
)
