"""PostHog collector: one HogQL query per poll cycle covers every in-flight probe of every step.

Why one query: PostHog's query endpoint allows 240/min and 2400/h per team (120/h on older
projects). One query per probe would exhaust that at under one probe per second; one query per
cycle costs the same with one probe in flight or a thousand.

Honesty rules:
- ``"refresh": "force_blocking"`` and a result with ``is_cached: true`` is no evidence.
- A match is placed in ``(previous good look, this response]``: that span is the error bar.
- 429/5xx/timeouts make the collector blind (``Coverage.failed``) and back off, honoring
  ``Retry-After``. Its window query is retroactive: the next good look still finds events that
  arrived while blind, only their timing is uncertain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field, model_validator

from tracer import clock
from tracer.payload import value_at
from tracer.plugins import Collector, Need, PushReceiver, SinkPlugin
from tracer.probe import TRACE_ID
from tracer.schema import Duration, Model, Secret
from tracer.watch import Coverage, Observation, Watch, WatchIndex

log = logging.getLogger(__name__)

_PROPERTY_PATH = r"^[A-Za-z_$][A-Za-z0-9_$]*(\.[A-Za-z_$][A-Za-z0-9_$]*)*$"


class PostHogConfig(Model):
    host: str = Field(
        pattern=r"^https?://", description="app host for the query API, e.g. https://us.posthog.com"
    )
    project_id: str = Field(min_length=1)
    personal_api_key: Secret = Field(description="personal API key with query:read")
    queries_per_minute: int = Field(240, gt=0)
    queries_per_hour: int = Field(2400, gt=0)
    budget_share: float = Field(
        0.5, gt=0, le=1, description="fraction of the rate limit funnel-tracer may use"
    )
    min_interval: Duration = Field(1.0, gt=0)
    max_backoff: Duration = 60.0
    timeout: Duration = 10.0
    clock_skew: Duration = Field(120.0, description="slack around the timestamp window for client clock skew")
    push_path: str | None = Field(
        None,
        pattern=r"^/?[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*/?$",
        description="webhook receiver path a PostHog realtime destination posts to (needs collectors.webhook)",
    )


class PostHogHop(Model):
    event: str = Field(min_length=1)
    property: str = Field("canary_trace_id", pattern=_PROPERTY_PATH, description="event property path")
    match: Literal["equals", "contains"] = "equals"
    value: str = Field("{trace_id}", description="template of the expected property value")

    @model_validator(mode="after")
    def _contains_needs_trace_id(self) -> PostHogHop:
        if self.match == "contains" and "{trace_id}" not in self.value:
            raise ValueError("match: contains needs {trace_id} in value (matches are looked up by trace id)")
        return self


def poll_interval(cfg: PostHogConfig) -> float:
    """Seconds between queries so the budget share is never exceeded, per minute or per hour.

    The interval does not grow with the number of steps or probes: all of them share one query.
    """
    per_s = min(cfg.queries_per_minute / 60.0, cfg.queries_per_hour / 3600.0) * cfg.budget_share
    return max(cfg.min_interval, 1.0 / per_s)


def _lit(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return _lit(f"%{escaped}%")


def build_query(watches: list[Watch], lo_epoch: float, hi_epoch: float) -> tuple[str, dict[str, Any]]:
    """HogQL for every watch, and a lookup from (event, property, value) to the watches.

    Shape (the sandbox's PostHog server answers exactly this subset)::

        SELECT uuid, event, timestamp, created_at, properties.<p0> AS m0, ...,
               properties.traceparent AS traceparent
        FROM events
        WHERE timestamp >= toDateTime('…', 'UTC') AND timestamp <= toDateTime('…', 'UTC')
          AND ((event = '…' AND properties.<p0> IN ('…', …))
            OR (event = '…' AND (properties.<p1> LIKE '%…%' OR …)))
        ORDER BY timestamp ASC
        LIMIT n
    """
    props: dict[str, str] = {}
    groups: dict[tuple[str, str, str], dict[str, list[Watch]]] = {}
    for w in watches:
        hop: PostHogHop = w.sink_spec
        props.setdefault(hop.property, f"m{len(props)}")
        value = str(w.probe.render(hop.value))
        groups.setdefault((hop.event, hop.property, hop.match), {}).setdefault(value, []).append(w)
    clauses = []
    for (event, prop, match), values in groups.items():
        if match == "equals":
            cond = f"properties.{prop} IN ({', '.join(_lit(v) for v in values)})"
        else:
            cond = "(" + " OR ".join(f"properties.{prop} LIKE {_like(v)}" for v in values) + ")"
        clauses.append(f"(event = {_lit(event)} AND {cond})")
    cols = ", ".join(f"properties.{p} AS {alias}" for p, alias in props.items())
    # The emitter's trace context, when it copied one into the event: the hop span links to it.
    cols += ", properties.traceparent AS traceparent"
    limit = min(50_000, max(100, 4 * len(watches)))
    query = (
        f"SELECT uuid, event, timestamp, created_at, {cols} FROM events "
        f"WHERE timestamp >= toDateTime({_lit(_ch_time(lo_epoch))}, 'UTC') "
        f"AND timestamp <= toDateTime({_lit(_ch_time(hi_epoch))}, 'UTC') "
        f"AND ({' OR '.join(clauses)}) ORDER BY timestamp ASC LIMIT {limit}"
    )
    return query, {"props": props, "groups": groups}


def _ch_time(epoch: float) -> str:
    return clock.iso(math.floor(epoch))[:19].replace("T", " ")


class PostHogCollector:
    sink: ClassVar[str] = "posthog"

    def __init__(self, config: PostHogConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.interval = poll_interval(config)
        self.coverage = Coverage(retroactive=True)
        self._index = WatchIndex()
        self._client = client
        self._own_client = client is None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_good_sent: float | None = None
        self.cycles = 0  # poll cycles with something in flight
        self.queries = 0
        self.last_query_bytes = 0
        self.failed_queries = 0
        self.cached_results = 0
        self.last_error: str | None = None
        self.last_cycle_gap = self.interval
        self._backoff = 0.0

    # -- Collector protocol -------------------------------------------------
    @property
    def error_bar(self) -> float:
        return self.last_cycle_gap

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(headers={"User-Agent": "funnel-tracer"})
        # Nothing was in flight before start, so there is nothing to have missed.
        self.coverage.looked(clock.now())
        self._task = asyncio.create_task(self._run(), name="posthog-poller")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._own_client and self._client is not None:
            await self._client.aclose()

    def watch(self, w: Watch) -> None:
        if self.config.push_path:
            w.expect_sources = {"poll", "push"}
        self._index.add(w)
        self._wake.set()

    def unwatch(self, w: Watch) -> None:
        self._index.discard(w)

    def connect(self, others: Mapping[str, Collector]) -> None:
        """With ``push_path``: the webhook receiver hands us what the realtime destination posts."""
        receiver = others.get("webhook")
        if self.config.push_path and isinstance(receiver, PushReceiver):
            receiver.route(self.config.push_path, self.on_push)

    def health(self) -> dict[str, Any]:
        return {
            "up": not self.coverage.blind_now,
            "interval_s": self.interval,
            "queries": self.queries,
            "failed_queries": self.failed_queries,
            "cached_results_ignored": self.cached_results,
            "in_flight": len(self._index),
            "last_error": self.last_error,
        }

    # -- polling ------------------------------------------------------------
    async def _run(self) -> None:
        delay = 0.0
        while True:
            if not len(self._index):
                # Idle: spend no budget. Nothing is in flight, so nothing can be missed.
                self.coverage.looked(clock.now())
                self._wake.clear()
                await self._wake.wait()
                await asyncio.sleep(0.05)  # let a burst of injections register together
            elif delay > 0:
                await asyncio.sleep(delay)
            started = clock.now()
            delay = await self.poll_once()
            if delay is None:
                delay = self.interval
            delay = max(0.0, delay - (clock.now() - started))

    async def poll_once(self) -> float | None:
        """One query for every in-flight watch. Returns a forced delay before the next one
        (backoff) or None for the normal interval."""
        watches = list(self._index)
        if not watches:
            return None
        self.cycles += 1
        now = clock.now()
        lo = clock.wall(min(w.since for w in watches)) - self.config.clock_skew
        hi = clock.wall(now) + self.config.clock_skew
        query, lookup = build_query(watches, lo, hi)
        self.last_query_bytes = len(query)
        url = f"{self.config.host.rstrip('/')}/api/projects/{self.config.project_id}/query/"
        headers = {"Authorization": f"Bearer {self.config.personal_api_key.get_secret_value()}"}
        body = {"query": {"kind": "HogQLQuery", "query": query}, "refresh": "force_blocking"}
        assert self._client is not None
        sent = clock.now()
        self.queries += 1
        try:
            resp = await self._client.post(url, json=body, headers=headers, timeout=self.config.timeout)
        except httpx.TimeoutException:
            return self._fail(sent, f"timeout after {self.config.timeout:g}s", None)
        except httpx.HTTPError as exc:
            return self._fail(sent, f"{type(exc).__name__}", None)
        received = clock.now()
        if resp.status_code == 429 or resp.status_code >= 500:
            return self._fail(sent, f"HTTP {resp.status_code}", resp.headers.get("Retry-After"))
        if resp.status_code != 200:
            # 202 (still running), 400 (query rejected), 401/403 (key): no evidence either way.
            detail = _error_detail(resp)
            return self._fail(sent, f"HTTP {resp.status_code}{': ' + detail if detail else ''}", None)
        try:
            data = resp.json()
        except ValueError:
            return self._fail(sent, "response is not JSON", None)
        if data.get("is_cached"):
            self.cached_results += 1
            return self._fail(sent, "cached result (no evidence)", None)
        if data.get("error"):
            return self._fail(sent, f"query error: {str(data['error'])[:200]}", None)
        self._match(data, lookup, received)
        prev = self._last_good_sent
        self._last_good_sent = sent
        self.last_cycle_gap = (received - prev) if prev is not None else self.interval
        self.last_error = None
        self._backoff = 0.0
        # Everything ingested before the request left is visible in this answer.
        self.coverage.looked(sent)
        return None

    def _match(self, data: dict[str, Any], lookup: dict[str, Any], received: float) -> None:
        columns = data.get("columns") or []
        alias_of = lookup["props"]
        groups = lookup["groups"]
        for row in data.get("results") or []:
            rec = dict(zip(columns, row, strict=False))
            event = rec.get("event")
            for (g_event, prop, match), values in groups.items():
                if g_event != event:
                    continue
                got = rec.get(alias_of[prop])
                if got is None:
                    continue
                got = str(got)
                if match == "equals":
                    hits = values.get(got, [])
                else:  # contains: the value template holds {trace_id}; look the ids up, never scan
                    hits = [
                        w
                        for tid in set(TRACE_ID.findall(got.lower()))
                        for w in self._index.get(tid)
                        if w.sink_spec.event == g_event
                        and w.sink_spec.property == prop
                        and w.sink_spec.match == "contains"
                        and str(w.probe.render(w.sink_spec.value)) in got
                    ]
                for w in hits:
                    self._observe(w, rec, received)

    def _observe(self, w: Watch, rec: dict[str, Any], received: float) -> None:
        not_before = max(w.since, self._last_good_sent if self._last_good_sent is not None else w.since)
        created = clock.parse_iso(str(rec.get("created_at") or ""))
        w.observe(
            Observation(
                at=received,
                not_before=min(not_before, received),
                source="poll",
                sink_time=created,
                detail={
                    "uuid": str(rec.get("uuid")),
                    "event": rec.get("event"),
                    "timestamp": rec.get("timestamp"),
                    "created_at": rec.get("created_at"),
                    **({"traceparent": str(rec["traceparent"])} if rec.get("traceparent") else {}),
                },
            )
        )
        self._forget_if_done(w)

    # -- push: a PostHog realtime destination posting to the webhook receiver ------------
    def on_push(self, body: Any, received: float) -> None:
        """A realtime destination delivered an event (default body ``{"event": {...}, "person":
        {...}}``). Matched like a poll row, found through the trace-id index."""
        event = body.get("event") if isinstance(body, dict) else None
        if not isinstance(event, dict):
            return
        props = event.get("properties") if isinstance(event.get("properties"), dict) else {}
        for w in self._index.in_text(json.dumps(event)):
            hop: PostHogHop = w.sink_spec
            value, want = value_at(props, hop.property), str(w.probe.render(hop.value))
            got = None if value is None else str(value)
            if (
                hop.event != event.get("event")
                or got is None
                or (got != want if hop.match == "equals" else want not in got)
            ):
                continue
            detail = {
                "uuid": event.get("uuid"),
                "event": event.get("event"),
                "timestamp": event.get("timestamp"),
            }
            if props.get("traceparent"):
                detail["traceparent"] = str(props["traceparent"])
            w.observe(
                Observation(
                    at=received,
                    not_before=received,
                    source="push",
                    sink_time=clock.parse_iso(str(event.get("timestamp") or "")),
                    detail=detail,
                )
            )
            self._forget_if_done(w)

    def _forget_if_done(self, w: Watch) -> None:
        """Keep polling for a watch until every expected source saw it, so reports can say which
        of push and poll was first and by how much."""
        if w.expect_sources <= {o.source for o in w.observations}:
            self._index.discard(w)

    def _fail(self, sent: float, error: str, retry_after: str | None) -> float:
        self.failed_queries += 1
        self.last_error = error
        self.coverage.failed(sent)
        self._backoff = min(self.config.max_backoff, max(self.interval, self._backoff * 2 or self.interval))
        delay = self._backoff * (0.8 + 0.4 * random.random())
        if retry_after:
            with contextlib.suppress(ValueError):  # an HTTP-date Retry-After: keep our own backoff
                delay = max(delay, min(float(retry_after), self.config.max_backoff * 5))
        log.warning("posthog query failed: %s; next try in %.1fs", error, delay)
        return delay


def _error_detail(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return ""
    return str(data.get("detail") or data.get("error") or "")[:200] if isinstance(data, dict) else ""


def _needs(config: PostHogConfig) -> list[Need]:
    if config.push_path:
        return [Need("push_path", "webhook", "push needs a 'collectors.webhook' receiver to post to")]
    return []


plugin = SinkPlugin(
    name="posthog",
    config=PostHogConfig,
    hop=PostHogHop,
    factory=PostHogCollector,
    summary="PostHog events, by HogQL query (poll) and optionally a realtime destination (push)",
    needs=_needs,
)
