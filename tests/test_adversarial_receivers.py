"""Adversarial re-run (issue 10) against the push receivers and channel pollers, over real sockets.

Each test is one attack: a forged sighting, a hostile HTTP peer, a half-broken API answer, a
hostile mail. The promise under attack: never a forged ``ok``, never a false ``late``/``lost``
(what the tracer could not look at is ``unknown``), never a silent task death or a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import hmac
import imaplib
import json
import os
import re
import resource
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from collectors.http_json import HttpJsonCollector, HttpJsonConfig
from collectors.imap import ImapCollector, ImapConfig
from collectors.response import ResponseCollector, ResponseConfig
from collectors.slack import SlackCollector, SlackConfig
from collectors.smtp import SmtpCollector, SmtpConfig
from collectors.webhook import WebhookCollector, WebhookConfig, timestamped_signature
from tests import dovecot
from tracer import clock
from tracer.evidence import Evidence
from tracer.inject.http import HttpRequest
from tracer.inject.http import exchange as inject_http
from tracer.probe import Probe, new_trace_id
from tracer.spec import HopSpec
from tracer.verdict import LOST, UNKNOWN, judge_present
from tracer.watch import Coverage, Watch

pytestmark = pytest.mark.timeout(30)

SECRET = "adv-secret-path"
KEY = "adv-hmac-key"


# -- helpers ---------------------------------------------------------------------------------


def hook_watch(path: str, json_path: str | None = None) -> Watch:
    hop: dict[str, Any] = {"path": path}
    if json_path is not None:
        hop["json_path"] = json_path
    return Watch(
        probe=Probe(step="approval"),
        hop=HopSpec(name=path.replace("/", "_"), target=300, webhook=hop),
        since=clock.now(),
    )


def run_hook(main: Callable[[WebhookCollector], Awaitable[None]], **config: Any) -> WebhookCollector:
    cfg = {"secret_path": SECRET, **config}
    hook = WebhookCollector(WebhookConfig(**cfg))

    async def go() -> None:
        await hook.start()
        try:
            await main(hook)
        finally:
            await hook.close()

    asyncio.run(go())
    return hook


async def exchange(port: int, data: bytes, wait: float = 1.0) -> bytes:
    """Send raw bytes on a fresh connection; return everything the server answers until it
    closes or goes quiet for ``wait`` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout=wait)
            if not chunk:
                break
            out += chunk
    except (asyncio.TimeoutError, ConnectionError):
        pass
    writer.close()
    return out


def statuses(answer: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]


def post(path: str, body: bytes, headers: dict[str, str] | None = None, version: str = "1.1") -> bytes:
    """One raw POST; ``Connection: close`` unless ``headers`` say otherwise (so ``exchange``
    returns as soon as the answer is complete)."""
    head = f"POST /{SECRET}/{path} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    headers = {"Connection": "close", **(headers or {})}
    for k, v in headers.items():
        head += f"{k}: {v}\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def sig(body: bytes, key: str = KEY) -> str:
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


class Hostile:
    """A tiny HTTP/1.1 server on loopback: every request gets ``answer(request_head)``, either
    the bytes of a whole response or an async callable that writes to the stream itself (a slow
    drip). One request per connection."""

    def __init__(self, answer: Callable[[bytes], Any]) -> None:
        self.answer = answer
        self.requests = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Hostile:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            out = self.answer(head)
            if callable(out):
                await out(writer)
            else:
                writer.write(out)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def http_answer(body: bytes | str, status: int = 200, headers: dict[str, str] | None = None) -> bytes:
    raw = body.encode() if isinstance(body, str) else body
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    return (head + "Connection: close\r\n\r\n").encode() + raw


def drip(body: bytes, every: float) -> Callable[[asyncio.StreamWriter], Awaitable[None]]:
    """Headers at once, then the body one byte per ``every`` seconds."""

    async def go(writer: asyncio.StreamWriter) -> None:
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        for i in range(len(body)):
            writer.write(body[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every)

    return go


# -- webhook: forged sightings ---------------------------------------------------------------


def test_json_path_is_not_satisfied_by_a_longer_hex_string_holding_the_trace_id() -> None:
    """The trace id sits in an unrelated field; the json_path field holds a longer hex run that
    merely contains it (a hash, a signature). That is not a sighting in json_path."""
    w = hook_watch("approvals", json_path="text")

    async def main(hook: WebhookCollector) -> None:
        hook.watch(w)
        body = json.dumps({"text": f"digest ff{w.trace_id}ff", "meta": w.trace_id}).encode()
        assert statuses(await exchange(hook.port, post("approvals", body))) == [200]
        assert w.first is None

    run_hook(main)


def test_trace_id_only_in_a_header_or_the_url_is_no_sighting() -> None:
    w = hook_watch("approvals")

    async def main(hook: WebhookCollector) -> None:
        hook.watch(w)
        body = b'{"text": "approval requested"}'
        data = post(
            f"approvals?trace={w.trace_id}", body, {"traceparent": f"00-{w.trace_id}-00f067aa0ba902b7-01"}
        )
        assert statuses(await exchange(hook.port, data)) == [200]
        assert w.first is None and hook.counters["accepted"] == 1

    run_hook(main)


def test_homoglyph_trace_ids_are_not_sightings() -> None:
    """Fullwidth or Cyrillic look-alikes of the hex digits never match the ASCII trace id."""
    w = hook_watch("approvals")
    tid = w.trace_id
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in tid)
    cyrillic = tid.replace("a", "\u0430").replace("e", "\u0435").replace("c", "\u0441")
    arabic_digits = "".join(chr(0x0660 + int(c)) if c.isdigit() else c for c in tid)

    async def main(hook: WebhookCollector) -> None:
        hook.watch(w)
        for fake in (fullwidth, cyrillic, arabic_digits):
            if fake == tid:
                continue
            body = json.dumps({"text": fake}, ensure_ascii=False).encode()
            assert statuses(await exchange(hook.port, post("approvals", body))) == [200]
        assert w.first is None

    run_hook(main)


