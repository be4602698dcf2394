"""Slack channel history: the notification as the approver sees it, in the channel itself.

Pointing the funnel at our webhook receiver measures a path nobody reads; this collector reads
the real channel with a bot token (``conversations.history``, scope ``channels:history``, or
``groups:history`` for private channels; the bot must be a member of the channel).

Polling, within Slack's budget: ``conversations.history`` is a Tier 3 method (about 50 calls a
minute per workspace and app). Each cycle makes exactly one call per channel, with an ``oldest``
cursor just below what was already read; the interval is derived from the stated budget
(``requests_per_minute`` x ``budget_share``, like PostHog's ``poll_interval``), so it grows with
the number of channels, never with the number of probes. A 429 is obeyed (``Retry-After``).
When a channel has more new messages than one page (``has_more``), the next cycles follow
``next_cursor`` before moving ``oldest`` on: still one call per channel per cycle.

Honesty: a message ``ts`` is Slack's own time (``sink_time``). A sighting is ``(not_before,
at]`` = (the previous completed read of that channel, this answer). Errors, ``ok: false``
answers (``invalid_auth``, ``channel_not_found``, ``not_in_channel``, ``missing_scope``) and rate
limits are ``coverage.failed``: blind, so hops become ``unknown``. History is retroactive: the
next good read still finds what was posted meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field, field_validator

from tracer import clock
from tracer.net import AnswerError, Backoff, fetch_json
from tracer.payload import strings_in
from tracer.plugins import SinkPlugin
from tracer.probe import TRACE_ID
from tracer.schema import Duration, Model, Secret
from tracer.supervise import Supervisor
from tracer.watch import Coverage, Observation, Watch, WatchIndex

log = logging.getLogger(__name__)

# ``ok: false`` errors no retry can fix: the token, its scopes or the bot's membership.
PERMANENT = frozenset(
    ("invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired", "no_permission",
     "missing_scope", "not_in_channel", "channel_not_found", "not_allowed_token_type")
)  # fmt: skip
MAX_ANSWER = 16 * 1024 * 1024  # bytes: a history page of 999 large messages is far below

Part = Literal["text", "blocks", "attachments"]


class SlackConfig(Model):
    token: Secret = Field(
        description="bot token (xoxb-...) with channels:history (groups:history if private)"
    )
    channels: list[str] = Field(min_length=1, description="channel IDs to read (C0123...), bot is a member")
    api_url: str = Field("https://slack.com/api", description="Web API base URL")
    requests_per_minute: float = Field(50, gt=0, description="conversations.history budget (Tier 3: ~50/min)")
    budget_share: float = Field(0.5, gt=0, le=1, description="fraction of that budget this tracer may use")
    min_interval: Duration = Field(1.0, gt=0, description="never poll faster than this")
    page_size: int = Field(200, ge=1, le=999, description="'limit' of one history call")
    clock_skew: Duration = Field(2.0, ge=0, description="read this far below the oldest probe's start")
    timeout: Duration = Field(10.0, gt=0)
    max_backoff: Duration = Field(60.0, gt=0)

    @field_validator("token")
    @classmethod
    def _bot_token(cls, v: Secret) -> Secret:
        if not v.get_secret_value().startswith(("xoxb-", "xoxp-")):
            raise ValueError("token must be a Slack bot (xoxb-) or user (xoxp-) token")
        return v

    @field_validator("api_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("api_url must be an http(s) URL")
        return v.rstrip("/")


class SlackHop(Model):
    channel: str | None = Field(None, description="only this channel ID (default: any configured one)")
    where: list[Part] = Field(
        default_factory=lambda: ["text", "blocks", "attachments"],
        min_length=1,
        description="where in the message the trace id may appear",
    )
    authors: list[str] | None = Field(
        None,
        min_length=1,
        description="only messages by these user, bot or app IDs (U.../B.../A...) count; default: "
        "anyone in the channel, so a member who pastes a trace id would count as the funnel",
    )


def poll_interval(cfg: SlackConfig, channels: int | None = None) -> float:
    """Seconds between cycles: one call per channel each, inside the budget share."""
    per_call = 60.0 / (cfg.requests_per_minute * cfg.budget_share)
    return max(cfg.min_interval, per_call * (channels or len(cfg.channels)))


@dataclass
class _Channel:
    oldest: float | None = None  # epoch: read messages with ts above this
    cursor: str | None = None  # following has_more within one sweep
    sweep_sent: float | None = None  # monotonic: when the current sweep's first call left
    sweep_max_ts: float = 0.0
    certified: float | None = None  # monotonic: everything posted before is read
    seen: set[str] = field(default_factory=set)  # ts already handled (reads overlap)
    threads: dict[str, str] = field(default_factory=dict)  # parent ts -> latest_reply already noted


class SlackCollector:
    sink: ClassVar[str] = "slack"

    def __init__(self, config: SlackConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.interval = poll_interval(config)
        self.coverage = Coverage(retroactive=True)
        self._supervisor = Supervisor("slack-poller", self.coverage)
        self._index = WatchIndex()
        self._client = client
        self._own_client = client is None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._channels = {c: _Channel() for c in config.channels}
        self._backoff = Backoff(config.max_backoff)
        self.calls = 0
        self.failed_calls = 0
        self.rate_limited = 0
        self.malformed_messages = 0  # messages without a valid ts: skipped
        self.foreign = 0  # the trace id in a message by an author the hop does not accept
        self.unread_threads = 0  # threads with new replies (not readable here): windows missed
        self.last_error: str | None = None

    # -- Collector protocol -------------------------------------------------
    @property
    def error_bar(self) -> float:
        return self.interval

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(headers={"User-Agent": "funnel-tracer"})
        self.coverage.looked(clock.now())  # nothing in flight yet, nothing to miss
        self._task = self._supervisor.start(self._run)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._own_client and self._client is not None:
            await self._client.aclose()

    def watch(self, w: Watch) -> None:
        channel = w.sink_spec.channel
        if channel is not None and channel not in self._channels:
            # A hop names a channel the config does not list: read it too (a hop that could
            # never be seen would be reported lost), and keep the budget by cycling slower.
            log.warning(
                "slack: hop %s reads channel %s, not in collectors.slack.channels", w.hop.name, channel
            )
            self._channels[channel] = _Channel()
            self.interval = poll_interval(self.config, len(self._channels))
        self._index.add(w)
        self._wake.set()

    def unwatch(self, w: Watch) -> None:
        self._index.discard(w)

    def health(self) -> dict[str, Any]:
        return {
            "up": not self.coverage.blind_now,
            "interval_s": self.interval,
            "channels": len(self._channels),
            "calls": self.calls,
            "failed_calls": self.failed_calls,
            "rate_limited": self.rate_limited,
            "malformed_messages": self.malformed_messages,
            "foreign_authors": self.foreign,
            "unread_threads": self.unread_threads,
            "internal_errors": self._supervisor.crashes,
            "in_flight": len(self._index),
            "last_error": self.last_error,
        }

    # -- polling ------------------------------------------------------------
    async def _run(self) -> None:
        delay = 0.0
        while True:
            if not len(self._index):
                self.coverage.looked(clock.now())  # idle: nothing in flight, spend no budget
                self._wake.clear()
                await self._wake.wait()
                await asyncio.sleep(0.05)  # let a burst of injections register together
            elif delay > 0:
                await asyncio.sleep(delay)
            started = clock.now()
            delay = await self.poll_once()
            delay = max(0.0, delay - (clock.now() - started))

    async def poll_once(self) -> float:
        """One cycle: one ``conversations.history`` call per channel. Returns the delay before
        the next cycle (the interval, or a backoff / Retry-After)."""
        watches = list(self._index)
        floor = clock.wall(min(w.since for w in watches)) - self.config.clock_skew if watches else None
        forced = 0.0
        for name, ch in self._channels.items():
            forced = await self._read(name, ch, floor)
            if forced:  # 429 or an error: the rest of the cycle waits too (Retry-After is per app)
                break
        certs = [c.certified for c in self._channels.values()]
        if forced == 0.0 and all(c is not None for c in certs):
            self.coverage.looked(min(c for c in certs if c is not None))
        return max(self.interval, forced)

    async def _read(self, name: str, ch: _Channel, floor: float | None) -> float:
        if ch.cursor is None:  # a new sweep
            ch.sweep_sent = None
            if floor is not None:
                ch.oldest = max(ch.oldest or floor, floor)
        params: dict[str, Any] = {"channel": name, "limit": self.config.page_size}
        if ch.oldest is not None:
            params["oldest"] = f"{ch.oldest:.6f}"
        if ch.cursor:
            params["cursor"] = ch.cursor
        headers = {"Authorization": f"Bearer {self.config.token.get_secret_value()}"}
        assert self._client is not None
        sent = clock.now()
        self.calls += 1
        try:
            resp, data = await fetch_json(
                self._client,
                "GET",
                f"{self.config.api_url}/conversations.history",
                params=params,
                headers=headers,
                timeout=self.config.timeout,
                max_bytes=MAX_ANSWER,
            )
        except httpx.TimeoutException:
            return self._fail(sent, f"timeout after {self.config.timeout:g}s", None)
        except httpx.HTTPError as exc:
            return self._fail(sent, type(exc).__name__, None)
        except AnswerError as exc:
            return self._fail(sent, exc.why, None)
        received = clock.now()
        if resp.status_code == 429:
            self.rate_limited += 1
            return self._fail(sent, "HTTP 429 (rate limited)", resp.headers.get("Retry-After") or "1")
        if resp.status_code != 200:
            return self._fail(sent, f"HTTP {resp.status_code}", resp.headers.get("Retry-After"))
        if not isinstance(data, dict) or data.get("ok") is not True:
            error = str(data.get("error") if isinstance(data, dict) else "malformed")[:100]
            if error in PERMANENT:
                return self._broke(sent, f"{name}: {error}")
            return self._fail(sent, f"{name}: {error}", "1" if error == "ratelimited" else None)
        # A half answer is no evidence (issue 10.1's rule, for Slack): without a messages list,
        # or with has_more but no cursor to the rest, this read cannot certify the channel.
        messages = data.get("messages")
        meta = data.get("response_metadata")
        cursor = meta.get("next_cursor") if isinstance(meta, dict) and data.get("has_more") else None
        if not isinstance(messages, list):
            return self._fail(sent, f"{name}: answer without a messages list", None)
        if data.get("has_more") and not (isinstance(cursor, str) and cursor):
            return self._fail(sent, f"{name}: has_more without a next_cursor", None)
        if ch.sweep_sent is None:
            ch.sweep_sent = sent
        self._match(name, ch, messages, received)
        if cursor:
            ch.cursor = str(cursor)  # more of this sweep next cycle; nothing certified yet
        else:
            ch.cursor = None
            ch.certified = ch.sweep_sent
            # The next sweep starts just below what this one read, but never above its own
            # start (a message may become visible with a slightly older ts); ``seen`` dedupes.
            if ch.sweep_max_ts:
                ch.oldest = min(ch.sweep_max_ts, clock.wall(ch.sweep_sent) - self.config.clock_skew)
            ch.seen = {ts for ts in ch.seen if ch.oldest is None or float(ts) > ch.oldest}
        self.last_error = None
        self._backoff.reset()
        return 0.0

    def _match(self, name: str, ch: _Channel, messages: list[Any], received: float) -> None:
        for msg in messages:
            ts = msg.get("ts") if isinstance(msg, dict) else None
            stamp = _float(ts) if isinstance(ts, str) else None
            if stamp is None or not math.isfinite(stamp):
                self.malformed_messages += 1  # Slack's ts is always "<epoch>.<micro>"
                continue
            self._thread_activity(name, ch, msg, ts, received)
            if ts in ch.seen:
                continue
            ch.seen.add(ts)
            ch.sweep_max_ts = max(ch.sweep_max_ts, stamp)
            authors = {str(msg[k]) for k in ("user", "bot_id", "app_id") if msg.get(k)}
            parts = {
                "text": msg.get("text") if isinstance(msg.get("text"), str) else "",
                "blocks": "\n".join(strings_in(msg.get("blocks") or [])),
                "attachments": "\n".join(strings_in(msg.get("attachments") or [])),
            }
            for where, text in parts.items():
                for tid in set(TRACE_ID.findall(text.lower())):
                    for w in list(self._index.get(tid)):
                        hop: SlackHop = w.sink_spec
                        if where not in hop.where or (hop.channel is not None and hop.channel != name):
                            continue
                        if hop.authors is not None and not (authors & set(hop.authors)):
                            self.foreign += 1  # the trace id, posted by someone else: no sighting
                            continue
                        not_before = ch.certified if ch.certified is not None else w.since
                        w.observe(
                            Observation(
                                at=received,
                                not_before=min(max(not_before, w.since), received),
                                source="poll",
                                sink_time=stamp,
                                detail={"channel": name, "ts": ts, "where": where, "author": sorted(authors)},
                            )
                        )
                        self._index.discard(w)

    def _thread_activity(
        self, name: str, ch: _Channel, msg: dict[str, Any], ts: str, received: float
    ) -> None:
        """New replies in a thread: ``conversations.history`` returns the parent (with
        ``latest_reply``), never the replies, so a notification posted there cannot be read.
        The time since the reply is ``missed``: a probe not seen then is ``unknown``, not lost."""
        latest = msg.get("latest_reply")
        if not isinstance(latest, str) or ch.threads.get(ts) == latest:
            return
        reply_at = _float(latest)
        if reply_at is None or not math.isfinite(reply_at):
            return
        # The new replies came after the last one noted (or the parent) and up to ``latest``.
        since = _float(ch.threads.get(ts) or ts) or reply_at
        ch.threads[ts] = latest
        while len(ch.threads) > 10_000:
            ch.threads.pop(next(iter(ch.threads)))
        self.unread_threads += 1
        skew = self.config.clock_skew
        self.coverage.missed(
            min(clock.mono_of_wall(since - skew), received),
            min(clock.mono_of_wall(reply_at + skew), received),
            f"{name}: new replies in a thread, which conversations.history does not return",
        )

    def _broke(self, sent: float, error: str) -> float:
        """A setup error (token, scope, membership): every wait ends now with it as the cause
        (``Coverage.broke``); keep looking at the longest backoff, a good read clears it."""
        first = self.coverage.broken is None
        self.failed_calls += 1
        self.last_error = error
        self.coverage.broke(sent, error)
        if first:
            log.error(
                "slack conversations.history refused: %s (hops on this sink are unknown until fixed)", error
            )
        return self._backoff.longest()

    def _fail(self, sent: float, error: str, retry_after: str | None) -> float:
        self.failed_calls += 1
        self.last_error = error
        self.coverage.failed(sent, error)
        delay = self._backoff.next(self.interval, retry_after)
        log.warning("slack conversations.history failed: %s; next try in %.1fs", error, delay)
        return delay


def _float(ts: str) -> float | None:
    try:
        return float(ts)
    except ValueError:
        return None


plugin = SinkPlugin(
    name="slack",
    config=SlackConfig,
    hop=SlackHop,
    factory=SlackCollector,
    summary="a Slack channel's history (conversations.history, bot token), within the rate-limit tier",
)
