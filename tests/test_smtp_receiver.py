"""The SMTP receiver over real sockets: smtplib and the sandbox funnel deliver real mail to it."""

from __future__ import annotations

import asyncio
import base64
import smtplib
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from typing import Any

import httpx
import pytest

from collectors.smtp import SmtpCollector, SmtpConfig
from tracer import clock
from tracer.probe import Probe
from tracer.sandbox.approvals import ApprovalSettings
from tracer.sandbox.runner import Sandbox
from tracer.spec import HopSpec
from tracer.watch import Watch

pytestmark = pytest.mark.timeout(30)

APPROVER = "approver@funnel.invalid"


@pytest.fixture(scope="module")
def sandbox() -> Any:
    with Sandbox() as sb:
        yield sb


def watch(probe: Probe | None = None, name: str = "email", **hop: Any) -> Watch:
    return Watch(
        probe=probe or Probe(step="approval"),
        hop=HopSpec(name=name, target=300, smtp=hop),
        since=clock.now(),
    )


def run(main: Callable[[SmtpCollector], Awaitable[None]], **config: Any) -> None:
    async def go() -> None:
        # Tests of other behaviour may run without auth; auth has its own tests.
        mx = SmtpCollector(SmtpConfig(**{"allow_unauthenticated": True, **config}))
        await mx.start()
        try:
            await main(mx)
        finally:
            await mx.close()

    asyncio.run(go())


async def send(mx: SmtpCollector, raw: bytes | EmailMessage, to: str = APPROVER) -> None:
    """Deliver with smtplib, off the loop (it blocks), exactly as the sandbox funnel does."""

    def go() -> None:
        assert mx.port is not None
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=5) as smtp:
            if isinstance(raw, EmailMessage):
                smtp.send_message(raw, to_addrs=[to])
            else:
                smtp.sendmail("funnel@funnel.invalid", [to], raw)

    await asyncio.to_thread(go)


def test_sandbox_email_seen_within_delay_knob(sandbox: Sandbox) -> None:
    async def main(mx: SmtpCollector) -> None:
        sandbox.ctx.extra["approvals"] = ApprovalSettings(
            smtp_host="127.0.0.1", smtp_port=mx.port or 0, email_delay=0.4, emit_event=False
        )
        w = watch(to=APPROVER, where=["body"])
        mx.watch(w)
        body = {"resource": "prod-db", "requester": "ana@example.com", "payload": {}}
        headers = {"traceparent": f"00-{w.trace_id}-{'ab' * 8}-01"}  # the id travels in the header
        async with httpx.AsyncClient() as client:
            t0 = clock.now()
            resp = await client.post(f"{sandbox.url}/api/v1/approvals", json=body, headers=headers)
        assert resp.status_code == 201
        assert await w.wait_seen(3)
        assert w.first is not None
        lag = w.first.at - t0
        assert 0.4 - 0.01 <= lag <= 0.4 + 0.25, lag
        assert w.first.source == "push" and w.first.detail["where"] == "body"
        assert APPROVER in w.first.detail["rcpt"]

    run(main)


def test_trace_id_only_inside_a_base64_html_part_is_matched() -> None:
    async def main(mx: SmtpCollector) -> None:
        probe = Probe(step="approval")
        in_body = watch(probe, where=["body"])
        in_subject = watch(probe, name="subject", where=["subject", "headers"])
        mx.watch(in_body)
        mx.watch(in_subject)
        msg = EmailMessage()
        msg["Subject"] = "Approval needed: prod-db"
        msg["From"], msg["To"] = "funnel@funnel.invalid", APPROVER
        msg.set_content("Please open the HTML version of this mail.")
        msg.add_alternative(f"<p>Trace <code>{probe.trace_id}</code></p>", subtype="html", cte="base64")
        raw = msg.as_bytes()
        assert probe.trace_id.encode() not in raw  # only decoding can find it
        await send(mx, raw)
        assert await in_body.wait_seen(2)
        assert not in_subject.observations
        assert mx.health()["matched"] == 1

    run(main)