def test_hmac_forgeries_are_refused() -> None:
    """A signature over another body, a second header with a good signature after a bad one,
    an uppercase hex signature of a different body, an empty header, and a timestamped header
    sent to a body-scheme receiver: none may produce a sighting."""
    w = hook_watch("approvals")

    async def main(hook: WebhookCollector) -> None:
        hook.watch(w)
        body = json.dumps({"text": w.trace_id}).encode()
        other = b'{"text": "nothing"}'
        attempts = [
            {"X-Signature": sig(other)},
            {"X-Signature": sig(body, key="wrong")},
            {"X-Signature": sig(other).upper()},
            {"X-Signature": ""},
            {"X-Signature": timestamped_signature(KEY, body)},
            {"X-Signature": "sha256="},
        ]
        for headers in attempts:
            assert statuses(await exchange(hook.port, post("approvals", body, headers))) == [401]
        # Duplicated header: the good one second. h11 keeps both; we verify one. Either way
        # no sighting may come from a request whose *first* signature is wrong unless the
        # right one is present: the right one is, so accepting is fine, refusing is fine too.
        dup = post("approvals", other, {"X-Signature": sig(b"x")}).replace(
            b"\r\n\r\n", f"\r\nX-Signature: {sig(other)}\r\n\r\n".encode(), 1
        )
        assert statuses(await exchange(hook.port, dup)) in ([200], [401])
        assert w.first is None
        assert hook.rejected["unauthenticated"] == len(attempts) + (hook.counters["accepted"] == 0)

    run_hook(main, hmac_secret=KEY)


def test_timestamped_replay_and_odd_timestamps_are_refused_without_a_500() -> None:
    w = hook_watch("approvals")

    async def main(hook: WebhookCollector) -> None:
        hook.watch(w)
        body = json.dumps({"text": w.trace_id}).encode()
        old = timestamped_signature(KEY, body, at=time.time() - 3600)
        future = timestamped_signature(KEY, body, at=time.time() + 3600)
        # A latin-1 superscript two (byte 0xb2): str.isdigit() says yes, int() says no. Signed
        # by the key holder over what the receiver would hash, so only the parse can refuse it.
        mac = hmac.new(KEY.encode(), "\u00b2".encode() + b"." + body, hashlib.sha256).hexdigest()
        odd = post("approvals", body, {"X-Signature": f"t=@,v1={mac}"}).replace(b"t=@", b"t=\xb2")
        for header in (old, future, "t=,v1=", "v1=abc", "t=1", f"t={int(time.time())}"):
            data = post("approvals", body, {"X-Signature": header})
            assert statuses(await exchange(hook.port, data)) == [401], header
        assert statuses(await exchange(hook.port, odd)) == [401]
        assert w.first is None and hook.counters["handler_errors"] == 0

    run_hook(main, hmac_secret=KEY, hmac_scheme="timestamped")


def test_uppercase_trace_id_is_the_same_probe() -> None:
    """A funnel that upper-cases the id still delivered it: a sighting, not a forgery (hex case
    carries no meaning)."""
    w = hook_watch("approvals")

    async def main(hook: WebhookCollector) -> None:
        hook.watch(w)
        body = json.dumps({"text": w.trace_id.upper()}).encode()
        assert statuses(await exchange(hook.port, post("approvals", body))) == [200]
        assert w.first is not None

    run_hook(main)


