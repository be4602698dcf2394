"""The webhook receiver over real sockets: the sandbox funnel posts approvals to it for real."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from collectors.webhook import WebhookCollector, WebhookConfig, WebhookHop
from tracer import clock
from tracer.probe import Probe, new_trace_id
from tracer.sandbox.approvals import ApprovalSettings
from tracer.sandbox.runner import Sandbox
from tracer.spec import HopSpec
from tracer.watch import Watch

pytestmark = pytest.mark.timeout(30)

SECRET = "s3cr3t-path"
KEY = "hmac-key"
RECEIVER_CODE = ("collectors", "tracer", "uvicorn", "h11", "json", "urllib", "email", "asyncio")


@pytest.fixture(scope="module")
def sandbox() -> Any:
    with Sandbox() as sb:
        yield sb


def watch(path: str, json_path: str | None = None, probe: Probe | None = None) -> Watch:
    hop = {"path": path} if json_path is None else {"path": path, "json_path": json_path}
    return Watch(
        probe=probe or Probe(step="approval"),
        hop=HopSpec(name=path.replace("/", "_"), target=300, webhook=hop),
        since=clock.now(),
    )


def signed(body: bytes, key: str = KEY) -> dict[str, str]:
    return {"X-Signature": "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()}


def run(main: Callable[[WebhookCollector], Awaitable[None]], **config: Any) -> None:
    """Start a receiver on an ephemeral loopback port, run ``main`` against it, close it."""

    async def go() -> None:
        # Tests of other behaviour may run without a secret; auth has its own tests.
        hook = WebhookCollector(WebhookConfig(**{"allow_unauthenticated": True, **config}))
        await hook.start()
        try:
            await main(hook)
        finally:
            await hook.close()

    asyncio.run(go())


async def raw_post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes) -> int:
    """HTTP/1.1 POST on an open keep-alive connection; returns the status code."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length"
    )
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def approve(sb: Sandbox, trace_id: str) -> float:
    """POST an approval request; return the monotonic time just before it left."""
    body = {
        "resource": "prod-db",
        "requester": "ana@example.com",
        "payload": {"reason": "migration"},
        "metadata": {"canary_trace_id": trace_id},
    }
    async with httpx.AsyncClient() as client:
        t0 = clock.now()
        resp = await client.post(f"{sb.url}/api/v1/approvals", json=body)
    assert resp.status_code == 201, resp.text
    return t0


def test_sandbox_notifications_seen_within_delay_knob(sandbox: Sandbox) -> None:
    async def main(hook: WebhookCollector) -> None:
        sandbox.ctx.extra["approvals"] = ApprovalSettings(
            slack_url=f"http://127.0.0.1:{hook.port}/slack",
            webhook_url=f"http://127.0.0.1:{hook.port}/events",
            secret_path=SECRET,
            hmac_secret=KEY,
            slack_delay=0.3,
            webhook_delay=0.6,
            emit_event=False,
        )
        probe = Probe(step="approval")
        slack, generic = watch("slack", probe=probe), watch("events", "data.trace_id", probe=probe)
        hook.watch(slack)
        hook.watch(generic)
        t0 = await approve(sandbox, probe.trace_id)
        assert await slack.wait_seen(3) and await generic.wait_seen(3)
        for w, delay in ((slack, 0.3), (generic, 0.6)):
            assert w.first is not None
            lag = w.first.at - t0
            assert delay - 0.01 <= lag <= delay + 0.25, (w.hop.name, lag)
            assert w.first.source == "push" and w.first.at == w.first.not_before
        assert hook.health()["matched"] == 2 and hook.health()["unauthenticated"] == 0

    run(main, secret_path=SECRET, hmac_secret=KEY)


