"""The IMAP mailbox collector against a real Dovecot (tests/dovecot.py): IDLE and polling, IMAPS
and STARTTLS, LOGIN and XOAUTH2, cleanup, an outage, and a flood of unrelated mail."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from collectors.imap import ImapCollector, ImapConfig, parse_internaldate
from tests import dovecot
from tracer import clock
from tracer.probe import Probe, new_trace_id
from tracer.sandbox.approvals import ApprovalSettings, approval_email
from tracer.spec import HopSpec
from tracer.verdict import LOST, OK, UNKNOWN, judge_present
from tracer.watch import Watch

pytestmark = pytest.mark.timeout(60)

if not dovecot.available():
    if os.environ.get("CI") == "true":
        raise RuntimeError(dovecot.HOW_TO_GET)  # CI installs it (.ci/run): never skip there
    pytest.skip(dovecot.HOW_TO_GET, allow_module_level=True)


@pytest.fixture(scope="module")
def server() -> Iterator[dovecot.Dovecot]:
    d = dovecot.Dovecot().start()
    yield d
    d.close()


def config(d: dovecot.Dovecot, **over: Any) -> ImapConfig:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": d.imaps_port,
        "tls": "imaps",
        "ca_file": d.cert,
        "username": "ana",
        "password": "ana-secret",
        "idle_refresh": "1s",
        "poll_interval": "300ms",
    }
    base.update(over)
    return ImapConfig(**base)


def watch(probe: Probe | None = None, name: str = "email", target: float = 300, **hop: Any) -> Watch:
    return Watch(
        probe=probe or Probe(step="approval"),
        hop=HopSpec(name=name, target=target, imap=hop),
        since=clock.now(),
    )


def run(main: Callable[[ImapCollector], Awaitable[None]], cfg: ImapConfig) -> ImapCollector:
    col = ImapCollector(cfg)

    async def go() -> None:
        await col.start()
        try:
            await main(col)
        finally:
            await col.close()

    asyncio.run(go())
    return col


def notification(trace_id: str, encoding: str = "quoted-printable") -> bytes:
    """The sandbox funnel's own approval e-mail (text + HTML, trace id in the footer)."""
    a = {"id": "apr_1", "resource": "prod-db", "requester": "ana@example.com", "trace_id": trace_id}
    settings = ApprovalSettings(approver_email="ana@funnel.invalid", email_encoding=encoding)  # type: ignore[arg-type]
    return approval_email(settings, a).as_bytes()


async def deliver_later(
    d: dovecot.Dovecot, raw: bytes, delay: float, user: str = "ana"
) -> tuple[float, float]:
    """Deliver after ``delay`` through dovecot-lda; returns (monotonic start, end) of delivery."""
    await asyncio.sleep(delay)
    t0 = clock.now()
    await asyncio.to_thread(d.deliver, user, raw)
    return t0, clock.now()


def test_idle_sees_the_sandbox_notification_within_delivery_plus_error_bar(server: dovecot.Dovecot) -> None:
    async def main(col: ImapCollector) -> None:
        assert col.mode == "idle" and col.health()["up"]
        w = watch(to="ana@funnel.invalid", where=["body"])
        col.watch(w)
        injected = clock.now()
        t0, t1 = await deliver_later(server, notification(w.trace_id, "base64"), 0.3)
        assert await w.wait_seen(5), col.health()
        obs = w.first
        assert obs is not None and obs.source == "idle" and obs.detail["where"] == "body"
        # Arrival lies in the delivery window; the sighting trails it by Dovecot's own IDLE
        # change-notification delay (about 0.5 s, the bare client of bench/imap_idle.py sees it
        # too) plus the error bar.
        assert t0 - injected >= 0.3
        assert t0 <= obs.at <= t1 + 0.5 + col.error_bar + 0.5, (t0, t1, obs)
        assert obs.not_before <= obs.at and obs.error_bar < 0.5
        assert (
            obs.sink_time is not None and abs(obs.sink_time - clock.wall(t1)) < 2.5
        )  # INTERNALDATE, 1 s grain

    run(main, config(server))