UNREADABLE = {
    "oversized": (lambda tid: json.dumps({"text": tid, "pad": "x" * 4000}).encode(), {}),
    "gzip": (lambda tid: gzip.compress(json.dumps({"text": tid}).encode()), {"Content-Encoding": "gzip"}),
    "latin-1-json": (
        lambda tid: json.dumps({"text": f"caf\u00e9 {tid}"}, ensure_ascii=False).encode("latin-1"),
        {},
    ),
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_a_delivery_we_could_not_read_makes_hops_unknown_not_lost(kind: str) -> None:
    """An authenticated delivery over max_body (a notification with a big payload), gzip-encoded
    or not UTF-8: we refused to read it, so it may have been the probe's: ``unknown``, never
    ``lost``."""
    body, headers = UNREADABLE[kind]
    w = hook_watch("approvals")

    async def main(hook: WebhookCollector) -> None:
        start = clock.now()
        hook.watch(w)
        answer = await exchange(hook.port, post("approvals", body(w.trace_id), headers))
        assert statuses(answer)[0] in (400, 413), answer[:100]
        certified = await hook.coverage.wait_certified(clock.now(), 3)
        v, reason = judge_present(None, start, 300, clock.now() - start, hook.coverage, certified)
        assert v == UNKNOWN, (v, reason)

    run_hook(main, max_body=2000)


CLIENT = """
import socket, sys, time
time.sleep(float(sys.argv[3]))
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
body = sys.argv[2].encode()
s.sendall(b"POST /%s/approvals HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\n"
          b"Connection: close\\r\\nContent-Length: %d\\r\\n\\r\\n" % (sys.argv[4].encode(), len(body)) + body)
try:
    print(s.recv(100)[:12])
except OSError as exc:
    print(type(exc).__name__)
"""


async def starve_file_descriptors(seconds: float) -> None:
    """The process at its file-descriptor limit for ``seconds``: whatever descriptor frees up is
    taken at once, as under a real leak; everything is given back after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hog: list[Any] = []

    async def grab() -> None:
        while True:
            with contextlib.suppress(OSError):
                while True:
                    hog.append(open(os.devnull))  # noqa: SIM115, ASYNC230
            await asyncio.sleep(0.002)

    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
    grabber = asyncio.create_task(grab())
    try:
        await asyncio.sleep(seconds)
    finally:
        grabber.cancel()
        await asyncio.gather(grabber, return_exceptions=True)
        for f in hog:
            f.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_out_of_file_descriptors_the_receiver_is_blind_not_late() -> None:
    """The process hits its file-descriptor limit (a leak elsewhere, a flood on another port):
    asyncio stops accepting, the funnel's delivery waits in the kernel's backlog and is read
    seconds later. The heartbeat must not certify that window: the late-looking sighting is
    ``unknown``, never a false ``late``."""
    w = hook_watch("approvals")

    async def main(hook: WebhookCollector) -> None:
        start = clock.now()
        hook.watch(w)
        body = json.dumps({"text": w.trace_id})
        # Started before the limit bites (it needs pipes); it posts 1.5 s later, mid-starvation.
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(hook.port), body, "1.5", SECRET, stdout=asyncio.subprocess.PIPE
        )
        await starve_file_descriptors(4.0)
        await asyncio.wait_for(client.communicate(), 10)
        assert await w.wait_seen(5), hook.health()  # read once descriptors are back
        certified = await hook.coverage.wait_certified(clock.now(), 3)
        v, reason = judge_present(w.first, start, 3.0, 30, hook.coverage, certified)
        assert v == UNKNOWN, (v, reason, w.first.at - start if w.first else None)

    run_hook(main)


def test_a_text_body_is_read_in_its_declared_charset() -> None:
    w = hook_watch("approvals")

    async def main(hook: WebhookCollector) -> None:
        hook.watch(w)
        text = f"caf\u00e9 approval {w.trace_id}".encode("latin-1")
        data = post("approvals", text).replace(b"application/json", b"text/plain; charset=ISO-8859-1")
        assert statuses(await exchange(hook.port, data)) == [200]
        assert w.first is not None

    run_hook(main)


# -- webhook: hostile HTTP -------------------------------------------------------------------


def test_request_smuggling_never_yields_a_sighting() -> None:
    """Content-Length + Transfer-Encoding and two different Content-Lengths: the hidden second
    request (carrying the trace id) must never be read as a delivery."""
    w = hook_watch("approvals")

    async def main(hook: WebhookCollector) -> None:
        hook.watch(w)
        hidden = post("approvals", json.dumps({"text": w.trace_id}).encode())
        outer = b'{"a": 1}'
        cl_te = (
            (
                f"POST /{SECRET}/approvals HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(outer)}\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
            + b"0\r\n\r\n"
            + hidden
        )
        two_cl = (
            (
                f"POST /{SECRET}/approvals HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(outer)}\r\nContent-Length: {len(outer) + len(hidden)}\r\n\r\n"
            ).encode()
            + outer
            + hidden
        )
        te_obfuscated = (
            (
                f"POST /{SECRET}/approvals HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(outer) + len(hidden)}\r\nTransfer-Encoding: xchunked\r\n\r\n"
            ).encode()
            + outer
            + hidden
        )
        for data in (cl_te, two_cl, te_obfuscated):
            answer = await exchange(hook.port, data)
            assert all(s >= 400 for s in statuses(answer)) or statuses(answer) == [], answer[:200]
            assert w.first is None
        # The receiver still serves a real delivery afterwards.
        good = hook_watch("approvals")
        hook.watch(good)
        body = json.dumps({"text": good.trace_id}).encode()
        assert statuses(await exchange(hook.port, post("approvals", body))) == [200]
        assert good.first is not None

    run_hook(main)


def test_pipelined_http10_and_chunked_requests_are_each_seen() -> None:
    a, b, c = hook_watch("approvals"), hook_watch("approvals"), hook_watch("approvals")

    async def main(hook: WebhookCollector) -> None:
        for w in (a, b, c):
            hook.watch(w)
        pipelined = post(
            "approvals", json.dumps({"t": a.trace_id}).encode(), {"Connection": "keep-alive"}
        ) + post("approvals", json.dumps({"t": b.trace_id}).encode(), {"Connection": "close"})
        assert statuses(await exchange(hook.port, pipelined)) == [200, 200]
        body = json.dumps({"t": c.trace_id}).encode()
        chunked = (
            (
                f"POST /{SECRET}/approvals HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                f"{len(body[:10]):x}\r\n"
            ).encode()
            + body[:10]
            + f"\r\n{len(body[10:]):x}\r\n".encode()
            + body[10:]
            + b"\r\n0\r\n\r\n"
        )
        answer = await exchange(hook.port, chunked)
        # HTTP/1.0 has no chunked coding: refusing is fine, a sighting is fine too; no 500.
        assert statuses(answer) in ([200], [400]), answer[:200]
        assert a.first is not None and b.first is not None
        assert hook.counters["handler_errors"] == 0

    run_hook(main)


def test_huge_chunk_size_absurd_headers_and_bad_bodies_are_4xx_and_the_server_lives() -> None:
    async def main(hook: WebhookCollector) -> None:
        huge_chunk = (
            f"POST /{SECRET}/approvals HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            "ffffffffffffffffffff\r\n"
        ).encode() + b"a" * 300_000
        many_headers = post("approvals", b"{}", {f"X-H{i}": "v" for i in range(5000)})
        big_header = post("approvals", b"{}", {"X-Big": "v" * 200_000})
        deep = b"[" * 100_000 + b"]" * 100_000
        bad_utf8 = b'{"text": "\xff\xfe"}'
        huge_int = b'{"n": ' + b"9" * 5000 + b"}"
        for data in (huge_chunk, big_header):
            answer = await exchange(hook.port, data)
            assert all(400 <= s < 500 for s in statuses(answer)), answer[:200]
        # 5,000 tiny headers fit h11's limits: an ordinary (empty) delivery, no harm done.
        assert statuses(await exchange(hook.port, many_headers)) == [200]
        for body in (bad_utf8, huge_int, b"[" * 50_000, b"null", b"1e999"):
            answer = await exchange(hook.port, post("approvals", body))
            assert statuses(answer) == [400], (body[:20], answer[:200])
        answer = await exchange(hook.port, post("approvals", deep), wait=5)
        assert statuses(answer) in ([400], [413]), answer[:200]
        assert hook.counters["handler_errors"] == 0
        w = hook_watch("approvals")
        hook.watch(w)
        body = json.dumps({"text": w.trace_id}).encode()
        assert statuses(await exchange(hook.port, post("approvals", body))) == [200]
        assert w.first is not None and hook.up

    run_hook(main, max_body=256 * 1024)


def test_a_form_body_with_a_non_object_payload_is_400() -> None:
    async def main(hook: WebhookCollector) -> None:
        for form in (b"payload=1", b"payload=%5B%5B%5B", b"payload=" + b"%5B" * 20000, b"a&&b"):
            head = (
                f"POST /{SECRET}/approvals HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\nContent-Length: {len(form)}\r\n\r\n"
            ).encode()
            assert statuses(await exchange(hook.port, head + form)) == [400], form[:30]
        assert hook.counters["handler_errors"] == 0

    run_hook(main)


def test_non_post_and_secretless_paths_do_not_certify_anything_false() -> None:
    """GET / HEAD / OPTIONS hammering: answered, counted, never a sighting, never a 500."""
    w = hook_watch("approvals")

    async def main(hook: WebhookCollector) -> None:
        hook.watch(w)
        for method in ("GET", "HEAD", "OPTIONS", "DELETE", "PUT"):
            for path in (f"/{SECRET}/approvals?{w.trace_id}", "/healthz", "/metrics", f"/{w.trace_id}"):
                data = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                answer = await exchange(hook.port, data)
                assert statuses(answer) and all(400 <= s < 500 for s in statuses(answer)), (method, path)
        assert w.first is None and hook.counters["handler_errors"] == 0

    run_hook(main)


# -- Slack conversations.history: half answers, hostile messages ------------------------------

CHANNEL = "C0ADV"


def slack_watch(**hop: Any) -> Watch:
    return Watch(
        probe=Probe(step="approval"), hop=HopSpec(name="slack", target=0.5, slack=hop), since=clock.now()
    )


def slack_config(url: str, **over: Any) -> SlackConfig:
    base: dict[str, Any] = {
        "token": "xoxb-adversarial",
        "channels": [CHANNEL],
        "api_url": url,
        "min_interval": "100ms",
        "requests_per_minute": 6000,
        "budget_share": 1,
        "timeout": "1s",
        "max_backoff": "500ms",
    }
    base.update(over)
    return SlackConfig(**base)


async def certifies(coverage: Coverage, within: float = 1.5) -> bool:
    """Does a look cover the present moment within ``within`` seconds?"""
    return await coverage.wait_certified(clock.now(), within)


def history(messages: list[Any], **extra: Any) -> bytes:
    return http_answer(json.dumps({"ok": True, "messages": messages, **extra}))


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(json.dumps({"ok": True}), id="no-messages-key"),
        pytest.param(json.dumps({"ok": True, "messages": None}), id="messages-null"),
        pytest.param(json.dumps({"ok": True, "messages": {}}), id="messages-object"),
        pytest.param(json.dumps({"ok": True, "messages": [], "has_more": True}), id="has-more-no-cursor"),
        pytest.param(
            json.dumps({"ok": True, "messages": [], "has_more": True, "response_metadata": []}),
            id="metadata-a-list",
        ),
        pytest.param(json.dumps({"ok": "yes", "messages": []}), id="ok-not-true"),
        pytest.param("[" * 100_000 + "]" * 100_000, id="deep-nesting"),
        pytest.param('{"ok": true, "messages": [', id="truncated"),
    ],
)
def test_slack_half_answers_never_certify_and_the_poller_lives(answer: str) -> None:
    """A 200 that is not a complete history page is no evidence: the probe posted meanwhile must
    end ``unknown``, never ``lost``; and no internal error (a crash loop is a blind poller too)."""

    async def main() -> None:
        async with Hostile(lambda _head: http_answer(answer)) as api:
            col = SlackCollector(slack_config(api.url))
            await col.start()
            try:
                w = slack_watch()
                start = clock.now()
                col.watch(w)
                certified = await col.coverage.wait_certified(start + 0.5, 2.0)
                v, reason = judge_present(w.first, start, 0.5, 0.5, col.coverage, certified)
                assert v == UNKNOWN, (v, reason, col.health())
                assert api.requests >= 2 and col.health()["internal_errors"] == 0
                assert not col.health()["up"] and col.health()["last_error"]
            finally:
                await col.close()

    asyncio.run(main())


def test_slack_bad_ts_future_ts_and_odd_messages_are_skipped_not_fatal() -> None:
    """ts missing, a number, "abc", "nan", a list; a ts a day in the future; non-dict messages:
    skipped or matched, never an internal error, and the real message is still seen."""
    w = slack_watch()
    future = slack_watch()
    msgs = [
        {"text": "no ts"},
        {"ts": 12.5, "text": "numeric ts"},
        {"ts": "abc", "text": "x"},
        {"ts": "nan", "text": "x"},
        {"ts": ["1"], "text": "x"},
        "a string",
        None,
        {"ts": f"{time.time() + 86400:.6f}", "text": f"from tomorrow {future.trace_id}"},
        {"ts": f"{time.time():.6f}", "text": f"approval {w.trace_id}", "blocks": {"not": "a list"}},
    ]

    async def main() -> None:
        async with Hostile(lambda _head: history(msgs)) as api:
            col = SlackCollector(slack_config(api.url))
            await col.start()
            try:
                col.watch(w)
                col.watch(future)
                col.watch(slack_watch())  # never posted: keeps the poller looking
                assert await w.wait_seen(3), col.health()
                assert await future.wait_seen(1)  # its ts is Slack's word, not ours: seen now
                await asyncio.sleep(0.5)  # a few more cycles over the same page
                assert col.health()["internal_errors"] == 0 and await certifies(col.coverage)
                assert col.malformed_messages >= 5
            finally:
                await col.close()

    asyncio.run(main())


def test_slack_slow_drip_answer_is_blind_within_the_timeout() -> None:
    """A server that drips one byte every 200 ms never trips httpx's per-read timeout: the poll
    must still end at ``timeout`` and the collector say it is blind."""
    body = json.dumps({"ok": True, "messages": []}).encode()

    async def main() -> None:
        async with Hostile(lambda _head: drip(body, 0.2)) as api:
            col = SlackCollector(slack_config(api.url, timeout="1s"))
            await col.start()
            try:
                w = slack_watch()
                col.watch(w)
                await asyncio.sleep(3.0)
                assert col.coverage.blind_now and not col.health()["up"], col.health()
                assert "1s" in (col.health()["last_error"] or "")
            finally:
                await col.close()

    asyncio.run(main())


# -- JSON API poller: hostile answers, typos vs outages -----------------------------------------


def json_watch() -> Watch:
    return Watch(
        probe=Probe(step="lead"), hop=HopSpec(name="crm", target=0.5, http_json={}), since=clock.now()
    )


def json_config(url: str, **over: Any) -> HttpJsonConfig:
    base: dict[str, Any] = {
        "request": {"url": url + "/contacts", "query": {"ids": "{trace_ids}"}},
        "items": "results",
        "min_interval": "100ms",
        "requests_per_minute": 6000,
        "budget_share": 1,
        "timeout": "1s",
        "max_backoff": "500ms",
    }
    base.update(over)
    return HttpJsonConfig(**base)


async def run_json(
    answer: Callable[[bytes], Any], wait: float = 2.0, **over: Any
) -> tuple[HttpJsonCollector, Watch, str]:
    """Poll ``answer`` with one probe in flight; returns the collector, the watch and its verdict."""
    async with Hostile(answer) as api:
        col = HttpJsonCollector(json_config(api.url, **over))
        await col.start()
        try:
            w = json_watch()
            start = clock.now()
            col.watch(w)
            certified = await col.coverage.wait_certified(start + 0.5, wait)
            v, _ = judge_present(w.first, start, 0.5, 0.5, col.coverage, certified)
            assert col.health()["internal_errors"] == 0, col.health()
            assert api.requests >= 1
            return col, w, v
        finally:
            await col.close()


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(http_answer("<html>maintenance</html>"), id="not-json"),
        pytest.param(http_answer("[" * 100_000 + "]" * 100_000), id="deep-nesting"),
        pytest.param(http_answer(json.dumps({"results": ["x" * 100] * 100})), id="over-max-bytes"),
        pytest.param(lambda: drip(json.dumps({"results": []}).encode(), 0.2), id="slow-drip"),
        pytest.param(http_answer("", 302, {"Location": "/contacts"}), id="redirect-loop"),
        pytest.param(http_answer('{"error": "token expired"}', 401), id="401"),
        pytest.param(http_answer(json.dumps({"data": []})), id="items-select-nothing"),
        pytest.param(http_answer(json.dumps({"results": "a string"})), id="items-not-a-list"),
    ],
)
def test_json_api_answers_that_are_no_evidence_give_unknown(answer: Any) -> None:
    def respond(_head: bytes) -> Any:
        return answer() if callable(answer) else answer

    async def main() -> None:
        col, w, verdict = await run_json(respond, max_bytes=5000)
        assert verdict == UNKNOWN, (verdict, col.health())
        assert col.health()["last_error"] and not col.health()["up"]

    asyncio.run(main())


def test_json_api_empty_list_vs_match_path_typo_read_differently_in_evidence() -> None:
    """Both are ``lost`` (the API looked and the probe is not there), but the evidence must tell
    "the API returned nothing" from "match.path selects nothing in what it returned"."""

    async def main() -> None:
        col, w, verdict = await run_json(lambda _h: http_answer(json.dumps({"results": []})))
        assert verdict == LOST
        empty = await col.explain(w, w.since, clock.now(), Evidence(searched={}))
        assert "empty list" in (empty.summary or "") and empty.near_misses == 0

        records = {"results": [{"id": i, "props": {"trace": new_trace_id()}} for i in range(5)]}
        col, w, verdict = await run_json(
            lambda _h: http_answer(json.dumps(records)), match={"path": "properties.trace"}
        )
        assert verdict == LOST
        typo = await col.explain(w, w.since, clock.now(), Evidence(searched={}))
        assert "match.path" in (typo.hint or "") and typo.near_misses == 5, typo

    asyncio.run(main())


def test_json_api_timestamps_in_any_unit_give_a_sane_sink_time() -> None:
    now = time.time()
    values = {
        "s": int(now),
        "ms": int(now * 1e3),
        "us": int(now * 1e6),
        "ns": int(now * 1e9),
        "s-string": f"{now:.3f}",
        "iso": clock.iso(now),
        "inf": "inf",
        "huge": 10**30,
        "nan": "nan",
        "negative": -5,
        "garbage": "yesterday",
    }
    watches = {k: json_watch() for k in values}

    def respond(_head: bytes) -> bytes:
        items = [{"trace": watches[k].trace_id, "at": v} for k, v in values.items()]
        return http_answer(json.dumps({"results": items}))

    async def main() -> None:
        async with Hostile(respond) as api:
            col = HttpJsonCollector(json_config(api.url, timestamp="at"))
            await col.start()
            try:
                for w in watches.values():
                    col.watch(w)
                for k, w in watches.items():
                    assert await w.wait_seen(3), k
                    t = w.first.sink_time if w.first else None
                    if k in ("inf", "huge", "nan", "negative", "garbage"):
                        assert t is None, (k, t)
                    else:
                        assert t is not None and abs(t - now) < 5, (k, t)
            finally:
                await col.close()

    asyncio.run(main())


# -- IMAP: hostile mail on a real Dovecot, a hostile IMAP server ------------------------------


@pytest.fixture(scope="module")
def dove() -> Any:
    if not dovecot.available():
        pytest.skip(dovecot.HOW_TO_GET)
    d = dovecot.Dovecot().start()
    yield d
    d.close()


def imap_config(d: Any, **over: Any) -> ImapConfig:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": d.imaps_port,
        "tls": "imaps",
        "ca_file": d.cert,
        "username": "bob",
        "password": "bob-secret",
        "idle_refresh": "1s",
        "poll_interval": "300ms",
        "max_backoff": "300ms",
    }
    base.update(over)
    return ImapConfig(**base)


def imap_watch(target: float = 300) -> Watch:
    return Watch(
        probe=Probe(step="approval"), hop=HopSpec(name="email", target=target, imap={}), since=clock.now()
    )


def run_imap(main: Callable[[ImapCollector], Awaitable[None]], cfg: ImapConfig) -> ImapCollector:
    col = ImapCollector(cfg)

    async def go() -> None:
        await col.start()
        try:
            await main(col)
        finally:
            await col.close()

    asyncio.run(go())
    return col


def mail(subject: str, body: str, extra: str = "") -> bytes:
    return (
        f"From: funnel@funnel.invalid\r\nTo: bob@funnel.invalid\r\nSubject: {subject}\r\n"
        f"Message-ID: <{new_trace_id()}@funnel.invalid>\r\n{extra}"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


async def judged_now(col: ImapCollector, w: Watch, start: float, deadline: float) -> str:
    """Verdict for ``w`` once a look after its deadline came back (as the engine waits)."""
    certified = await col.coverage.wait_certified(start + deadline, 10)
    return judge_present(w.first, start, w.hop.target, deadline, col.coverage, certified)[0]


def test_imap_mail_over_max_bytes_is_read_in_part_and_never_a_false_lost(dove: Any) -> None:
    """A notification with a large attachment is over ``max_bytes``: its head is still read (the
    trace id in its Subject is a sighting); one whose trace id lies past what was read makes the
    probes in flight ``unknown``, never ``lost``; a probe started after it can still be lost."""
    filler = "x" * 76 + "\r\n"

    async def main(col: ImapCollector) -> None:
        in_subject, past_the_head, bystander = imap_watch(), imap_watch(), imap_watch()
        start = clock.now()
        for w in (in_subject, past_the_head, bystander):
            col.watch(w)
        big = filler * 400  # ~31 KB, max_bytes is 4 KB
        await asyncio.to_thread(dove.deliver, "bob", mail(f"approval {in_subject.trace_id}", big))
        await asyncio.to_thread(dove.deliver, "bob", mail("approval", big + f"id {past_the_head.trace_id}"))
        assert await in_subject.wait_seen(10), col.health()
        assert await judged_now(col, past_the_head, start, 1.0) == UNKNOWN
        assert await judged_now(col, bystander, start, 1.0) == UNKNOWN
        later = imap_watch()
        later_start = clock.now()
        col.watch(later)
        assert await judged_now(col, later, later_start, 1.0) == LOST  # nothing unread in its window
        assert col.counters["too_large"] == 2 and col.health()["internal_errors"] == 0

    run_imap(main, imap_config(dove, max_bytes=4000))


def test_imap_forged_date_header_does_not_turn_late_into_ok(dove: Any) -> None:
    """The lag is our clock's (and INTERNALDATE is only the sink's indicative time): a Date
    header claiming the mail was sent at the probe's start, or in 1999, changes nothing."""

    async def main(col: ImapCollector) -> None:
        w, old = imap_watch(target=0.5), imap_watch(target=0.5)
        start = clock.now()
        col.watch(w)
        col.watch(old)
        await asyncio.sleep(1.5)  # really late
        forged = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(clock.wall(start)))
        await asyncio.to_thread(dove.deliver, "bob", mail(f"ok {w.trace_id}", "hi", f"Date: {forged}\r\n"))
        await asyncio.to_thread(
            dove.deliver, "bob", mail(f"ok {old.trace_id}", "hi", "Date: Fri, 01 Jan 1999 00:00:00 +0000\r\n")
        )
        assert await w.wait_seen(10) and await old.wait_seen(10)
        for x in (w, old):
            v, _ = judge_present(x.first, start, 0.5, 30, col.coverage, True)
            assert v in ("late", UNKNOWN) and v != "ok", v
            assert x.first is not None and x.first.sink_time is not None
            assert abs(x.first.sink_time - time.time()) < 60  # INTERNALDATE, not the Date header

    run_imap(main, imap_config(dove))


