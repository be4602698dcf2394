"""PostHog collector: one HogQL query per poll cycle covers every in-flight probe of every step.

Why one query: PostHog's query endpoint allows 240/min and 2400/h per team (120/h on older
projects). One query per probe would exhaust that at under one probe per second; one query per
cycle costs the same with one probe in flight or a thousand.

Honesty rules:
- ``"refresh": "force_blocking"`` and a result with ``is_cached: true`` is no evidence.
- A match is placed in ``(previous good look, this response]``: that span is the error bar.
- 429/5xx/timeouts make the collector blind (``Coverage.failed`` with why) and back off, honoring
  ``Retry-After``. 400/401/403/404 (query rejected, key or scope, project) are permanent: the
  collector is broken (``Coverage.broke``) so waits end at once with the cause; it keeps looking
  at its longest backoff, and a later good look clears it. Its window query is retroactive: the next good look still finds events that
  arrived while blind, only their timing is uncertain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import Field, field_validator, model_validator

from tracer import clock
from tracer.evidence import Evidence, excerpt
from tracer.net import Backoff, redact_url
from tracer.payload import value_at
from tracer.plugins import Collector, Finding, Need, PushReceiver, SinkPlugin
from tracer.schema import Duration, Model, Secret
from tracer.watch import Coverage, Observation, Watch, WatchIndex

log = logging.getLogger(__name__)

_PATH = r"[A-Za-z_$][A-Za-z0-9_$]*(\.[A-Za-z_$][A-Za-z0-9_$]*)*"
_PROPERTY_PATH = f"^{_PATH}$"
_FIELD = f"^(distinct_id|uuid|(person\\.)?properties\\.{_PATH})$"


class PostHogConfig(Model):
    host: str = Field(
        pattern=r"^https?://", description="app host for the query API, e.g. https://us.posthog.com"
    )
    project_id: str = Field(
        pattern=r"^[A-Za-z0-9@_-]+$", description="the project's id (the number in its URL), or @current"
    )
    personal_api_key: Secret = Field(description="personal API key with query:read")
    queries_per_minute: int = Field(240, gt=0)
    queries_per_hour: int = Field(2400, gt=0)
    budget_share: float = Field(
        0.5, gt=0, le=1, description="fraction of the rate limit funnel-tracer may use"
    )
    min_interval: Duration = Field(1.0, gt=0)
    max_backoff: Duration = 60.0
    timeout: Duration = 10.0
    max_rows: int = Field(50_000, ge=100, le=50_000, description="the largest LIMIT PostHog serves")
    clock_skew: Duration = Field(120.0, description="slack around the timestamp window for client clock skew")
    push_path: str | None = Field(
        None,
        pattern=r"^/?[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*/?$",
        description="webhook receiver path a PostHog realtime destination posts to (needs collectors.webhook)",
    )

    @field_validator("host")
    @classmethod
    def _plain_host(cls, v: str) -> str:
        """A host is scheme, host, port and an optional path prefix: no query, fragment or
        credentials (they would end up in the query URL, and credentials in what doctor prints)."""
        p = urlsplit(v)
        if not p.hostname or p.query or p.fragment or "?" in v or "#" in v or p.username or p.password:
            raise ValueError("must be scheme://host[:port][/path], without credentials, query or fragment")
        return v

    @field_validator("personal_api_key")
    @classmethod
    def _header_safe_key(cls, v: Secret) -> Secret:
        """A key read from a file or an environment variable often ends in a newline: surrounding
        whitespace is dropped. Anything else that cannot go in an HTTP header is a setup error here,
        not a failed look on every poll (the key itself is never echoed)."""
        key = v.get_secret_value().strip()
        if not key or not all(33 <= ord(c) < 127 for c in key):
            raise ValueError("must be printable ASCII without spaces (a stray character in the secret?)")
        return Secret(key)


class PostHogHop(Model):
    event: str = Field(min_length=1)
    property: str | None = Field(
        "canary_trace_id", pattern=_PROPERTY_PATH, description="event property path (inside properties)"
    )
    field: str | None = Field(
        None,
        pattern=_FIELD,
        description="what to match instead of `property`: distinct_id, uuid, properties.<path> "
        "or person.properties.<path>",
    )
    match: Literal["equals", "contains"] = "equals"
    value: str = Field("{trace_id}", description="template of the expected property value")

    @model_validator(mode="before")
    @classmethod
    def _one_of_field_and_property(cls, data: Any) -> Any:
        """``field`` replaces ``property``: both is an error; with ``field`` the default property
        is dropped, so what was searched for (evidence) names only the field."""
        if isinstance(data, dict) and data.get("field") is not None:
            if data.get("property") is not None:
                raise ValueError("give either field or property, not both")
            data = {**data, "property": None}
        return data

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


_REQUIRED_COLUMNS = ("uuid", "event", "timestamp", "created_at")  # of a poll answer
PERMANENT = frozenset({400, 401, 403, 404})  # query rejected, key or scope, project: setup errors
MAX_ROWS = 50_000  # PostHog's largest LIMIT
MAX_BODY = 64 << 20  # decoded bytes of one answer; 50,000 rows of the poll's columns are ~15 MB
# ... and at most 1 MB + ROW_BYTES per row its LIMIT allows: parsing holds the GIL (the event
# loop with it, even off-thread), so an answer far larger than its LIMIT is cut unread.
ROW_BYTES = 16 << 10
MAX_PAGES = 4  # extra looks per cycle when an answer is truncated, before giving up (blind)
_HEX_RUN = re.compile(r"[0-9a-f]{32,}")
_SEPARATORS = ",|;~^# \t"  # splitByChar needs one character absent from every value


def _lit(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def raw_json_text(value: str) -> str:
    """A string as PostHog compares it: the property's raw JSON text without the outer quotes
    (``JSONExtractRaw``), so a quote, backslash or newline stays escaped."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def property_field(path: str) -> str:
    """``properties.<path>`` with every segment back-quoted: valid HogQL for any segment,
    including keywords such as ``null`` that are syntax errors unquoted."""
    quoted = ("`" + seg.replace("\\", "\\\\").replace("`", "\\`") + "`" for seg in path.split("."))
    return "properties." + ".".join(quoted)