def test_unauthenticated_posts_are_401_and_never_match() -> None:
    async def main(hook: WebhookCollector) -> None:
        w = watch("slack")
        hook.watch(w)
        body = json.dumps({"text": f"approval {w.trace_id}"}).encode()
        base = f"http://127.0.0.1:{hook.port}"
        attempts = [
            (f"{base}/slack", signed(body)),  # no secret path
            (f"{base}/wrong-secret/slack", signed(body)),  # wrong secret path
            (f"{base}/{SECRET}/slack", {}),  # no signature
            (f"{base}/{SECRET}/slack", signed(body, "other-key")),  # bad signature
            (f"{base}/{SECRET}/slack", {"X-Signature": "sha256=zz"}),  # not even hex
        ]
        async with httpx.AsyncClient() as client:
            for url, headers in attempts:
                resp = await client.post(
                    url, content=body, headers={"Content-Type": "application/json", **headers}
                )
                assert resp.status_code == 401, url
            assert not await w.wait_seen(0.2)
            assert hook.health()["unauthenticated"] == len(attempts)
            # Same body, properly authenticated (with and without the sha256= prefix): matched.
            plain = {"X-Signature": signed(body)["X-Signature"].removeprefix("sha256=")}
            resp = await client.post(f"{base}/{SECRET}/slack", content=body, headers=plain)
            assert resp.status_code == 200
        assert await w.wait_seen(1)
        assert hook.health()["accepted"] == 1

    run(main, secret_path=SECRET, hmac_secret=KEY)


def test_oversized_posts_are_413_and_never_match() -> None:
    async def main(hook: WebhookCollector) -> None:
        w = watch("events")
        hook.watch(w)
        big = json.dumps({"trace": w.trace_id, "pad": "x" * 5000}).encode()
        url = f"http://127.0.0.1:{hook.port}/events"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: caught while streaming
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        async with httpx.AsyncClient() as client:
            assert (await client.post(url, content=big)).status_code == 413
            assert (await client.post(url, content=chunks())).status_code == 413
            assert not await w.wait_seen(0.2)
            assert hook.health()["oversized"] == 2
            small = json.dumps({"trace": w.trace_id}).encode()
            assert (await client.post(url, content=small)).status_code == 200
        assert await w.wait_seen(1)

    run(main, max_body=4096)


def test_malformed_bodies_are_400_and_the_server_keeps_serving() -> None:
    async def main(hook: WebhookCollector) -> None:
        w = watch("events")
        hook.watch(w)
        url = f"http://127.0.0.1:{hook.port}/events"
        bad = [
            (b'{"text": "' + w.trace_id.encode() + b'"', "application/json"),  # truncated JSON
            (b"\xff\xfe" + w.trace_id.encode(), "application/json"),  # not UTF-8
            (b"", "application/json"),  # empty
            (b"[" * 100_000, "application/json"),  # deeper than any parser should go
            (b"123", "application/json"),  # JSON, but no object, array or string
            (b"payload=%7Bbroken", "application/x-www-form-urlencoded"),
        ]
        async with httpx.AsyncClient() as client:
            for raw, ctype in bad:
                resp = await client.post(url, content=raw, headers={"Content-Type": ctype})
                assert resp.status_code == 400, raw[:20]
            assert not await w.wait_seen(0.1)
            assert hook.health()["malformed"] == len(bad)
            # Slack's legacy form encoding is not malformed: payload=<json>.
            form = {"payload": json.dumps({"text": f"trace {w.trace_id}"})}
            assert (await client.post(url, data=form)).status_code == 200
        assert await w.wait_seen(1)
        assert hook.up

    run(main)


def test_flood_of_unrelated_webhooks_no_false_match_bounded_memory() -> None:
    async def main(hook: WebhookCollector) -> None:
        w = watch("slack")
        hook.watch(w)
        statuses: list[int] = []

        async def sender(n: int) -> None:
            """One keep-alive connection posting ``n`` unrelated webhooks back to back (a raw
            client: cheap enough that the receiver, not the client, is what gets measured)."""
            reader, writer = await asyncio.open_connection("127.0.0.1", hook.port)
            for i in range(n):
                body = json.dumps({"text": f"approval {i} trace {new_trace_id()} " + "x" * 2000}).encode()
                statuses.append(await raw_post(reader, writer, f"/{SECRET}/slack", body))
            writer.close()

        await asyncio.gather(*(sender(3) for _ in range(20)))  # warm up
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        await asyncio.gather(*(sender(50) for _ in range(20)))
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        # The receiver side only: the test's own client and pytest's log capture are not the subject.
        server_side = [tracemalloc.Filter(True, f"*/{part}/*") for part in RECEIVER_CODE]
        diff = after.filter_traces(server_side).compare_to(before.filter_traces(server_side), "filename")
        growth = sum(s.size_diff for s in diff)
        assert growth < 1024 * 1024, [str(d) for d in diff[:5]]
        assert not w.observations
        health = hook.health()
        assert health["accepted"] == 1060 and health["matched"] == 0 and health["in_flight"] == 1

    run(main, secret_path=SECRET)