def test_quoted_printable_soft_line_break_inside_the_trace_id() -> None:
    async def main(mx: SmtpCollector) -> None:
        w = watch()
        mx.watch(w)
        msg = EmailMessage()
        msg["Subject"], msg["From"], msg["To"] = "Approval needed", "funnel@funnel.invalid", APPROVER
        # A long line: quoted-printable wraps it at 76 characters, cutting the id with "=\n".
        msg.set_content("é" + "a" * 60 + " trace " + w.trace_id + " end", cte="quoted-printable")
        raw = msg.as_bytes()
        assert b"=\n" in raw and w.trace_id.encode() not in raw
        await send(mx, raw)
        assert await w.wait_seen(2)
        assert w.first is not None and w.first.detail["where"] == "body"

    run(main)


def test_encoded_subject_and_custom_headers() -> None:
    async def main(mx: SmtpCollector) -> None:
        in_subject, in_header = watch(where=["subject"]), watch(where=["headers"])
        mx.watch(in_subject)
        mx.watch(in_header)
        subject = base64.b64encode(f"Approval ✅ {in_subject.trace_id}".encode()).decode()
        raw = (
            f"From: funnel@funnel.invalid\r\nTo: {APPROVER}\r\nSubject: =?utf-8?b?{subject}?=\r\n"
            f"X-Canary-Trace: {in_header.trace_id}\r\n\r\nnothing in the body\r\n"
        ).encode()
        await send(mx, raw)
        assert await in_subject.wait_seen(2) and await in_header.wait_seen(2)
        assert in_subject.first is not None and in_subject.first.detail["where"] == "subject"

    run(main)


def test_to_filter_and_size_limit() -> None:
    async def main(mx: SmtpCollector) -> None:
        w = watch(to=APPROVER)
        mx.watch(w)
        text = f"Subject: approval {w.trace_id}\r\n\r\nbody\r\n".encode()
        await send(mx, text, to="someone-else@funnel.invalid")
        assert not await w.wait_seen(0.2)
        big = text + b"x" * 20_000
        with pytest.raises(smtplib.SMTPException):
            await send(mx, big)
        assert not await w.wait_seen(0.2)
        await send(mx, text, to=APPROVER.upper())  # addresses compare case-insensitively
        assert await w.wait_seen(2)
        assert mx.health()["received"] == 2

    run(main, data_size_limit=10_000)


def test_heartbeat_certifies_and_a_closed_listener_turns_blind() -> None:
    async def main(mx: SmtpCollector) -> None:
        first = mx.coverage.certified
        await asyncio.sleep(0.3)
        assert mx.coverage.certified > first and mx.health()["up"]
        assert mx._server is not None
        mx._server.close()  # the listener goes away without the collector being closed
        for _ in range(50):
            if mx.coverage.blind_now:
                break
            await asyncio.sleep(0.05)
        assert mx.coverage.blind_now and not mx.health()["up"]

    run(main, heartbeat=0.1)


def test_data_over_the_size_limit_is_552_with_a_receipt_and_the_session_goes_on() -> None:
    """No SIZE= on MAIL, so the receiver's own DATA reader meets the limit: 552 after the
    dot, a receipt that names the limit, and the next mail of the same session is read."""

    async def main(mx: SmtpCollector) -> None:
        w = watch()
        mx.watch(w)

        def go() -> tuple[int, int]:
            assert mx.port is not None
            with smtplib.SMTP("127.0.0.1", mx.port, timeout=5) as smtp:
                smtp.ehlo()
                smtp.mail("funnel@funnel.invalid")
                smtp.rcpt(APPROVER)
                big = smtp.data(f"Subject: {w.trace_id}\r\n\r\n".encode() + b"0123456789\r\n" * 2000)
                smtp.mail("funnel@funnel.invalid")  # the envelope was reset: a new transaction
                smtp.rcpt(APPROVER)
                good = smtp.data(f"Subject: approval {w.trace_id}\r\n\r\nbody\r\n".encode())
            return big[0], good[0]

        assert await asyncio.to_thread(go) == (552, 250)
        assert await w.wait_seen(2)
        receipts, _ = mx.receipts.window(0, clock.now())
        assert [(r.where, r.rejected) for r in receipts] == [
            ((APPROVER,), "oversized: over data_size_limit"),
            ((APPROVER,), None),
        ]
        assert mx.health()["received"] == 1  # the refused mail never reached the handler

    run(main, data_size_limit=10_000)