@dataclass(frozen=True)
class HopField:
    """What a hop matches on: its HogQL expression, its name as the user wrote it, and whether
    PostHog compares it as a property's raw JSON text (properties) or as a plain string."""

    expr: str
    name: str
    raw_json: bool

    def text(self, value: str) -> str:
        """``value`` as PostHog returns this field."""
        return raw_json_text(value) if self.raw_json else value


def hop_field(hop: PostHogHop) -> HopField:
    name = hop.field or f"properties.{hop.property}"
    if name == "distinct_id":
        return HopField("distinct_id", name, False)
    if name == "uuid":
        return HopField("toString(uuid)", name, False)
    if name.startswith("person."):
        return HopField("person." + property_field(name.removeprefix("person.properties.")), name, True)
    return HopField(property_field(name.removeprefix("properties.")), name, True)


def field_value(hop: PostHogHop, event: Mapping[str, Any], person: Mapping[str, Any]) -> Any:
    """The hop's field in a pushed event (a realtime destination's ``event`` and ``person``)."""
    name = hop.field or f"properties.{hop.property}"
    if name in ("distinct_id", "uuid"):
        return event.get(name)
    if name.startswith("person."):
        props = person.get("properties") if isinstance(person.get("properties"), dict) else {}
        return value_at(props, name.removeprefix("person.properties."))
    props = event.get("properties") if isinstance(event.get("properties"), dict) else {}
    return value_at(props, name.removeprefix("properties."))


def _one_of(values: list[str], expr: str) -> str:
    """``expr`` is one of ``values``, as one string constant split once by PostHog: parse time and
    query size stay flat in the number of values (an IN list of 10,000 literals takes seconds)."""
    sep = next((c for c in _SEPARATORS if not any(c in v for v in values)), None)
    if sep is None:
        return f"{expr} IN ({', '.join(_lit(v) for v in values)})"
    return f"has(splitByChar({_lit(sep)}, {_lit(sep.join(values))}), {expr})"


def _contains_trace_id(trace_ids: list[str], field: str) -> str:
    """The property holds one of ``trace_ids``: every 32-character window of every hex run of
    its lower-cased text is looked up, so hex characters next to the id do not hide it."""
    windows = "arrayExists(k -> " + _one_of(trace_ids, "substring(r, k, 32)") + ", range(1, length(r) - 30))"
    return f"arrayExists(r -> {windows}, extractAll(lower({field}), '[0-9a-f]{{32,}}'))"


def trace_id_windows(text: str) -> set[str]:
    """Every 32-hex-character window of ``text`` (lower-cased): the trace ids it may hold."""
    low = text.lower()
    return {m.group()[i : i + 32] for m in _HEX_RUN.finditer(low) for i in range(len(m.group()) - 31)}


WINDOW_SCAN = 4096  # hex windows in one value past which each id in flight is searched for
FIND_IDS = 2000  # ... unless more ids than this are in flight (then the windows are cheaper)


def trace_ids_in(text: str, in_flight: Callable[[], list[str]]) -> set[str]:
    """Trace ids ``text`` may hold, as ``trace_id_windows`` finds them, at a bounded cost: a long
    hex run (a hex blob, or a hostile answer) has a window per character, a million per MB and
    a second of the event loop; there each id in flight is searched for instead (C speed)."""
    low = text.lower()
    runs = [m.group() for m in _HEX_RUN.finditer(low)]
    if sum(len(r) - 31 for r in runs) <= WINDOW_SCAN:
        return {r[i : i + 32] for r in runs for i in range(len(r) - 31)}
    ids = in_flight()
    if len(ids) > FIND_IDS:
        return {r[i : i + 32] for r in runs for i in range(len(r) - 31)}
    return {tid for tid in ids if any(tid in r for r in runs)}