def test_imap_malformed_mime_is_read_leniently_and_never_fatal(dove: Any) -> None:
    async def main(col: ImapCollector) -> None:
        ws = [imap_watch() for _ in range(4)]
        for w in ws:
            col.watch(w)
        raws = [
            # multipart with a boundary that never appears, and no closing one
            f"Subject: a {ws[0].trace_id}\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n--yy\r\nx\r\n",
            # a base64 body that is not base64, and an unknown charset
            f"Subject: b {ws[1].trace_id}\r\nContent-Transfer-Encoding: base64\r\n"
            "Content-Type: text/plain; charset=x-nope\r\n\r\n!!!not base64!!!\r\n",
            # no blank line between head and body, a header line with 8-bit junk
            f"Subject: c {ws[2].trace_id}\r\nX-Junk: \xff\xfe\r\nno colon here\r\n",
            # a nested message/rfc822 that is truncated
            f"Subject: d {ws[3].trace_id}\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nContent-Type: mul",
        ]
        for raw in raws:
            await asyncio.to_thread(dove.deliver, "bob", raw.encode("latin-1"))
        for w in ws:
            assert await w.wait_seen(10), col.health()
        assert col.health()["internal_errors"] == 0 and col.health()["up"]

    run_imap(main, imap_config(dove))


