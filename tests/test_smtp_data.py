"""The receiver's own DATA reader (collectors/smtp_data.py) against aiosmtpd's, over real sockets.

The receiver replaces aiosmtpd's ``smtp_DATA`` (it stalled the loop on a hostile mail), so the
protocol must not change: the same byte streams go to a stock aiosmtpd server and to ours, and
the replies and the content handed to ``handle_DATA`` must be identical, however the client
splits its writes. The reader is also fed every split of small streams directly, in tiny
segments, since the segment boundaries are where it could go wrong.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from collectors import smtp_data
from collectors.smtp import SmtpCollector, SmtpConfig, _CappedSMTP

pytestmark = pytest.mark.timeout(60)

SMALL = 5000  # data_size_limit of the first pair of servers
MAIL = b"MAIL FROM:<a@funnel.invalid>\r\nRCPT TO:<b@funnel.invalid>\r\nDATA\r\n"

CASES: list[bytes] = [
    b".\r\n",  # empty mail
    b"\r\n.\r\n",
    b"..\r\n.\r\n",
    b"...\r\n.\r\n",
    b".a\r\n.b\r\n..\r\n.\r\n",
    b"a\rb\nc\r\r\n\n.\r\n\r.\r\nx\n.\r\n.\r\n",  # bare CR and LF never end a line
    b"abc.\r\n.\r\n",
    b"a\r\n\r\n\r\n.\r\n",
    b"caf\xc3\xa9 \xff\xfe\x00\r\n.\r\n",
    b"x" * 999 + b"\r\n.\r\n",  # 1001 bytes with CRLF: the longest line allowed
    b"x" * 1000 + b"\r\n.\r\n",  # one over: 500
    b"." + b"x" * 999 + b"\r\n.\r\n",  # the stuffed dot counts
    b"y" * 30_000 + b"\r\n.\r\n",
    (b"y" * 898 + b"\r\n") * 5 + b"z" * 498 + b"\r\n.\r\n",  # exactly SMALL bytes
    (b"y" * 898 + b"\r\n") * 5 + b"z" * 499 + b"\r\n.\r\n",  # one over: 552
    (b"y" * 900 + b"\r\n") * 6 + b"w" * 2000 + b"\r\n.\r\n",  # too much, then too long
    b"w" * 2000 + b"\r\n" + (b"y" * 900 + b"\r\n") * 6 + b".\r\n",  # too long, then too much
    (b"y" * 990 + b"\r\n") * 5 + b"w" * 1500 + b"\r\n.\r\n",  # both in one segment: too long first
    b"hello\r\n.\r\n" + MAIL + b"..second\r\n.\r\n",  # pipelined: the next mail follows the dot
    (b"y" * 900 + b"\r\n") * 6 + b".\r\n" + MAIL + b"after a 552\r\n.\r\n",
    b"w" * 2000 + b"\r\n.\r\n" + MAIL + b"after a 500\r\n.\r\n",
    b"caf\xc3\xa9\r\n.\r\nMAIL FROM:<\xc3\xbc@funnel.invalid> SMTPUTF8 BODY=8BITMIME\r\n"
    b"RCPT TO:<b@funnel.invalid>\r\nDATA\r\n\xc3\xbc\xff\r\n.\r\n",  # 8-bit, after SMTPUTF8
]


class Capture:
    def __init__(self) -> None:
        self.contents: list[bytes | None] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.contents.append(envelope.original_content)
        return "250 OK"


def big_stream(seed: int) -> bytes:
    """~300 KB of lines of every length up to the limit, a third of them dot-stuffed."""
    rnd = random.Random(seed)
    lines = []
    for _ in range(900):
        text = bytes(rnd.choice(b"ab.\r\n-") for _ in range(rnd.randrange(0, 990)))
        while b"\r\n" in text:
            text = text.replace(b"\r\n", b"\n")
        if rnd.random() < 0.35 or text.startswith(b"."):
            text = b"." + text
        lines.append(text[:998] if text != b"." else b"..")  # a lone dot would end the mail early
    return b"\r\n".join(lines) + b"\r\n.\r\n"


async def transcript(port: int, stream: bytes, sizes: random.Random | None) -> bytes:
    """Every reply after ``354`` to ``stream`` (sent in pieces of random size when ``sizes``)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await r.readline()
    w.write(b"EHLO c\r\n")
    while not (await r.readline()).startswith(b"250 "):
        pass
    w.write(MAIL)
    for _ in range(3):
        await r.readline()  # 250, 250, 354
    i = 0
    while i < len(stream):
        n = len(stream) if sizes is None else sizes.choice((1, 2, 3, 5, 700, 1003, 4096, 70_000))
        w.write(stream[i : i + n])
        await w.drain()
        await asyncio.sleep(0)
        i += n
    w.write(b"QUIT\r\n")
    out = await asyncio.wait_for(r.read(), 20)
    w.close()
    return out


def run_pair(main: Any) -> None:
    """A stock aiosmtpd server and the receiver's, each with both data_size_limits."""

    async def go() -> None:
        loop = asyncio.get_running_loop()
        mx = SmtpCollector(SmtpConfig(allow_unauthenticated=True))  # bookkeeping only, never started
        ours = type("_Ours", (_CappedSMTP,), {"collector": mx})
        servers, ports, captures = [], {}, {}
        for name, cls in (("stock", SMTP), ("ours", ours)):
            for limit in (SMALL, 1_000_000):
                cap = Capture()

                def factory(cls: Any = cls, cap: Capture = cap, limit: int = limit) -> SMTP:
                    return cls(cap, data_size_limit=limit, enable_SMTPUTF8=True, hostname="h", loop=loop)

                server = await loop.create_server(factory, "127.0.0.1", 0)
                servers.append(server)
                ports[name, limit] = server.sockets[0].getsockname()[1]
                captures[name, limit] = cap
        try:
            await main(ports, captures)
        finally:
            for s in servers:
                s.close()
                await s.wait_closed()

    asyncio.run(go())