def build_query(
    watches: list[Watch],
    lo_epoch: float,
    hi_epoch: float,
    limit: int | None = None,
    max_rows: int = MAX_ROWS,
) -> tuple[str, dict[str, Any]]:
    """HogQL for every watch, and a lookup from (event, property, raw value) to the watches.

    Shape (the sandbox's PostHog server parses it with PostHog's own parser)::

        SELECT uuid, event, timestamp, created_at, properties.`p0` AS m0, ...,
               properties.`traceparent` AS traceparent
        FROM events
        WHERE timestamp >= toDateTime('…', 'UTC') AND timestamp <= toDateTime('…', 'UTC')
          AND ((event = '…' AND has(splitByChar(',', 'v1,v2,…'), properties.`p0`))
            OR (event = '…' AND arrayExists(r -> arrayExists(k -> has(splitByChar(',', 'id1,…'),
                   substring(r, k, 32)), range(1, length(r) - 30)),
                   extractAll(lower(properties.`p1`), '[0-9a-f]{32,}'))))
        ORDER BY timestamp ASC
        LIMIT n

    ``equals`` values are compared on PostHog's raw JSON text of the property; ``contains``
    narrows by trace id in the query and the collector then checks the rendered value.
    """
    props: dict[str, str] = {}
    groups: dict[tuple[str, str, str], dict[str, list[Watch]]] = {}
    for w in watches:
        hop: PostHogHop = w.sink_spec
        f = hop_field(hop)
        props.setdefault(f.expr, f"m{len(props)}")
        value = f.text(str(w.probe.render(hop.value)))
        groups.setdefault((hop.event, f.expr, hop.match), {}).setdefault(value, []).append(w)
    clauses = []
    for (event, field, match), values in groups.items():
        if match == "equals":
            cond = _one_of(list(values), field)
        else:
            ids = sorted({w.trace_id for ws in values.values() for w in ws})
            cond = _contains_trace_id(ids, field)
        clauses.append(f"(event = {_lit(event)} AND {cond})")
    cols = ", ".join(f"{expr} AS {alias}" for expr, alias in props.items())
    # The emitter's trace context, when it copied one into the event: the hop span links to it.
    cols += f", {property_field('traceparent')} AS traceparent"
    if limit is None:
        limit = min(max_rows, max(100, 4 * len(watches)))
    query = (
        f"SELECT uuid, event, timestamp, created_at, {cols} FROM events "
        f"WHERE timestamp >= toDateTime({_lit(_ch_time(lo_epoch))}, 'UTC') "
        f"AND timestamp <= toDateTime({_lit(_ch_time(hi_epoch))}, 'UTC') "
        f"AND ({' OR '.join(clauses)}) ORDER BY timestamp ASC LIMIT {limit}"
    )
    return query, {"props": props, "groups": groups, "limit": limit}


# Good looks further apart than SLOW_GAP x interval + SLOW_SLACK seconds leave a blind gap:
# the slack absorbs event-loop jitter on a loaded host, so only real slowness counts.
SLOW_GAP, SLOW_SLACK = 2.0, 1.0
EXPLAIN_BATCH = 40  # near-miss lookups answered by one query; the rest wait for the next cycle
EXPLAIN_WAIT = 12.0  # how long explain() waits for its batch (the engine gives it 15 s)
# Near-miss counts look a little past the hop's window for an emitter's clock skew: 1 s before the
# injection (its event cannot really precede it), 5 s after the end.
EXPLAIN_SLACK = (1.0, 5.0)
SAMPLE_VALUES = 5


@dataclass
class _Ask:
    """One pending near-miss lookup: an event name, the field it was matched on, a window."""

    event: str
    field: str  # HogQL expression
    match: str  # HogQL condition that the probe's own event meets
    lo: int
    hi: int
    answer: asyncio.Future[dict[str, Any] | str] = dc_field(repr=False)


def build_explain_query(asks: list[_Ask]) -> str:
    """One grouped HogQL query for every pending near-miss lookup::

        SELECT event,
               countIf(W0) AS n0,                          -- events of that name in the window
               countIf(W0 AND isNull(F0)) AS z0,           -- ... with the field null or missing
               countIf(W0 AND M0) AS h0,                   -- ... that match the probe (arrived late)
               groupUniqArrayIf(5)(toString(F0), W0 AND isNotNull(F0)) AS v0,   -- a few values
               ...
        FROM events WHERE timestamp >= … AND timestamp <= … AND event IN (…) GROUP BY event

    One query whatever the number of lost probes: near misses fit PostHog's query budget."""
    cols = ["event"]
    for i, a in enumerate(asks):
        win = (
            f"timestamp >= toDateTime({_lit(_ch_time(a.lo))}, 'UTC') "
            f"AND timestamp <= toDateTime({_lit(_ch_time(a.hi))}, 'UTC')"
        )
        cols += [
            f"countIf({win}) AS n{i}",
            f"countIf({win} AND isNull({a.field})) AS z{i}",
            f"countIf({win} AND {a.match}) AS h{i}",
            f"groupUniqArrayIf({SAMPLE_VALUES})(toString({a.field}), {win} AND isNotNull({a.field})) AS v{i}",
        ]
    events = ", ".join(_lit(e) for e in sorted({a.event for a in asks}))
    lo, hi = min(a.lo for a in asks), max(a.hi for a in asks)
    return (
        f"SELECT {', '.join(cols)} FROM events "
        f"WHERE timestamp >= toDateTime({_lit(_ch_time(lo))}, 'UTC') "
        f"AND timestamp <= toDateTime({_lit(_ch_time(hi))}, 'UTC') "
        f"AND event IN ({events}) GROUP BY event LIMIT {len(asks) + 1}"
    )