def test_imap_folder_deleted_mid_run_is_blind_then_read_again(dove: Any) -> None:
    """The watched folder is deleted under the collector (and later recreated, with a new
    UIDVALIDITY): blind meanwhile, so a probe in that window is ``unknown``; mail after the
    folder is back is found."""

    def admin(*commands: tuple[str, ...]) -> None:
        ctx = ssl.create_default_context(cafile=dove.cert)
        with imaplib.IMAP4_SSL("127.0.0.1", dove.imaps_port, ssl_context=ctx) as c:
            c.login("bob", "bob-secret")
            for cmd in commands:
                getattr(c, cmd[0])(*cmd[1:])

    admin(("create", "Approvals"))

    async def main(col: ImapCollector) -> None:
        during, after = imap_watch(), imap_watch()
        start = clock.now()
        col.watch(during)
        await asyncio.to_thread(admin, ("delete", "Approvals"))
        await asyncio.sleep(1.5)
        assert col.coverage.blind_now and not col.health()["up"], col.health()
        covered = col.coverage.certified >= start + 1.0
        assert judge_present(None, start, 300, 1.0, col.coverage, covered)[0] == UNKNOWN
        await asyncio.to_thread(admin, ("create", "Approvals"))
        col.watch(after)
        await asyncio.to_thread(dove.deliver, "bob", mail(f"back {after.trace_id}", "hi"), "Approvals")
        assert await after.wait_seen(15), col.health()
        assert col.health()["internal_errors"] == 0

    try:
        run_imap(main, imap_config(dove, folder="Approvals"))
    finally:
        with contextlib.suppress(Exception):
            admin(("delete", "Approvals"))