def test_same_replies_and_content_as_aiosmtpd_however_the_client_splits() -> None:
    async def main(ports: dict[Any, int], captures: dict[Any, Capture]) -> None:
        streams = [(c, SMALL) for c in CASES] + [(big_stream(s), 1_000_000) for s in range(3)]
        for n, (stream, limit) in enumerate(streams):
            for split in (None, random.Random(n)):
                seen = {}
                for name in ("stock", "ours"):
                    sizes = None if split is None else random.Random(n)
                    before = len(captures[name, limit].contents)
                    replies = await transcript(ports[name, limit], stream, sizes)
                    seen[name] = (replies, captures[name, limit].contents[before:])
                assert seen["ours"] == seen["stock"], (n, stream[:60], seen["stock"][0])
                assert seen["ours"][0].startswith((b"250 ", b"500 ", b"552 ")), seen["ours"][0]
        # The cases cover every outcome, not only acceptance.
        replies = b"".join([(await transcript(ports["ours", SMALL], c, None)) for c in CASES])
        assert b"500 Line too long" in replies and b"552 Error: Too much mail data" in replies

    run_pair(main)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_every_split_and_segment_size_gives_the_same_body(case: int) -> None:
    """Fed straight into a StreamReader split at every byte (long streams: at 40 places), in
    segments down to one byte: the same content and state, and whatever follows the dot is left
    in the reader for the next command."""
    stream = CASES[case]

    async def read(parts: list[bytes], chunk: int) -> tuple[smtp_data.State, bytes, bytes]:
        reader = asyncio.StreamReader(limit=1001)  # aiosmtpd's line_length_limit
        body = smtp_data.Body(SMALL, 1001)
        task = asyncio.create_task(smtp_data.read_body(reader, body, lambda: True, chunk=chunk))
        for p in parts:
            reader.feed_data(p)
            for _ in range(50):
                await asyncio.sleep(0)
        reader.feed_eof()
        assert await asyncio.wait_for(task, 5)
        content = body.content() if body.state is smtp_data.State.NOMINAL else b""
        return body.state, content, await reader.read()

    async def main() -> None:
        whole = await read([stream], smtp_data.CHUNK)
        step = 1 if len(stream) < 1100 else len(stream) // 40
        chunks = (1, 3, 1024, smtp_data.CHUNK) if len(stream) < 3000 else (1024, smtp_data.CHUNK)
        for chunk in chunks:
            for i in range(0, len(stream) + 1, step):
                assert await read([stream[:i], stream[i:]], chunk) == whole, (chunk, i)
        rest = b"" if stream == b".\r\n" else stream[stream.index(b"\r\n.\r\n") + 5 :]
        assert whole[2] == rest

    asyncio.run(main())


@pytest.mark.parametrize("case", range(len(CASES)))
def test_body_is_the_same_whatever_the_segments(case: int) -> None:
    """``Body`` fed the mail (up to the dot) whole, split at every byte, and byte by byte: the
    same state and content. Segments ending in CR, CRLF or CRLF-dot are where it could slip."""
    stream = CASES[case]
    end = 0 if stream.startswith(b".\r\n") else stream.index(b"\r\n.\r\n") + 2
    data = stream[:end]

    def body(parts: list[bytes]) -> tuple[smtp_data.State, bytes]:
        b = smtp_data.Body(SMALL, 1001)
        for p in parts:
            b.feed(p)
        b.finish()
        return b.state, b.content() if b.state is smtp_data.State.NOMINAL else b""

    whole = body([data])
    for i in range(len(data) + 1):
        assert body([data[:i], data[i:]]) == whole, i
    assert body([data[i : i + 1] for i in range(len(data))]) == whole


def test_a_client_hanging_up_mid_data_leaves_no_error_and_the_receiver_serves_on() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        mx = SmtpCollector(SmtpConfig(allow_unauthenticated=True))
        await mx.start()
        assert mx.port is not None
        try:
            for cut in (b"", b"abc", b"abc\r\n" * 50_000, b"abc\r\n.", b"x" * 5000):
                r, w = await asyncio.open_connection("127.0.0.1", mx.port)
                await r.readline()
                w.write(b"HELO c\r\n" + MAIL)
                for _ in range(4):
                    await r.readline()
                w.write(cut)
                await w.drain()
                w.close()
            for _ in range(100):  # the receiver notices each hang-up
                if not mx._sessions:
                    break
                await asyncio.sleep(0.02)
            assert not mx._sessions and mx.health()["received"] == 0
            stream = b"hi\r\n.\r\nQUIT\r\n"
            r, w = await asyncio.open_connection("127.0.0.1", mx.port)
            await r.readline()
            w.write(b"HELO c\r\n" + MAIL + stream)
            replies = await asyncio.wait_for(r.read(), 5)
            assert replies.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n250 OK\r\n221 Bye\r\n")
            assert mx.health()["received"] == 1
        finally:
            await mx.close()
        assert errors == []

    asyncio.run(main())
