"""The sandbox's Slack Web API stand-in, pinned with the official ``slack_sdk`` client, and the
Slack channel collector reading it over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from collectors.slack import SlackCollector, SlackConfig, poll_interval
from tracer import clock
from tracer.probe import Probe, new_trace_id
from tracer.sandbox.approvals import ApprovalSettings, ApprovalStats
from tracer.sandbox.runner import Sandbox
from tracer.sandbox.slack import SlackState
from tracer.spec import HopSpec
from tracer.verdict import OK, UNKNOWN, judge_present
from tracer.watch import Watch

pytestmark = pytest.mark.timeout(60)

CHANNEL = "C0APPROVALS"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


@pytest.fixture()
def sb(sandbox: Sandbox) -> Iterator[Sandbox]:
    yield sandbox
    sandbox.slack.fault = sandbox.slack.retry_after = sandbox.slack.history_per_minute = None
    sandbox.ctx.extra["approvals"] = ApprovalSettings()


def client(sb: Sandbox, token: str | None = None) -> WebClient:
    return WebClient(token=token or sb.slack.bot_token, base_url=sb.slack_api_url + "/")


# -- the contract, with the official client -----------------------------------------------
def test_auth_and_errors_as_slack_sdk_sees_them(sb: Sandbox) -> None:
    assert client(sb).auth_test()["user_id"] == sb.slack.bot_user
    with pytest.raises(SlackApiError) as bad:
        client(sb, "xoxb-wrong").auth_test()
    assert bad.value.response["error"] == "invalid_auth"
    with pytest.raises(SlackApiError) as missing:
        client(sb).conversations_history(channel="C0NOPE")
    assert missing.value.response["error"] == "channel_not_found"
    sb.slack.retry_after = 7
    with pytest.raises(SlackApiError) as limited:
        client(sb).conversations_history(channel=CHANNEL)
    assert limited.value.response.status_code == 429
    assert limited.value.response.headers["retry-after"] in ("7", ["7"])


def test_post_then_history_with_oldest_latest_limit_and_cursor(sb: Sandbox) -> None:
    c = client(sb)
    before = f"{time.time():.6f}"
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "hello"}}]
    posted = [c.chat_postMessage(channel=CHANNEL, text=f"m{i}", blocks=blocks)["ts"] for i in range(5)]
    assert posted == sorted(posted) and len(set(posted)) == 5
    # newest first, strictly after 'oldest', paged by cursor
    seen, cursor = [], None
    while True:
        page = c.conversations_history(channel=CHANNEL, oldest=before, limit=2, cursor=cursor)
        seen += [m["ts"] for m in page["messages"]]
        cursor = page["response_metadata"]["next_cursor"]
        if not page["has_more"]:
            break
    assert seen == posted[::-1]
    window = c.conversations_history(channel=CHANNEL, oldest=posted[1], latest=posted[3])
    assert [m["text"] for m in window["messages"]] == ["m2"]  # both ends exclusive by default
    inclusive = c.conversations_history(channel=CHANNEL, oldest=posted[1], latest=posted[3], inclusive=True)
    assert [m["text"] for m in inclusive["messages"]] == ["m3", "m2", "m1"]
    assert window["messages"][0]["blocks"] == blocks


# -- the collector ------------------------------------------------------------------------
def config(sb: Sandbox, **over: Any) -> SlackConfig:
    base: dict[str, Any] = {
        "token": sb.slack.bot_token,
        "channels": [CHANNEL],
        "api_url": sb.slack_api_url,
        "requests_per_minute": 300,  # the stand-in has no tier: 0.2 s between calls
        "budget_share": 1.0,
        "min_interval": "200ms",
        "max_backoff": "1s",
    }
    base.update(over)
    return SlackConfig(**base)


def watch(probe: Probe | None = None, target: float = 300, **hop: Any) -> Watch:
    return Watch(
        probe=probe or Probe(step="approval"),
        hop=HopSpec(name="slack", target=target, slack=hop),
        since=clock.now(),
    )


def run(main: Callable[[SlackCollector], Awaitable[None]], cfg: SlackConfig) -> SlackCollector:
    col = SlackCollector(cfg)

    async def go() -> None:
        await col.start()
        try:
            await main(col)
        finally:
            await col.close()

    asyncio.run(go())
    return col


def test_sandbox_approval_seen_in_channel_within_delay_plus_error_bar(sb: Sandbox) -> None:
    delay = 0.5
    sb.ctx.extra["approvals"] = ApprovalSettings(
        slack_api_url=sb.slack_api_url, slack_api_delay=delay, emit_event=False
    )
    sb.ctx.extra["approval_stats"] = ApprovalStats()

    async def main(col: SlackCollector) -> None:
        w = watch(where=["blocks"], channel=CHANNEL)
        col.watch(w)
        async with httpx.AsyncClient() as http:
            t0 = clock.now()
            resp = await http.post(
                f"{sb.url}/api/v1/approvals",
                json={
                    "resource": "prod-db",
                    "requester": "ana@example.com",
                    "metadata": {"canary_trace_id": w.trace_id},
                },
            )
        assert resp.status_code == 201
        assert await w.wait_seen(5), col.health()
        obs = w.first
        assert obs is not None and obs.detail["where"] == "blocks" and obs.detail["channel"] == CHANNEL
        lag = obs.at - t0
        assert delay <= lag <= delay + col.error_bar + 0.5, (lag, col.error_bar)
        assert obs.error_bar <= col.error_bar + 0.3
        assert obs.sink_time is not None and abs(obs.sink_time - clock.wall(t0) - delay) < 0.5  # Slack's ts

    run(main, config(sb))
    # The funnel counts a delivery once chat.postMessage has answered, which can be just after
    # the collector saw the message in the history.
    stats = sb.ctx.extra["approval_stats"]
    for _ in range(50):
        if stats.sent["slack_api"]:
            break
        time.sleep(0.05)
    assert stats.sent["slack_api"] == 1


def test_api_outage_and_429_give_unknown_not_lost_and_obey_retry_after(sb: Sandbox) -> None:
    async def main(col: SlackCollector) -> None:
        start = clock.now()
        during = watch(target=0.5)
        col.watch(during)
        await asyncio.sleep(0.5)
        sb.slack.fault = 503  # the API goes down
        await asyncio.sleep(0.6)
        assert col.coverage.blind_now and not col.health()["up"]
        sb.slack.post(CHANNEL, f"posted while we could not read: {during.trace_id}")
        await asyncio.sleep(0.5)
        sb.slack.fault, sb.slack.retry_after = None, 1.5  # then rate-limits us
        await asyncio.sleep(0.3)
        calls = sb.slack.calls.get("conversations.history", 0)
        await asyncio.sleep(1.0)
        assert sb.slack.calls.get("conversations.history", 0) - calls <= 1  # waits out Retry-After
        assert col.rate_limited >= 1 and col.coverage.blind_now
        sb.slack.retry_after = None
        assert await during.wait_seen(10), col.health()  # retroactive: the next good read finds it
        v, reason = judge_present(during.first, start, 0.5, 30, col.coverage, certified=True)
        assert v == UNKNOWN, (v, reason)
        assert "Bearer" not in repr(col.health()) and sb.slack.bot_token not in repr(col.health())

    run(main, config(sb))


def test_text_blocks_attachments_and_channel_filters(sb: Sandbox) -> None:
    async def main(col: SlackCollector) -> None:
        in_text, in_att, wrong_chan, text_only = (
            watch(where=["text"]),
            watch(where=["attachments"]),
            watch(channel="C0GENERAL"),
            watch(where=["text"]),
        )
        for w in (in_text, in_att, wrong_chan, text_only):
            col.watch(w)
        s = sb.slack
        s.post(CHANNEL, f"approval {in_text.trace_id}")
        s.post(
            CHANNEL,
            "see attachment",
            attachments=[{"fallback": "x", "fields": [{"title": "trace", "value": in_att.trace_id}]}],
        )
        s.post(CHANNEL, f"wrong channel {wrong_chan.trace_id}")
        s.post(
            CHANNEL,
            "blocks only",
            blocks=[{"type": "context", "elements": [{"type": "mrkdwn", "text": text_only.trace_id}]}],
        )
        assert await in_text.wait_seen(10) and await in_att.wait_seen(10), col.health()
        await asyncio.sleep(0.5)
        assert not wrong_chan.observations and not text_only.observations
        v, _ = judge_present(in_text.first, in_text.since, 300, 360, col.coverage, certified=True)
        assert v == OK

    run(main, config(sb, channels=[CHANNEL, "C0GENERAL"]))


def test_a_thousand_unrelated_messages_match_nothing(sb: Sandbox) -> None:
    async def main(col: SlackCollector) -> None:
        watched = [watch() for _ in range(5)]
        for w in watched:
            col.watch(w)
        target = watched[0]
        near = target.trace_id[:-1] + ("0" if target.trace_id[-1] != "0" else "1")
        for i in range(1000):
            if i == 500:  # in the middle: only following next_cursor reaches it
                sb.slack.post(CHANNEL, f"the one {target.trace_id}")
            sb.slack.post(
                CHANNEL,
                f"unrelated {i} {new_trace_id()} {near}",
                blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": near.upper()}}],
            )
        assert await target.wait_seen(10), col.health()
        end = time.monotonic() + 10
        while (col.calls < 6 or col._channels[CHANNEL].cursor) and time.monotonic() < end:
            await asyncio.sleep(0.1)  # let the sweep read all 1,001
        assert [w for w in watched if w.observations] == [target]
        assert col.calls >= 6 and col._channels[CHANNEL].cursor is None  # 200 a page, cursor followed

    run(main, config(sb, page_size=200))


def test_budget_sets_the_interval_and_one_call_per_channel_per_cycle(sb: Sandbox) -> None:
    cfg = config(
        sb, channels=[CHANNEL, "C0GENERAL"], requests_per_minute=50, budget_share=0.5, min_interval="1s"
    )
    assert poll_interval(cfg) == pytest.approx(2 * 60 / 25)  # 4.8 s: Tier 3 at half share, 2 channels
    fast = config(
        sb, channels=[CHANNEL, "C0GENERAL"], requests_per_minute=120, budget_share=1.0, min_interval="100ms"
    )

    async def main(col: SlackCollector) -> None:
        col.watch(watch())
        await asyncio.sleep(1.6)

    before = sb.slack.calls.get("conversations.history", 0)
    col = run(main, fast)  # 1 s a cycle, two calls each
    made = sb.slack.calls.get("conversations.history", 0) - before
    assert made == col.calls and 2 <= made <= 4 and made % 2 == 0


def test_state_post_is_what_history_returns() -> None:
    s = SlackState()
    m = s.post(CHANNEL, "x")
    assert s.messages[CHANNEL] == [m] and m["ts"].count(".") == 1


def test_a_hop_naming_an_unlisted_channel_is_read_too(sb: Sandbox) -> None:
    async def main(col: SlackCollector) -> None:
        w = watch(channel="C0GENERAL")  # the config lists only C0APPROVALS
        col.watch(w)
        assert col.interval == pytest.approx(poll_interval(col.config, 2))
        sb.slack.post("C0GENERAL", f"over here {w.trace_id}")
        assert await w.wait_seen(10), col.health()

    run(main, config(sb))