def test_route_hands_posthog_destination_bodies_to_another_collector(sandbox: Sandbox) -> None:
    """A PostHog realtime destination pointed at the receiver: the sandbox PostHog pushes the
    approval_requested event, the default body, to a path another collector routed."""

    async def main(hook: WebhookCollector) -> None:
        got: list[tuple[Any, float]] = []
        arrived = asyncio.Event()

        def on_body(body: Any, received: float) -> None:
            got.append((body, received))
            arrived.set()

        hook.route("posthog", on_body)
        sandbox.ctx.extra["approvals"] = ApprovalSettings(emit_event=True)
        sandbox.posthog.destinations[:] = [hook.endpoint("posthog")]
        try:
            tid = new_trace_id()
            t0 = await approve(sandbox, tid)
            await asyncio.wait_for(arrived.wait(), 5)
        finally:
            sandbox.posthog.destinations.clear()
        body, received = got[0]
        assert body["event"]["event"] == "approval_requested"
        assert body["event"]["properties"]["canary_trace_id"] == tid
        assert "person" in body
        assert t0 < received <= clock.now()
        assert hook.health()["routed"] == 1

    run(main, secret_path=SECRET)


def test_json_path_limits_where_the_trace_id_may_be() -> None:
    async def main(hook: WebhookCollector) -> None:
        probe = Probe(step="approval")
        in_blocks = watch("slack", "blocks[1].text.text", probe=probe)
        in_text_only = watch("slack", "attachments.0.text", probe=probe)
        other_path = watch("events", probe=probe)
        for w in (in_blocks, in_text_only, other_path):
            hook.watch(w)
        body = {
            "text": "approval",
            "blocks": [{"type": "header"}, {"text": {"text": f"trace {probe.trace_id}"}}],
        }
        async with httpx.AsyncClient() as client:
            assert (await client.post(f"http://127.0.0.1:{hook.port}/slack", json=body)).status_code == 200
        assert await in_blocks.wait_seen(1)
        assert not in_text_only.observations and not other_path.observations
        assert hook.health()["in_flight"] == 2

    run(main)


def test_heartbeat_certifies_and_an_unexpected_exit_turns_blind() -> None:
    async def main(hook: WebhookCollector) -> None:
        first = hook.coverage.certified
        await asyncio.sleep(0.6)
        assert hook.coverage.certified > first and not hook.coverage.blind_now
        assert hook._server is not None
        hook._server.should_exit = True  # the server stops without anyone asking the collector
        for _ in range(100):
            if hook.coverage.blind_now:
                break
            await asyncio.sleep(0.05)
        assert hook.coverage.blind_now and hook.coverage.failures == 1
        assert hook.health()["up"] is False

    run(main, heartbeat=0.1)


def test_config_is_loopback_unless_explicitly_public() -> None:
    with pytest.raises(ValidationError, match="allow_public"):
        WebhookConfig(host="0.0.0.0")
    with pytest.raises(ValidationError, match="secret_path or hmac_secret"):
        WebhookConfig(host="0.0.0.0", allow_public=True)
    assert WebhookConfig(host="0.0.0.0", allow_public=True, secret_path="abc").allow_public
    with pytest.raises(ValidationError):
        WebhookConfig(secret_path="a/b")
    assert WebhookHop(path="/slack/").path == "slack"
    assert "s3cr3t" not in repr(WebhookConfig(secret_path="s3cr3t", hmac_secret="s3cr3t"))