class HostileImap:
    """Just enough of an IMAP4rev1 server (LOGIN, SELECT/EXAMINE, NOOP, UID FETCH, LOGOUT) for
    the collector in poll mode; ``fetch_line`` is what UID FETCH answers before its OK."""

    def __init__(self) -> None:
        self.fetch_line: bytes = b""
        self.sessions = 0
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def __aenter__(self) -> HostileImap:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        writer.write(b"* OK hostile IMAP ready\r\n")
        try:
            while line := await reader.readline():
                tag, _, rest = line.decode("latin-1").strip().partition(" ")
                cmd = rest.split(" ")[0].upper()
                if cmd == "UID":
                    cmd = "UID " + rest.split(" ")[1].upper()
                out = {
                    "CAPABILITY": b"* CAPABILITY IMAP4rev1\r\n",
                    "SELECT": b"* 0 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 1] ok\r\n",
                    "EXAMINE": b"* 0 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 1] ok\r\n",
                    "UID FETCH": self.fetch_line,
                    "LOGOUT": b"* BYE bye\r\n",
                }.get(cmd, b"")
                writer.write(out + f"{tag} OK done\r\n".encode())
                await writer.drain()
                if cmd == "LOGOUT":
                    break
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.mark.parametrize(
    "poison",
    [
        pytest.param(
            b'* 1 FETCH (UID 5 INTERNALDATE "\xff\xfe" RFC822.SIZE 10)\r\n', id="internaldate-not-utf8"
        ),
        pytest.param(
            b'* 1 FETCH (UID 5 INTERNALDATE "\xc3\x28" RFC822.SIZE 10)\r\n', id="internaldate-bad-utf8"
        ),
    ],
)
def test_imap_hostile_server_never_kills_the_worker_silently(poison: bytes) -> None:
    """Whatever the server sends, the worker keeps going: an error it did not expect is
    counted, makes the collector blind (``/healthz`` not up) and a new session follows."""

    async def main() -> None:
        async with HostileImap() as srv:
            cfg = ImapConfig(
                host="127.0.0.1", port=srv.port, tls="none", username="u", password="p",
                idle=False, poll_interval="200ms", max_backoff="300ms", timeout="2s",
            )  # fmt: skip
            col = ImapCollector(cfg)
            await col.start()
            try:
                col.watch(imap_watch())
                assert await certifies(col.coverage, 5), col.health()
                srv.fetch_line = poison  # the server turns hostile mid-run
                await asyncio.sleep(1.5)
                h = col.health()
                assert not h["up"] and h["last_error"], h
                assert col._thread is not None and col._thread.is_alive(), h
                srv.fetch_line = b""  # and recovers
                await asyncio.sleep(0.5)
                assert await certifies(col.coverage, 5), col.health()
                assert srv.sessions >= 2
            finally:
                await col.close()

    asyncio.run(main())