def test_starttls_xoauth2_polling_lag_within_interval(server: dovecot.Dovecot) -> None:
    token = server.token_for("bob")
    cfg = config(server, port=server.imap_port, tls="starttls", username="bob", password=None,
                 oauth2_token=token, idle=False)  # fmt: skip

    async def main(col: ImapCollector) -> None:
        assert col.mode == "poll" and col.health()["up"], col.health()
        w = watch()
        col.watch(w)
        t0, t1 = await deliver_later(server, notification(w.trace_id), 0.2, user="bob")
        assert await w.wait_seen(5), col.health()
        obs = w.first
        assert obs is not None and obs.source == "poll"
        # The true arrival is in (not_before, at]; the poll cadence bounds how far 'at' trails it.
        assert obs.not_before <= t1 and obs.at >= t0
        assert obs.at - t1 <= cfg.poll_interval + 0.5
        assert obs.error_bar <= cfg.poll_interval + 0.5

    col = run(main, cfg)
    assert token not in repr(col.health()) and token not in repr(cfg)


def test_subject_headers_recipient_and_encodings(server: dovecot.Dovecot) -> None:
    async def main(col: ImapCollector) -> None:
        subj, hdr, other = watch(where=["subject"]), watch(where=["headers"]), watch(to="carol@x.invalid")
        body_only = watch(where=["body"])
        for w in (subj, hdr, other, body_only):
            col.watch(w)
        subject = base64.b64encode(f"Approval ✅ {subj.trace_id}".encode()).decode()
        raw = (
            f"Subject: =?utf-8?b?{subject}?=\r\nTo: Ana <ana@funnel.invalid>\r\nX-Trace: {hdr.trace_id}\r\n\r\n"
            f"for someone else: {other.trace_id}\r\nbody: {body_only.trace_id[:16]}\r\n{body_only.trace_id[16:]}\r\n"
        ).encode()
        assert subj.trace_id.encode() not in raw  # the subject really is encoded
        await deliver_later(server, raw, 0)
        assert await subj.wait_seen(10) and await hdr.wait_seen(10), col.health()
        assert subj.first is not None and subj.first.detail["where"] == "subject"
        assert hdr.first is not None and hdr.first.detail["where"] == "headers"
        await asyncio.sleep(0.5)
        assert not other.observations  # To: ana, not carol
        assert not body_only.observations  # split across two lines: not one id

    run(main, config(server))


def list_uids(d: dovecot.Dovecot, folder: str) -> list[bytes]:
    c = imaplib.IMAP4("127.0.0.1", d.imap_port)
    try:
        c.login("ana", "ana-secret")
        c.select(folder, readonly=True)
        typ, data = c.search(None, "ALL")
        return data[0].split()
    finally:
        c.logout()


def test_cleanup_moves_then_deletes_matched_mail(server: dovecot.Dovecot) -> None:
    for mode, folder in (("move", "Trash"), ("delete", None)):
        before_inbox = len(list_uids(server, "INBOX"))
        before_trash = len(list_uids(server, "Trash"))

        async def main(col: ImapCollector) -> None:
            w = watch()
            col.watch(w)
            await deliver_later(server, notification(w.trace_id), 0)
            await deliver_later(server, notification(new_trace_id()), 0)  # unrelated: stays
            assert await w.wait_seen(5), col.health()
            end = time.monotonic() + 5
            while col.counters["cleaned"] < 1 and time.monotonic() < end:
                await asyncio.sleep(0.05)

        col = run(main, config(server, cleanup=mode))
        assert col.counters["cleaned"] == 1, col.health()
        assert len(list_uids(server, "INBOX")) == before_inbox + 1
        assert len(list_uids(server, "Trash")) == before_trash + (1 if folder else 0)


def test_outage_mid_run_gives_unknown_not_lost() -> None:
    d = dovecot.Dovecot().start()
    try:

        async def main(col: ImapCollector) -> None:
            early, during, never = watch(target=1), watch(target=1), watch(target=1)
            for w in (early, during, never):
                col.watch(w)
            start = clock.now()
            await deliver_later(d, notification(early.trace_id), 0)
            assert await early.wait_seen(5), col.health()
            await asyncio.to_thread(d.kill)  # the mailbox server dies mid-run
            await asyncio.sleep(0.5)
            assert col.coverage.blind_now and not col.health()["up"]
            # An MTA writes the maildir without the IMAP server: this mail lands while we are blind.
            await asyncio.to_thread(d.write_maildir, "ana", notification(during.trace_id))
            # Judged now, in the outage: a probe whose deadline passed while blind is unknown.
            deadline = clock.now() - start
            covered = col.coverage.certified >= start + deadline
            assert judge_present(None, start, 1.0, deadline, col.coverage, certified=covered)[0] == UNKNOWN
            await asyncio.sleep(1.0)
            await asyncio.to_thread(d.start)
            assert await during.wait_seen(25), (  # Dovecot's restart is slow on a loaded machine
                col.health(),
                d.log()[-1500:],
            )  # retroactive: found after the reconnect
            obs = during.first
            assert obs is not None
            v, reason = judge_present(obs, start, 1.0, 30.0, col.coverage, certified=True)
            assert v == UNKNOWN, (v, reason, obs)  # late-looking, but the window was blind
            # After the reconnect the mailbox was read again from the last UID seen: a mail that
            # is still not there really is missing (retroactive sink), so lost is the truth.
            assert not never.observations
            assert judge_present(None, start, 1.0, deadline, col.coverage, certified=True)[0] == LOST
            assert judge_present(early.first, start, 1.0, 30.0, col.coverage, True)[0] == OK
            assert col.coverage.failures >= 1 and col.counters["sessions"] >= 2

        run(main, config(d, max_backoff="300ms"))
    finally:
        d.close()