def _trim(text: str, trace_id: str, limit: int = 40) -> str:
    text = text.replace(trace_id, trace_id[:4] + "…")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ch_time(epoch: float) -> str:
    return clock.iso(math.floor(epoch))[:19].replace("T", " ")


def new_client(agent: str) -> httpx.AsyncClient:
    """The query client: one connection per look, never reused. A server or proxy that writes
    more than one response leaves the extra bytes in a reused connection's buffer, and the next
    look would read them as its own answer (an answer to no request, maybe with rows). A look
    every few seconds can afford its handshake."""
    return httpx.AsyncClient(headers={"User-Agent": agent}, limits=httpx.Limits(max_keepalive_connections=0))


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
        self._backoff = Backoff(config.max_backoff)
        self._retry_after: str | None = None
        self._permanent = False  # the last failed answer was a setup error (see PERMANENT)
        self.malformed_answers = 0  # 200s that were not a complete result set
        self.truncated_answers = 0  # answers cut by their LIMIT (looked at again)
        self.internal_errors = 0  # unexpected exceptions caught by the poll loop
        self.slow_gaps = 0  # gaps between good looks marked blind (see _slow_gap)
        self._crash_kinds: set[str] = set()
        self._asks: list[_Ask] = []  # near-miss lookups for the next cycle (see explain)
        self.explain_queries = 0

    # -- Collector protocol -------------------------------------------------
    @property
    def error_bar(self) -> float:
        return self.last_cycle_gap

    async def start(self) -> None:
        if self._client is None:
            self._client = new_client("funnel-tracer")
        # Nothing was in flight before start, so there is nothing to have missed.
        self.coverage.looked(clock.now())
        self._task = asyncio.create_task(self._supervise(), name="posthog-poller")

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
            "broken": self.coverage.broken,
            "interval_s": self.interval,
            "queries": self.queries,
            "failed_queries": self.failed_queries,
            "cached_results_ignored": self.cached_results,
            "malformed_answers": self.malformed_answers,
            "truncated_answers": self.truncated_answers,
            "internal_errors": self.internal_errors,
            "slow_gaps": self.slow_gaps,
            "in_flight": len(self._index),
            "last_error": self.last_error,
        }

    # -- polling ------------------------------------------------------------
    async def _supervise(self) -> None:
        """The poller never dies silently: whatever escapes a cycle is counted, makes the collector
        blind (so hops read ``unknown``, never ``lost``) and the loop starts again after a backoff."""
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await asyncio.sleep(self._crash(exc))

    async def _run(self) -> None:
        delay = 0.0
        while True:
            if not len(self._index) and not self._asks:
                # Idle: spend no budget. Nothing is in flight, so nothing can be missed.
                self.coverage.looked(clock.now())
                self._last_good_sent = None  # an idle spell is no gap between looks
                self._wake.clear()
                await self._wake.wait()
                await asyncio.sleep(0.05)  # let a burst of injections register together
            elif delay > 0:
                await asyncio.sleep(delay)
            started = clock.now()
            try:
                delay = await self.poll_once()
                if self._asks:  # at most one extra query per cycle, for every pending lookup
                    await self._explain_batch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self._crash(exc)
            if delay is None:
                delay = self.interval
            delay = max(0.0, delay - (clock.now() - started))

    def _crash(self, exc: Exception) -> float:
        """An unexpected error in a cycle: blind from now, logged once per kind, counted."""
        kind = type(exc).__name__
        self.internal_errors += 1
        if kind not in self._crash_kinds:
            self._crash_kinds.add(kind)
            log.error("posthog poller: unexpected %s (blind until the next good look)", kind, exc_info=exc)
        return self._fail(clock.now(), f"internal error: {kind}", None, quiet=True)

    async def poll_once(self) -> float | None:
        """One look for every in-flight watch. Returns a forced delay before the next one
        (backoff) or None for the normal interval.

        A look certifies the window only when the answer is a complete result set that was not
        cut by its LIMIT; a truncated answer is looked at again with a higher LIMIT, then with the
        window narrowed past the rows already seen (keyset on ``timestamp``)."""
        watches = list(self._index)
        if not watches:
            return None
        self.cycles += 1
        now = clock.now()
        lo = clock.wall(min(w.since for w in watches)) - self.config.clock_skew
        # The future bound only has to cover clock skew; rounded up to 10 s, the query text stays
        # the same between changes of the watch set, so the server parses one text, not one a second.
        hi = math.ceil((clock.wall(now) + self.config.clock_skew) / 10) * 10
        limit: int | None = None
        first_sent: float | None = None
        received = now
        was_blind = self.coverage.blind_now
        for page in range(MAX_PAGES + 1):
            query, lookup = build_query(watches, lo, hi, limit, self.config.max_rows)
            limit = lookup["limit"]
            sent = clock.now()
            first_sent = sent if first_sent is None else first_sent
            # Every column asked for must be there: a row without its matched column cannot
            # say the probe is absent.
            columns = (*_REQUIRED_COLUMNS, *lookup["props"].values(), "traceparent")
            data = await self._ask(query, columns, limit)
            if isinstance(data, str):
                if self._permanent:
                    return self._broke(first_sent, data)
                return self._fail(first_sent, data, self._retry_after)
            received = clock.now()
            if page == 0 and not was_blind:
                self._slow_gap(first_sent)  # before any sighting it may widen is judged
            self._match(data, lookup, received)  # rows seen are real sightings, cut or not
            if not self._truncated(data, limit):
                break
            self.truncated_answers += 1
            last = _last_in_order(data, hi)
            if isinstance(last, str):
                return self._fail(first_sent, last, None)
            if page == MAX_PAGES:
                return self._fail(first_sent, f"truncated answer after {page + 1} looks", None)
            if limit < self.config.max_rows:
                limit = min(self.config.max_rows, limit * 8)
            elif math.floor(last) > lo:
                lo = math.floor(last)  # rows before this second are all seen; ties are looked at again
            else:
                return self._fail(first_sent, f"truncated answer: over {limit} rows in one second", None)
        prev = self._last_good_sent
        self._last_good_sent = first_sent
        self.last_cycle_gap = (received - prev) if prev is not None else self.interval
        self.last_error = None
        self._backoff.reset()
        # Everything ingested before the first request left is visible in these answers.
        self.coverage.looked(first_sent)
        return None

    def _slow_gap(self, sent: float) -> None:
        """Looks further apart than the cadence promises (slow answers hold the next look back)
        leave a gap the error bar alone would blame on the funnel: a lag that straddles the
        target across it is the tracer's doing, so the gap is marked blind (``unknown``)."""
        prev = self._last_good_sent
        if prev is not None and sent - prev > SLOW_GAP * self.interval + SLOW_SLACK:
            self.slow_gaps += 1
            self.coverage.mark_blind(
                prev, sent, f"slow answers: looks {sent - prev:.1f}s apart, {self.interval:g}s expected"
            )

    @staticmethod
    def _truncated(data: dict[str, Any], limit: int) -> bool:
        return len(data["results"]) >= limit or data.get("hasMore") is True

    async def _ask(
        self, query: str, required: tuple[str, ...] = _REQUIRED_COLUMNS, rows: int | None = None
    ) -> dict[str, Any] | str:
        """One query; a complete result set, or why this answer is no evidence."""
        url = f"{self.config.host.rstrip('/')}/api/projects/{self.config.project_id}/query/"
        body = {"query": {"kind": "HogQLQuery", "query": query}, "refresh": "force_blocking"}
        assert self._client is not None
        sent = clock.wall(clock.now())
        self.last_query_bytes = len(query)
        self.queries += 1
        self._retry_after = None
        self._permanent = False
        self.last_status: int | None = None
        try:
            # One deadline for the whole answer: httpx's timeout is per read, so a body that
            # trickles a byte at a time would otherwise hold the poller for ever.
            cap = MAX_BODY if rows is None else min(MAX_BODY, (1 << 20) + rows * ROW_BYTES)
            got = await asyncio.wait_for(self._post(url, body, cap), self.config.timeout)
        except asyncio.TimeoutError:
            return f"timeout after {self.config.timeout:g}s"
        except httpx.TimeoutException:
            return f"timeout after {self.config.timeout:g}s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}"
        if isinstance(got, str):
            return got
        status, headers, raw = got
        self.last_status = status
        if status == 429 or status >= 500:
            self._retry_after = headers.get("Retry-After")
            return f"HTTP {status}"
        if 300 <= status < 400:
            # The query API never redirects: the host (or its scheme) is wrong. Never followed,
            # the key stays with the host configured; a setup error like a 404.
            self._permanent = True
            where = headers.get("Location") or ""
            where = redact_url(where) if urlsplit(where).hostname else self._scrub(where)[:100]
            return f"HTTP {status}: redirected{' to ' + where if where else ''}"
        if status != 200:
            # 202 (still running): no evidence; 400/401/403/404: a setup error, no look will succeed.
            self._permanent = status in PERMANENT
            detail = self._scrub(_error_detail(raw))
            return f"HTTP {status}{': ' + detail if detail else ''}"
        try:
            # A large answer is parsed off the event loop: other collectors keep their timing.
            data = json.loads(raw) if len(raw) < 1 << 20 else await asyncio.to_thread(json.loads, raw)
        except (ValueError, RecursionError):
            self.malformed_answers += 1
            return "response is not JSON"
        problem = incomplete(data, required, rows)
        if problem:
            if problem.startswith("cached"):
                self.cached_results += 1
            else:
                self.malformed_answers += 1
            return self._scrub(problem)
        # A copy computed before this request, whatever is_cached says (a cache in between, a
        # replayed answer): it cannot show what arrived since, so it certifies nothing.
        refreshed = clock.parse_iso(str(data.get("last_refresh") or ""))
        if refreshed is not None and refreshed < sent - self.config.clock_skew:
            self.cached_results += 1
            return f"stale answer (last_refresh {int(sent - refreshed)}s before the request)"
        return data

    async def _post(self, url: str, body: dict[str, Any], cap: int) -> tuple[int, httpx.Headers, bytes] | str:
        """Status, headers and the decoded body, read up to ``cap`` bytes (a gzip bomb or an
        endless body is cut there, not held in memory nor parsed)."""
        assert self._client is not None
        headers = {"Authorization": f"Bearer {self.config.personal_api_key.get_secret_value()}"}
        async with self._client.stream(
            "POST", url, json=body, headers=headers, timeout=self.config.timeout
        ) as resp:
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    self.malformed_answers += 1
                    return f"answer too large (over {cap >> 10} KB)"
                chunks.append(chunk)
            return resp.status_code, resp.headers, b"".join(chunks)

    def _scrub(self, text: str) -> str:
        """An answer's own words, one line, the key replaced: a server may echo what it was sent."""
        return excerpt(text, [self.config.personal_api_key.get_secret_value()], 200)

    def _match(self, data: dict[str, Any], lookup: dict[str, Any], received: float) -> None:
        columns = data["columns"]
        alias_of = lookup["props"]
        groups = lookup["groups"]
        for row in data["results"]:
            rec = dict(zip(columns, row, strict=True))
            event = rec.get("event")
            for (g_event, prop, match), values in groups.items():
                if g_event != event:
                    continue
                got = rec.get(alias_of[prop])
                if got is None:
                    continue
                got = str(got)  # PostHog's raw JSON text of the property
                if match == "equals":
                    hits = values.get(got, [])
                else:  # contains: candidate ids from the row's hex runs, then the rendered value
                    hits = [
                        w
                        for tid in trace_ids_in(got, self._index.trace_ids)
                        for w in self._index.get(tid)
                        if w.sink_spec.event == g_event
                        and hop_field(w.sink_spec).expr == prop
                        and w.sink_spec.match == "contains"
                        and hop_field(w.sink_spec).text(str(w.probe.render(w.sink_spec.value))) in got
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

    # -- evidence: near misses ------------------------------------------------
    async def explain(self, w: Watch, start: float, end: float, base: Evidence) -> Evidence:
        """Events with the hop's name in its window: how many, how many had the field null or
        missing, a few values found. Lookups are batched: the poller answers every pending one
        with one query in its next cycle, never one query per probe."""
        hop: PostHogHop = w.sink_spec
        if w.first is not None or self.coverage.broken:
            return base  # seen (late), or no look can succeed: the blind window says why
        before, after = (min(self.config.clock_skew, s) for s in EXPLAIN_SLACK)
        f = hop_field(hop)
        field, value = f.expr, f.text(str(w.probe.render(hop.value)))
        match = (
            f"{field} = {_lit(value)}" if hop.match == "equals" else _contains_trace_id([w.trace_id], field)
        )
        ask = _Ask(
            event=hop.event,
            field=field,
            match=match,
            lo=math.floor(clock.wall(start) - before),
            hi=math.ceil(clock.wall(end) + after),
            answer=asyncio.get_running_loop().create_future(),
        )
        self._asks.append(ask)
        self._wake.set()
        try:
            got = await asyncio.wait_for(asyncio.shield(ask.answer), EXPLAIN_WAIT)
        except asyncio.TimeoutError:
            got = f"no near-miss lookup within {EXPLAIN_WAIT:g}s (query budget)"
        finally:
            if ask in self._asks:
                self._asks.remove(ask)
        if isinstance(got, str):
            base.summary = f"the near-miss lookup failed ({got})"
            return base
        return self._near_misses(base, hop, w, got, ask)

    def _near_misses(
        self, base: Evidence, hop: PostHogHop, w: Watch, got: dict[str, Any], ask: _Ask
    ) -> Evidence:
        n, nulls, hits, values = got["n"], got["z"], got["h"], got["v"]
        name = hop_field(hop).name
        want = _trim(str(w.probe.render(hop.value)), w.trace_id)
        base.near_misses = max(0, n - hits)
        base.found = {
            "events": n,
            "null_or_missing": nulls,
            "values": [_trim(v, w.trace_id) for v in values][:SAMPLE_VALUES],
            "matching_now": hits,
            "window": {"from": clock.iso(ask.lo), "to": clock.iso(ask.hi)},
        }
        if n == 0:
            base.summary = f"no {hop.event} events arrived at all in the window"
            base.hint = "is the funnel capturing into this project (project key)?"
            return base
        cmp = "=" if hop.match == "equals" else "containing"
        parts = [f"{n} {hop.event} event{'s' if n != 1 else ''} arrived in the window"]
        if hits:
            parts.append(f"{hits} with {name} {cmp} {want} (there now: it arrived after the last look)")
        else:
            parts.append(f"none with {name} {cmp} {want}")
        if nulls == n:
            who = "it" if n == 1 else "both" if n == 2 else f"all {n}"
            parts[-1] += f"; {who} had it null"
            base.hint = "Check the property path." if hop_field(hop).raw_json else f"Check the {name} field."
        else:
            if nulls:
                parts[-1] += f"; {nulls} had it null"
            if base.found["values"]:
                parts[-1] += "; values found: " + ", ".join(repr(v) for v in base.found["values"])
        base.summary = ", ".join(parts)
        return base

    async def _explain_batch(self) -> None:
        """Answer the pending near-miss lookups (up to ``EXPLAIN_BATCH``) with one query."""
        asks = [a for a in self._asks if not a.answer.done()][:EXPLAIN_BATCH]
        for a in asks:
            self._asks.remove(a)
        if not asks:
            return
        self.explain_queries += 1
        try:
            data = await self._ask(build_explain_query(asks), ("event",), len(asks) + 1)
        except Exception as exc:  # a failed lookup costs evidence, never the poller's coverage
            data = f"internal error: {type(exc).__name__}"
        finally:
            self._permanent = False  # a refused lookup costs evidence, never the collector
        answers = data if isinstance(data, str) else self._explained(data, asks)
        for i, a in enumerate(asks):
            if not a.answer.done():
                a.answer.set_result(answers if isinstance(answers, str) else answers[i])

    @staticmethod
    def _explained(data: dict[str, Any], asks: list[_Ask]) -> list[dict[str, Any]] | str:
        """Each lookup's counts and values from the grouped answer, or why it is no evidence
        (a count that is no count is a malformed answer, not an error in the poller)."""
        columns = data["columns"]
        if "event" not in columns or len(data["results"]) > len(asks):
            return "malformed near-miss answer"
        by_event = {
            str(rec["event"]): rec for rec in (dict(zip(columns, r, strict=True)) for r in data["results"])
        }
        out = []
        for i, a in enumerate(asks):
            rec = by_event.get(a.event, {})
            counts = [count(rec.get(f"{k}{i}", 0)) for k in "nzh"]
            values = rec.get(f"v{i}") or []
            if any(c is None for c in counts) or not isinstance(values, list):
                return "malformed near-miss answer"
            n, z, h = counts
            out.append({"n": n, "z": z, "h": h, "v": [str(v) for v in values]})
        return out

    # -- push: a PostHog realtime destination posting to the webhook receiver ------------
    def on_push(self, body: Any, received: float) -> None:
        """A realtime destination delivered an event (default body ``{"event": {...}, "person":
        {...}}``). Matched like a poll row, found through the trace-id index."""
        event = body.get("event") if isinstance(body, dict) else None
        if not isinstance(event, dict):
            return
        props = event.get("properties") if isinstance(event.get("properties"), dict) else {}
        person = body.get("person") if isinstance(body.get("person"), dict) else {}
        for w in self._index.in_text(json.dumps(body)):
            hop: PostHogHop = w.sink_spec
            value, want = field_value(hop, event, person), str(w.probe.render(hop.value))
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

    def _broke(self, sent: float, error: str) -> float:
        """A setup error: every wait on this collector ends now with ``error`` as the cause; the
        collector keeps looking at its longest backoff (a later good look clears it)."""
        first = self.coverage.broken is None
        self.failed_queries += 1
        self.last_error = error
        self.coverage.broke(sent, error)
        delay = self._backoff.longest()
        if first:
            log.error("posthog query refused: %s (hops on this sink are unknown until it is fixed)", error)
        return delay

    def _fail(self, sent: float, error: str, retry_after: str | None, quiet: bool = False) -> float:
        self.failed_queries += 1
        self.last_error = error
        self.coverage.failed(sent, error)
        delay = self._backoff.next(self.interval, retry_after)
        if not quiet:
            log.warning("posthog query failed: %s; next try in %.1fs", error, delay)
        return delay


def _error_detail(raw: bytes) -> str:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return ""
    return str(data.get("detail") or data.get("error") or "")[:200] if isinstance(data, dict) else ""


def count(value: Any) -> int | None:
    """A count from an answer (PostHog sends UInt64 as a number, or as text past 2**53), or None
    when it is none: negative, fractional, NaN, infinite, not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and math.isfinite(value) and value >= 0 and value.is_integer():
        return int(value)
    return None


def incomplete(
    data: Any, required: tuple[str, ...] = _REQUIRED_COLUMNS, rows: int | None = None
) -> str | None:
    """Why a 200 body is not a complete result set (so no evidence), or None when it is.

    PostHog answers 200 with other things than results: a pending async query, a maintenance or
    error notice, a cached copy. Only a JSON object with a ``results`` list whose rows match its
    ``columns`` (and a finished ``query_status`` when one is present) says what is there."""
    if not isinstance(data, dict):
        return f"answer is not a JSON object ({type(data).__name__})"
    if data.get("is_cached"):
        return "cached result (no evidence)"
    if data.get("error"):
        return f"query error: {str(data['error'])[:200]}"
    status = data.get("query_status")
    if status is not None and (
        not isinstance(status, dict) or status.get("complete") is not True or status.get("error")
    ):
        return "query not complete (query_status)"
    results, columns = data.get("results"), data.get("columns")
    if not isinstance(results, list):
        detail = f": {str(data['detail'])[:200]}" if data.get("detail") else ""
        return f"answer has no results list{detail}"
    if rows is not None and len(results) > rows:
        # Not the answer to a query with that LIMIT; and rows past it would only cost the event
        # loop (a million rows are seconds of matching, other sinks' timing with them).
        return f"answer has {len(results)} rows, more than its LIMIT {rows}"
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        return "answer has no columns list"
    if len(set(columns)) != len(columns):
        return "answer has duplicate columns"
    missing = [c for c in required if c not in columns]
    if missing:
        return f"answer lacks columns {missing}"
    if any(not isinstance(r, list) or len(r) != len(columns) for r in results):
        return "answer rows do not match its columns"
    return None


def _last_in_order(data: dict[str, Any], hi: float) -> float | str:
    """The timestamp of a cut answer's last row, which keyset paging moves the window to; or why
    that is unsafe. Only an answer in timestamp order, inside the window asked for, says every
    row before its last one was shown."""
    col = data["columns"].index("timestamp")
    stamps = [clock.parse_iso(str(r[col])) for r in data["results"]]
    if any(t is None for t in stamps):
        return "truncated answer with unreadable timestamps"
    if any(b < a for a, b in zip(stamps, stamps[1:], strict=False)) or stamps[-1] > hi + 1:  # type: ignore[operator]
        return "truncated answer out of timestamp order"
    return stamps[-1]  # type: ignore[return-value]


PREFLIGHT_DAYS = 7
_KEY_FIX = "create a personal API key with the query:read scope and set collectors.posthog.personal_api_key"
_FIXES = {
    401: _KEY_FIX,
    403: _KEY_FIX,
    404: "check collectors.posthog.project_id (the number in the project's URL) and that the key can see it",
    400: "the query API refused a trivial query: check collectors.posthog.host is the app host",
}


async def _preflight(config: PostHogConfig, hops: list[PostHogHop]) -> list[Finding]:
    """PostHog answers, the key has the query scope and the project exists (``SELECT 1``); then one
    grouped count for every hop's event name over the last 7 days: was it seen, and is each hop's
    field non-null on it. Two queries in all, whatever the number of hops. Nothing is captured."""
    where = "collectors.posthog"
    async with new_client("funnel-tracer doctor") as client:
        c = PostHogCollector(config.model_copy(update={"timeout": min(config.timeout, 10.0)}), client=client)
        got = await c._ask("SELECT 1", ())
        check = f"{where}: query API at {config.host} answers for project {config.project_id}"
        if isinstance(got, str):
            status = c.last_status
            return [
                Finding(
                    check,
                    False,
                    got,
                    fix=_FIXES.get(
                        status or 0,
                        "set collectors.posthog.host to the app host it redirects to (scheme included)"
                        if status and 300 <= status < 400
                        else "check collectors.posthog.host and that this host can reach it",
                    ),
                    blocks=status in PERMANENT or bool(status and 300 <= status < 400),
                )
            ]
        out = [Finding(check, True, "the key has the query scope")]
        if not hops:
            return out
        since = clock.wall(clock.now()) - PREFLIGHT_DAYS * 86400
        fields = list(dict.fromkeys(hop_field(h).expr for h in hops))
        cols = ["event", "count() AS n"] + [f"countIf(isNotNull({f})) AS f{i}" for i, f in enumerate(fields)]
        events = sorted({h.event for h in hops})
        text = (
            f"SELECT {', '.join(cols)} FROM events WHERE event IN ({', '.join(_lit(e) for e in events)}) "
            f"AND timestamp >= toDateTime({_lit(_ch_time(since))}, 'UTC') GROUP BY event LIMIT {len(events) + 1}"
        )
        data = await c._ask(text, ("event", "n"), len(events) + 1)
        if isinstance(data, str):
            out.append(Finding(f"{where}: recent events", False, f"the count query failed ({data})"))
            return out
    rows = (dict(zip(data["columns"], r, strict=True)) for r in data["results"])
    seen = {str(rec["event"]): rec for rec in rows}  # by name: columns may come in any order
    malformed = "the count query's answer is no count"
    for hop in sorted(hops, key=lambda h: (h.event, hop_field(h).name)):
        rec = seen.get(hop.event, {})
        n = count(rec.get("n", 0))
        if n is None:
            out.append(
                Finding(
                    f"{where}: event {hop.event!r} seen in the last {PREFLIGHT_DAYS} days", False, malformed
                )
            )
            continue
        if n == 0:
            out.append(
                Finding(
                    f"{where}: event {hop.event!r} seen in the last {PREFLIGHT_DAYS} days",
                    False,
                    "no such event",
                    fix=f"check the event name (case matters) and that the funnel captures into project "
                    f"{config.project_id} with that project's key",
                )
            )
            continue
        out.append(
            Finding(
                f"{where}: event {hop.event!r} seen in the last {PREFLIGHT_DAYS} days", True, f"{n} events"
            )
        )
        set_on = count(rec.get(f"f{fields.index(hop_field(hop).expr)}", 0))
        name = hop_field(hop).name
        if set_on is None:
            out.append(Finding(f"{where}: {name} is set on recent {hop.event} events", False, malformed))
            continue
        out.append(
            Finding(
                f"{where}: {name} is set on recent {hop.event} events",
                set_on > 0,
                f"on {set_on} of {n}",
                fix=f"check the property path: no {hop.event} event of the last {PREFLIGHT_DAYS} days has "
                f"{name} (expected only before the first probe if the funnel sets it from the probe)",
            )
        )
    return out


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
    preflight=_preflight,
)
