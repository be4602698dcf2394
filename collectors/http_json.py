"""Any JSON API: a CRM's contact search, an admin or internal events API.

A request template is sent once a cycle; a JMESPath expression (the ``jmespath`` package, the
reference implementation of a specified language) selects the items of the answer; a matcher
finds each in-flight probe's trace id in an item, either in one field (``match.path``, another
JMESPath) or anywhere in the item (any string containing it).

One request covers every probe where the API takes a filter list: the placeholder
``"{trace_ids}"`` (a whole JSON string) becomes the list of in-flight trace ids, or inside a
string (URL, query, header) their comma-joined text; ``max_ids`` splits longer lists over
several requests. ``{since_iso}``, ``{since_ms}`` and ``{since_s}`` give the oldest probe's
start (minus ``clock_skew``) for time-window APIs.

The interval comes from a stated rate budget, as for PostHog: ``requests_per_minute`` x
``budget_share``, never faster than ``min_interval``; the requests of one cycle count against it.

Honesty: ``(not_before, at]`` = (previous good cycle, this answer); ``timestamp`` (a JMESPath to
an ISO-8601 or epoch value) gives the sink's own time. Transport errors, non-2xx answers (a 429
honours ``Retry-After``), non-JSON bodies and a selector that finds no list are
``coverage.failed``, so hops become ``unknown``. ``retroactive`` says whether the API still
returns what arrived while we were blind (a search over stored records: true; a "latest 20
events" feed: false, then a blind window makes a missing probe ``unknown``). Only the first
page is read: filter by trace id, or size ``limit`` to the traffic, so one page holds them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import httpx
import jmespath
from jmespath.exceptions import JMESPathError
from pydantic import Field, field_validator

from tracer import clock
from tracer.evidence import Evidence
from tracer.net import AnswerError, Backoff, fetch_json
from tracer.payload import strings_in
from tracer.plugins import SinkPlugin
from tracer.probe import TRACE_ID
from tracer.schema import Duration, Model, Secret
from tracer.supervise import Supervisor
from tracer.watch import Coverage, Observation, Watch, WatchIndex

log = logging.getLogger(__name__)

IDS = "{trace_ids}"


def _jmespath(v: str | None) -> str | None:
    if v is not None:
        try:
            jmespath.compile(v)
        except JMESPathError as exc:
            raise ValueError(f"not a JMESPath expression: {exc}") from None
    return v


class RequestTemplate(Model):
    method: Literal["GET", "POST", "PUT"] = "GET"
    url: str = Field(min_length=1, description="may hold {trace_ids}, {since_iso}, {since_ms}, {since_s}")
    query: dict[str, str] = Field(default_factory=dict, description="query parameters (placeholders allowed)")
    json_body: Any = Field(
        None, alias="json", description='JSON body; the string "{trace_ids}" becomes a list'
    )

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("url must be an http(s) URL")
        return v


class Matcher(Model):
    path: str | None = Field(
        None, description="JMESPath, within an item, of the field holding the trace id; none: any string"
    )
    mode: Literal["contains", "equals"] = Field("contains", description="equals: the field is the trace id")

    @field_validator("path")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        return _jmespath(v)


class HttpJsonConfig(Model):
    request: RequestTemplate
    bearer: Secret | None = Field(None, description="static bearer token (Authorization: Bearer ...)")
    headers: dict[str, Secret] = Field(default_factory=dict, description="extra headers (values kept secret)")
    items: str = Field("@", description="JMESPath selecting the list of items, e.g. results")
    match: Matcher = Field(default_factory=Matcher)
    timestamp: str | None = Field(None, description="JMESPath, within an item, of the sink's own time")
    retroactive: bool = Field(True, description="does a later request still return what arrived while blind?")
    requests_per_minute: float = Field(60, gt=0, description="the API's rate limit")
    budget_share: float = Field(0.5, gt=0, le=1, description="fraction of it this tracer may use")
    min_interval: Duration = Field(1.0, gt=0)
    max_ids: int = Field(100, ge=1, description="trace ids per request (the API's filter-list limit)")
    clock_skew: Duration = Field(2.0, ge=0)
    timeout: Duration = Field(10.0, gt=0, description="for the whole answer, not each read")
    max_backoff: Duration = Field(60.0, gt=0)
    max_bytes: int = Field(16 * 1024 * 1024, gt=0, description="a larger answer is no evidence (blind)")

    @field_validator("items", "timestamp")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        return _jmespath(v)


class HttpJsonHop(Model):
    """Nothing to say per hop: the sink's matcher finds the probe's trace id."""


def poll_interval(cfg: HttpJsonConfig, requests_per_cycle: int = 1) -> float:
    """Seconds between cycles so the budget share is never exceeded."""
    per_request = 60.0 / (cfg.requests_per_minute * cfg.budget_share)
    return max(cfg.min_interval, per_request * requests_per_cycle)


def render(template: Any, ids: list[str], since: float) -> Any:
    """Fill the placeholders in a request template (strings, lists and dicts, recursively)."""
    iso = clock.iso(since)
    subs = {
        IDS: ",".join(ids),
        "{since_iso}": iso,
        "{since_ms}": str(int(since * 1000)),
        "{since_s}": str(int(since)),
    }
    if isinstance(template, str):
        if template == IDS:
            return list(ids)
        for k, v in subs.items():
            template = template.replace(k, v)
        return template
    if isinstance(template, list):
        out: list[Any] = []
        for item in template:
            value = render(item, ids, since)
            # ["{trace_ids}"] is a list of ids, not a list holding a list
            out.extend(value) if item == IDS else out.append(value)
        return out
    if isinstance(template, dict):
        return {k: render(v, ids, since) for k, v in template.items()}
    return template


def _epoch(value: Any) -> float | None:
    """Epoch seconds from seconds, ms, µs or ns (told apart by size: every unit's present-day
    value is 1,000 times the previous one's), or ISO-8601; None for what is no time."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return None
        seconds = float(value)
        for _ in range(3):  # ms, µs, ns
            if seconds <= 1e11:  # up to year 5138 in seconds
                break
            seconds /= 1000.0
        return seconds if 0 < seconds <= 1e11 else None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return _epoch(float(value))
        return clock.parse_iso(value)
    return None


@dataclass(frozen=True)
class Answer:
    """One good answer, for ``explain``: when, how many items, how many had ``match.path``."""

    at: float
    items: int
    with_path: int


class HttpJsonCollector:
    sink: ClassVar[str] = "http_json"

    def __init__(self, config: HttpJsonConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.coverage = Coverage(retroactive=config.retroactive)
        self._supervisor = Supervisor("http-json-poller", self.coverage)
        self.interval = poll_interval(config)
        self._items = jmespath.compile(config.items)
        self._path = jmespath.compile(config.match.path) if config.match.path else None
        self._ts = jmespath.compile(config.timestamp) if config.timestamp else None
        self._index = WatchIndex()
        self._client = client
        self._own_client = client is None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_good_sent: float | None = None
        self._backoff = Backoff(config.max_backoff)
        self.answers: deque[Answer] = deque(maxlen=512)
        self.requests = 0
        self.failed_requests = 0
        self.last_error: str | None = None

    # -- Collector protocol -------------------------------------------------
    @property
    def error_bar(self) -> float:
        return self.interval

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(headers={"User-Agent": "funnel-tracer"})
        self.coverage.looked(clock.now())
        self._task = self._supervisor.start(self._run)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._own_client and self._client is not None:
            await self._client.aclose()

    def watch(self, w: Watch) -> None:
        self._index.add(w)
        self._wake.set()

    def unwatch(self, w: Watch) -> None:
        self._index.discard(w)

    def health(self) -> dict[str, Any]:
        return {
            "up": not self.coverage.blind_now,
            "interval_s": self.interval,
            "requests": self.requests,
            "failed_requests": self.failed_requests,
            "internal_errors": self._supervisor.crashes,
            "in_flight": len(self._index),
            "last_error": self.last_error,
        }

    # -- polling ------------------------------------------------------------
    async def _run(self) -> None:
        delay = 0.0
        while True:
            if not len(self._index):
                self.coverage.looked(clock.now())
                self._wake.clear()
                await self._wake.wait()
                await asyncio.sleep(0.05)
            elif delay > 0:
                await asyncio.sleep(delay)
            started = clock.now()
            delay = await self.poll_once()
            delay = max(0.0, delay - (clock.now() - started))

    def _uses_ids(self) -> bool:
        r = self.config.request
        return IDS in json.dumps([r.url, r.query, r.json_body])

    async def poll_once(self) -> float:
        """One cycle: one request (or one per ``max_ids`` trace ids). Returns the next delay."""
        watches = list(self._index)
        if not watches:
            return self.interval
        ids = self._index.trace_ids()
        chunks = (
            [ids[i : i + self.config.max_ids] for i in range(0, len(ids), self.config.max_ids)]
            if self._uses_ids()
            else [ids]
        )
        since = clock.wall(min(w.since for w in watches)) - self.config.clock_skew
        cycle_sent: float | None = None
        for chunk in chunks:
            sent, forced = await self._request(chunk, since)
            if forced:
                return forced
            cycle_sent = sent if cycle_sent is None else cycle_sent
        assert cycle_sent is not None
        self._last_good_sent = cycle_sent
        self.last_error = None
        self._backoff.reset()
        self.coverage.looked(cycle_sent)  # everything stored before the cycle began was returned
        return poll_interval(self.config, len(chunks))

    async def _request(self, ids: list[str], since: float) -> tuple[float, float]:
        r = self.config.request
        headers = {k: v.get_secret_value() for k, v in self.config.headers.items()}
        if self.config.bearer is not None:
            headers["Authorization"] = f"Bearer {self.config.bearer.get_secret_value()}"
        kwargs: dict[str, Any] = {"params": render(r.query, ids, since), "headers": headers}
        if r.json_body is not None:
            kwargs["json"] = render(r.json_body, ids, since)
        assert self._client is not None
        sent = clock.now()
        self.requests += 1
        try:
            resp, data = await fetch_json(
                self._client,
                r.method,
                render(r.url, ids, since),
                timeout=self.config.timeout,
                max_bytes=self.config.max_bytes,
                **kwargs,
            )
        except httpx.TimeoutException:
            return sent, self._fail(sent, f"timeout after {self.config.timeout:g}s", None)
        except httpx.HTTPError as exc:
            return sent, self._fail(sent, type(exc).__name__, None)
        except AnswerError as exc:
            return sent, self._fail(sent, exc.why, None)
        received = clock.now()
        if resp.status_code in (401, 403):
            return sent, self._broke(sent, f"HTTP {resp.status_code}")
        if not 200 <= resp.status_code < 300:
            retry = resp.headers.get("Retry-After") if resp.status_code in (429, 503) else None
            return sent, self._fail(
                sent, f"HTTP {resp.status_code}", retry or ("1" if resp.status_code == 429 else None)
            )
        try:
            # Off the loop: a 10 MB answer of 100,000 items costs a second of selecting and
            # scanning, which must not stall every other collector.
            items, hits, with_path = await asyncio.to_thread(self._select, data)
        except (JMESPathError, RecursionError, TypeError, ValueError) as exc:
            return sent, self._fail(sent, f"items ({self.config.items}) failed: {type(exc).__name__}", None)
        if not isinstance(items, list):
            return sent, self._fail(sent, f"items ({self.config.items}) selected no list", None)
        self.answers.append(Answer(received, len(items), with_path))
        for i, tids in hits:
            for tid in tids:
                for w in list(self._index.get(tid)):
                    self._observe(w, items[i], received)
        return sent, 0.0

    def _select(self, data: Any) -> tuple[Any, list[tuple[int, set[str]]], int]:
        """In a worker thread (pure: no watch is touched): the items, the trace ids each one
        carries where the matcher looks, and how many items have ``match.path`` at all."""
        items = self._items.search(data)
        if not isinstance(items, list):
            return items, [], 0
        equals = self.config.match.mode == "equals"
        hits: list[tuple[int, set[str]]] = []
        with_path = 0
        for i, item in enumerate(items):
            if self._path is not None:
                value = self._path.search(item)
                with_path += value is not None
                texts = (
                    [value]
                    if isinstance(value, str)
                    else [s for s in strings_in(value) if isinstance(s, str)]
                )
            else:
                texts = list(strings_in(item))
            tids: set[str] = set()
            for text in texts:
                tids.update([text.lower()] if equals else TRACE_ID.findall(text.lower()))
            if tids:
                hits.append((i, tids))
        return items, hits, with_path

    async def explain(self, w: Watch, start: float, end: float, base: Evidence) -> Evidence:
        """What the API answered in the hop's window, so an empty answer (nothing there, or a
        filter that finds nothing), a ``match.path`` that selects nothing (a typo) and records
        without the trace id read differently from an outage (which ``base.blind`` shows)."""
        got = [a for a in self.answers if start <= a.at <= end]
        items = max((a.items for a in got), default=0)
        found: dict[str, Any] = {"answers": len(got), "most_items": items}
        base.near_misses, base.found = items, found
        path = self.config.match.path
        if not got:
            base.summary = "no answer was read in the window"
        elif not items:
            base.summary = (
                f"the API answered {len(got)} time(s), always an empty list at items ({self.config.items})"
            )
            base.hint = (
                "Nothing came back: does the request's filter find the probe's record, and does "
                "items select the list the API returns?"
            )
        elif path is not None and not any(a.with_path for a in got):
            found["items_with_match_path"] = 0
            base.summary = f"the answers held up to {items} item(s), none with a value at match.path ({path})"
            base.hint = f"Check match.path: {path} selects nothing in the items the API returns."
        else:
            base.summary = f"the answers held up to {items} item(s), none carrying the trace id"
        return base

    def _observe(self, w: Watch, item: Any, received: float) -> None:
        not_before = max(w.since, self._last_good_sent if self._last_good_sent is not None else w.since)
        sink_time = _epoch(self._ts.search(item)) if self._ts is not None else None
        detail: dict[str, Any] = {}
        if isinstance(item, dict) and item.get("id") is not None:
            detail["id"] = str(item["id"])[:100]
        w.observe(
            Observation(
                at=received,
                not_before=min(not_before, received),
                source="poll",
                sink_time=sink_time,
                detail=detail,
            )
        )
        self._index.discard(w)

    def _broke(self, sent: float, error: str) -> float:
        """The credentials are refused (401/403): every wait ends now with it as the cause
        (``Coverage.broke``); keep asking at the longest backoff, a good answer clears it."""
        first = self.coverage.broken is None
        self.failed_requests += 1
        self.last_error = error
        self.coverage.broke(sent, error)
        if first:
            log.error("http_json request refused: %s (hops on this sink are unknown until fixed)", error)
        return self._backoff.longest()

    def _fail(self, sent: float, error: str, retry_after: str | None) -> float:
        self.failed_requests += 1
        self.last_error = error
        self.coverage.failed(sent, error)
        delay = self._backoff.next(self.interval, retry_after)
        log.warning("http_json request failed: %s; next try in %.1fs", error, delay)
        return delay


plugin = SinkPlugin(
    name="http_json",
    config=HttpJsonConfig,
    hop=HttpJsonHop,
    factory=HttpJsonCollector,
    summary="any JSON API (a CRM search, an events API): request template, JMESPath items and matcher",
)