def test_a_thousand_unrelated_mails_match_nothing(server: dovecot.Dovecot) -> None:
    async def main(col: ImapCollector) -> None:
        watched = [watch() for _ in range(5)]
        for w in watched:
            col.watch(w)
        target = watched[0]

        def flood() -> None:
            c = imaplib.IMAP4_SSL(
                "127.0.0.1", server.imaps_port, ssl_context=ssl.create_default_context(cafile=server.cert)
            )
            c.login("ana", "ana-secret")
            for i in range(1000):
                near = target.trace_id[:-1] + ("0" if target.trace_id[-1] != "0" else "1")  # one digit off
                body = f"Subject: unrelated {i}\r\nTo: ana@funnel.invalid\r\n\r\ntrace {new_trace_id()} {near}\r\n"
                c.append("INBOX", None, None, body.encode())
            c.logout()

        await asyncio.to_thread(flood)
        await deliver_later(server, notification(target.trace_id), 0)
        assert await target.wait_seen(10), col.health()
        await asyncio.sleep(0.3)
        assert [w for w in watched if w.observations] == [target]
        assert col.counters["mails"] >= 1001 and col.counters["matched"] == 1

    run(main, config(server))


def test_wrong_password_is_blind_and_keeps_the_secret() -> None:
    d = dovecot.Dovecot().start()
    try:
        cfg = config(d, password="not-the-password", max_backoff="200ms", timeout="1s")

        async def main(col: ImapCollector) -> None:
            await asyncio.sleep(0.3)
            h = col.health()
            assert not h["up"] and col.coverage.blind_now and h["last_error"]
            assert "not-the-password" not in repr(h)

        run(main, cfg)
    finally:
        d.close()


def test_config_rules() -> None:
    with pytest.raises(ValidationError, match="exactly one of password"):
        ImapConfig(host="127.0.0.1", username="a")
    with pytest.raises(ValidationError, match="exactly one of password"):
        ImapConfig(host="127.0.0.1", username="a", password="p", oauth2_token="t")
    with pytest.raises(ValidationError, match="only allowed for loopback"):
        ImapConfig(host="imap.example.com", username="a", password="p", tls="none")
    assert ImapConfig(host="imap.example.com", username="a", password="p").effective_port == 993
    assert parse_internaldate(" 7-Jul-2024 02:44:25 -0700") == 1720345465.0


def test_folder_rebuilt_while_down_is_read_again() -> None:
    """A new UIDVALIDITY (the server lost its UID list) must not skip mail that landed meanwhile."""
    d = dovecot.Dovecot().start()
    try:

        async def main(col: ImapCollector) -> None:
            first, during = watch(), watch()
            col.watch(first)
            col.watch(during)
            await deliver_later(d, notification(first.trace_id), 0)
            assert await first.wait_seen(5), col.health()
            # Dovecot takes a new UIDVALIDITY from the clock (seconds): rebuilding within the
            # folder's first second would reuse it, which no real outage does.
            await asyncio.sleep(1.1)
            await asyncio.to_thread(d.kill)
            box = d.dir / "mail" / "ana"
            for p in box.glob("dovecot*"):  # uid list and indexes gone: Dovecot renumbers
                p.unlink()
            await asyncio.to_thread(d.write_maildir, "ana", notification(during.trace_id))
            await asyncio.to_thread(d.start)
            assert await during.wait_seen(10), col.health()
            assert col.counters["matched"] == 2  # the old mail was not matched again

        run(main, config(d, max_backoff="300ms"))
    finally:
        d.close()