def test_slack_authors_keeps_a_member_pasting_the_trace_id_from_forging_ok() -> None:
    """With ``authors`` set, the trace id in a message by anyone else (a member pasting it, another
    bot) is no sighting; the funnel bot's own message is."""
    forged, real = slack_watch(authors=["B0FUNNEL"]), slack_watch(authors=["B0FUNNEL"])
    now = time.time()
    msgs = [
        {"ts": f"{now:.6f}", "user": "U0HUMAN", "text": f"is {forged.trace_id} stuck?"},
        {"ts": f"{now + 0.001:.6f}", "user": "U0OTHER", "bot_id": "B0OTHER", "text": f"re {forged.trace_id}"},
        {
            "ts": f"{now + 0.002:.6f}",
            "user": "U0BOT",
            "bot_id": "B0FUNNEL",
            "text": f"approval {real.trace_id}",
        },
    ]

    async def main() -> None:
        async with Hostile(lambda _head: history(msgs)) as api:
            col = SlackCollector(slack_config(api.url))
            await col.start()
            try:
                col.watch(forged)
                col.watch(real)
                assert await real.wait_seen(3), col.health()
                assert await certifies(col.coverage)
                assert forged.first is None and col.health()["foreign_authors"] >= 2
                assert real.first is not None and "B0FUNNEL" in real.first.detail["author"]
            finally:
                await col.close()

    asyncio.run(main())


def test_slack_thread_replies_we_cannot_read_make_an_unseen_probe_unknown_not_lost() -> None:
    """``conversations.history`` returns a thread's parent, never its replies: a notification
    posted as a reply cannot be read. New replies (the parent's ``latest_reply`` moving) mark
    that window missed, so the probe is ``unknown``; a channel without thread activity still
    proves absence (``lost``)."""
    quiet, busy = slack_watch(), slack_watch()

    async def run(w: Watch, messages: list[Any]) -> tuple[str, str | None, SlackCollector]:
        async with Hostile(lambda _head: history(messages)) as api:
            col = SlackCollector(slack_config(api.url, clock_skew="1s"))
            await col.start()
            try:
                start = clock.now()
                col.watch(w)
                await asyncio.sleep(0.5)
                assert await certifies(col.coverage)
                v, reason = judge_present(w.first, start, 0.5, clock.now() - start, col.coverage, True)
                return v, reason, col
            finally:
                await col.close()

    now = time.time()
    # A parent inside the sweep's window (history returns only ts above ``oldest``).
    parent = {"ts": f"{now - 1.8:.6f}", "user": "U0BOT", "text": "approval thread", "reply_count": 3}
    v, _, _ = asyncio.run(run(quiet, [{**parent, "latest_reply": f"{now - 1.5:.6f}"}]))
    assert v == LOST  # the thread's replies are older than the probe: nothing unread in its window
    v, reason, col = asyncio.run(run(busy, [{**parent, "latest_reply": f"{now + 0.2:.6f}"}]))
    assert v == UNKNOWN and "could not read" in (reason or ""), (v, reason)
    assert col.health()["unread_threads"] == 1


@pytest.mark.parametrize("kind", ["slack-invalid_auth", "slack-not_in_channel", "json-401", "json-403"])
def test_refused_credentials_end_the_waits_at_once_as_unknown(kind: str) -> None:
    """A revoked token mid-run is a setup error: the hops in flight end ``unknown`` with the cause
    now (``Coverage.broke``), instead of each waiting out its deadline."""
    sink, _, what = kind.partition("-")
    good = {"slack": history([]), "json": http_answer(json.dumps({"results": []}))}[sink]
    bad = (
        http_answer(json.dumps({"ok": False, "error": what}))
        if sink == "slack"
        else http_answer('{"error": "no"}', int(what))
    )
    state = {"answer": good}

    async def main() -> None:
        async with Hostile(lambda _head: state["answer"]) as api:
            col: Any = (
                SlackCollector(slack_config(api.url))
                if sink == "slack"
                else HttpJsonCollector(json_config(api.url))
            )
            await col.start()
            try:
                w = slack_watch() if sink == "slack" else json_watch()
                col.watch(w)
                assert await certifies(col.coverage)
                state["answer"] = bad
                seen = await asyncio.wait_for(w.wait_seen(60, col.coverage), 10)
                assert not seen and col.coverage.broken and what in col.coverage.broken
                assert judge_present(None, w.since, 0.5, 60, col.coverage, False)[0] == UNKNOWN
            finally:
                await col.close()

    asyncio.run(main())


# -- SMTP receiver: envelope and AUTH only (its DATA path is another helper's) ----------------


def run_smtp(main: Callable[[SmtpCollector], Awaitable[None]], **config: Any) -> None:
    async def go() -> None:
        mx = SmtpCollector(SmtpConfig(**config))
        await mx.start()
        try:
            await main(mx)
        finally:
            await mx.close()

    asyncio.run(go())


def smtp_watch() -> Watch:
    return Watch(
        probe=Probe(step="approval"), hop=HopSpec(name="email", target=300, smtp={}), since=clock.now()
    )


async def smtp_dialogue(port: int, lines: list[bytes]) -> list[bytes]:
    """One SMTP session, one command at a time; the reply to each (after the banner)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies: list[bytes] = []

    async def reply() -> bytes:
        out = b""
        while True:
            line = await asyncio.wait_for(reader.readline(), 5)
            out += line
            if len(line) < 4 or line[3:4] != b"-":
                return out

    await reply()
    for line in lines:
        writer.write(line)
        await writer.drain()
        replies.append(await reply())
    writer.close()
    return replies


def test_smtp_recipient_token_tricks_never_yield_a_sighting() -> None:
    token = "Tok3n-adversarial"
    w = smtp_watch()

    async def main(mx: SmtpCollector) -> None:
        mx.watch(w)
        assert mx.port is not None
        for rcpt in (
            "approver@funnel.invalid",
            "approver+wrong@funnel.invalid",
            f"approver+{token[:-1]}@funnel.invalid",  # a prefix of the token
            f"approver+{token}x@funnel.invalid",  # the token with a suffix
            f"approver@{token}.funnel.invalid",  # the token in the domain
            f'"approver+{token[::-1]}"@funnel.invalid',
        ):
            replies = await smtp_dialogue(
                mx.port,
                [
                    b"EHLO x\r\n",
                    b"MAIL FROM:<f@funnel.invalid>\r\n",
                    f"RCPT TO:<{rcpt}>\r\n".encode(),
                    b"DATA\r\n",
                ],
            )
            assert replies[2].startswith(b"550"), (rcpt, replies)
            assert replies[3][:3] in (b"503", b"554"), (rcpt, replies)  # no DATA without a recipient
        assert w.first is None and mx.rejected["unauthenticated"] >= 6

    run_smtp(main, rcpt_token=token)


def test_smtp_auth_failures_and_skipping_auth_never_yield_a_sighting() -> None:
    w = smtp_watch()
    wrong = base64.b64encode(b"\0funnel\0not-the-password").decode()
    other_user = base64.b64encode(b"\0mallory\0pw-adversarial").decode()

    async def main(mx: SmtpCollector) -> None:
        mx.watch(w)
        assert mx.port is not None
        mail_lines = [
            b"MAIL FROM:<f@funnel.invalid>\r\n",
            b"RCPT TO:<approver@funnel.invalid>\r\n",
            b"DATA\r\n",
            f"Subject: {w.trace_id}\r\n\r\nx\r\n.\r\n".encode(),
        ]
        for auth in ([], [f"AUTH PLAIN {wrong}\r\n".encode()], [f"AUTH PLAIN {other_user}\r\n".encode()]):
            replies = await smtp_dialogue(mx.port, [b"EHLO x\r\n", *auth, *mail_lines[:3]])
            if auth:
                assert replies[1].startswith(b"535"), replies
            assert replies[len(auth) + 1].startswith(b"530"), replies
            assert not replies[-1].startswith(b"354"), replies  # never reaches DATA
        assert w.first is None

    run_smtp(main, auth_username="funnel", auth_password="pw-adversarial")


# -- response hops: the injection's own answer -------------------------------------------------


def response_watch() -> Watch:
    return Watch(
        probe=Probe(step="api"), hop=HopSpec(name="latency", target=1.5, response={}), since=clock.now()
    )


def test_response_lag_excludes_the_wait_for_our_own_connection_pool() -> None:
    """Three probes through a one-connection pool to an API that answers in 1 s: each answer
    took 1 s, the second and third only waited in the tracer's own queue first. Their lag (the
    response hop's, and every other hop's start) must not include that wait; and a request
    that never got a connection (PoolTimeout) is no evidence, never ``lost``."""

    async def slow(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(1.0)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async def main() -> None:
        async with Hostile(lambda _head: slow) as api:
            spec = HttpRequest(url=api.url + "/health", method="GET", timeout=5)
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as client:
                results = await asyncio.gather(
                    *(inject_http(client, spec, Probe(step="api"), {}) for _ in range(3))
                )
                lags = [i.done_at - i.sent_at for i, _ in results]
                assert all(i.ok for i, _ in results)
                assert max(lags) < 1.8, lags  # 1 s each; queued: 2 s and 3 s before the fix
                short = HttpRequest(url=api.url + "/health", method="GET", timeout=0.3)
                results = await asyncio.gather(
                    *(inject_http(client, short, Probe(step="api"), {}) for _ in range(2))
                )
        col = ResponseCollector(ResponseConfig())
        kinds = sorted(str(i.attributes.get("error.type")) for i, _ in results)
        assert kinds == ["pool_timeout", "timeout"], kinds
        for injection, _ in results:
            w = response_watch()
            judged = col.observe_injection(w, injection)
            if injection.attributes["error.type"] == "pool_timeout":
                assert not judged and not w.settled  # no evidence: inject_failed upstream
            else:
                assert judged and w.settled and w.first is None  # the API really did not answer

    asyncio.run(main())


def test_imap_password_changed_mid_run_ends_the_waits_as_unknown_with_the_cause() -> None:
    """The mailbox password is rotated under a running collector: the next session's LOGIN is
    refused, which no retry fixes, so the hops in flight end ``unknown`` now (not at their
    deadline, never ``lost``), with the server's reason and never the password."""
    if not dovecot.available():
        pytest.skip(dovecot.HOW_TO_GET)
    d = dovecot.Dovecot().start()
    try:

        async def main(col: ImapCollector) -> None:
            assert await certifies(col.coverage, 5), col.health()
            w = imap_watch(target=300)
            col.watch(w)
            (d.dir / "passwd").write_text("bob:{PLAIN}rotated-secret::::::\n")
            await asyncio.to_thread(d.stop)  # drops the session; the new one must log in again
            await asyncio.to_thread(d.start)
            seen = await asyncio.wait_for(w.wait_seen(300, col.coverage), 15)
            assert not seen and col.coverage.broken and "login refused" in col.coverage.broken
            assert judge_present(None, w.since, 300, 300, col.coverage, False)[0] == UNKNOWN
            assert "bob-secret" not in repr(col.health()) and "rotated-secret" not in repr(col.health())

        # timeout over Dovecot's auth_failure_delay (2 s): the refusal itself must arrive
        run_imap(main, imap_config(d, max_backoff="300ms", timeout="5s"))
    finally:
        d.close()


MAIL_CLIENT = """
import smtplib, sys, time
time.sleep(float(sys.argv[3]))
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20) as s:
    s.sendmail("x@funnel.invalid", ["approver+" + sys.argv[4] + "@funnel.invalid"],
               "Subject: approval " + sys.argv[2] + "\\r\\n\\r\\nplease approve\\r\\n")
"""


def test_out_of_file_descriptors_the_smtp_receiver_is_blind_not_late() -> None:
    """The SMTP receiver's heartbeat, like the webhook's, certifies only after a connection to
    itself is accepted: a notification left in the kernel's backlog while the process has no
    file descriptors is ``unknown``, never a false ``late``."""
    token = "fdtoken1234"
    w = Watch(probe=Probe(step="approval"), hop=HopSpec(name="email", target=3, smtp={}), since=clock.now())

    async def main(mx: SmtpCollector) -> None:
        start = clock.now()
        mx.watch(w)
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", MAIL_CLIENT, str(mx.port), w.trace_id, "1.5", token
        )
        await starve_file_descriptors(4.0)
        await asyncio.wait_for(client.wait(), 20)
        assert await w.wait_seen(5), mx.health()  # read once descriptors are back
        certified = await mx.coverage.wait_certified(clock.now(), 3)
        v, reason = judge_present(w.first, start, 3.0, 30, mx.coverage, certified)
        assert v == UNKNOWN, (v, reason, w.first.at - start if w.first else None)

    run_smtp(main, rcpt_token=token)
