"""A PostHog-compatible local server: capture endpoints, the HogQL query API, webhook destinations.

Why it exists: the tracer's PostHog collector must be tested against something that behaves like
PostHog on the wire (the official SDK's capture requests, PostHog's timestamp rule, 401/400/429
answers, ``is_cached``, ingestion lag) without a network or an account. Everything the tracer
relies on is modelled; nothing else is.

What it answers:

- Capture: ``/batch/``, ``/i/v0/e/``, ``/e/``, ``/capture/``, ``/track/``, ``/i/v0/ai/batch/``
  (legacy shape, token in the body) and ``/i/v1/analytics/events`` (capture v1, Bearer token).
  Bodies may be gzip/deflate compressed.
- Query: ``POST /api/projects/{id}/query/`` with a ``HogQLQuery`` in exactly the SQL subset
  ``collectors.posthog.build_query`` emits (plus a few cheap generalisations). Anything else is a
  400 naming what was not understood, as PostHog would refuse it.
- Realtime destinations: each ingested event is POSTed to every URL in ``state.destinations`` with
  PostHog's default webhook body.

Knobs on ``PostHogState`` (ingestion delay, query faults, cached answers) can be flipped while the
server runs; that is how tests create lag and outages.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import re
import threading
import time
import uuid
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

try:  # capture v1 may send zstd bodies, only when this optional package is installed
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None

log = logging.getLogger(__name__)

MAX_BODY = 20 * 1024 * 1024  # PostHog's batch size limit, applied after decompression
DEFAULT_LIMIT = 100  # PostHog's row count when a query has no LIMIT
MAX_LIMIT = 50_000  # PostHog caps larger LIMITs silently
DESTINATION_RETRIES = 3  # PostHog retries a failing webhook up to 3 times
DESTINATION_BACKOFF = 0.2  # seconds before the first retry, doubled each time

_INVALID_KEY = "Project API key invalid. You can find your project API key in PostHog project settings."


# --------------------------------------------------------------------------- state and storage


@dataclass(slots=True)
class StoredEvent:
    """One ingested event. Times are epoch seconds on the server's wall clock."""

    uuid: str
    event: str
    distinct_id: str
    properties: dict[str, Any]
    timestamp: float  # event time after PostHog's clock-skew correction
    created_at: float  # ingestion time: receipt + ingest_delay; invisible to queries before it
    received_at: float
    seq: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "event": self.event,
            "distinct_id": self.distinct_id,
            "properties": copy.deepcopy(self.properties),
            "timestamp": self.timestamp,
            "created_at": self.created_at,
            "received_at": self.received_at,
        }


class _EventStore:
    """Events by name, each list sorted by timestamp.

    The tracer's query always names its events and a tight time window, so answering it is a
    bisect per event name rather than a scan of everything a benchmark ever sent. A lock makes
    ``snapshot`` safe from the test thread while the server thread appends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._log: list[StoredEvent] = []  # receipt order
        self._keys: dict[str, list[tuple[float, int]]] = {}
        self._by_name: dict[str, list[StoredEvent]] = {}

    def add(self, ev: StoredEvent) -> None:
        with self._lock:
            ev.seq = len(self._log)
            self._log.append(ev)
            keys = self._keys.setdefault(ev.event, [])
            events = self._by_name.setdefault(ev.event, [])
            i = bisect_right(keys, (ev.timestamp, ev.seq))
            keys.insert(i, (ev.timestamp, ev.seq))
            events.insert(i, ev)

    def candidates(self, names: set[str] | None, lo: float, hi: float) -> list[StoredEvent]:
        """Events named ``names`` (all when None) with ``lo <= timestamp <= hi``, by timestamp."""
        with self._lock:
            chosen = (
                self._by_name if names is None else {n: self._by_name[n] for n in names if n in self._by_name}
            )
            out: list[StoredEvent] = []
            for name, events in chosen.items():
                keys = self._keys[name]
                i = bisect_left(keys, (lo, -1))
                j = bisect_right(keys, (hi, math.inf))
                out.extend(events[i:j])
        out.sort(key=lambda e: (e.timestamp, e.seq))
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e.as_dict() for e in self._log]


@dataclass
class PostHogState:
    """Configuration and knobs of the sandbox PostHog; every field may change while it runs."""

    project_api_key: str = "phc_sandbox"
    personal_api_key: str = "phx_sandbox"
    project_id: str = "1"
    ingest_delay: float = 0.0  # seconds between receipt and the event becoming queryable
    query_fault: int | None = None  # answer every query with this status (429, 500, 503, ...)
    retry_after: float | None = None  # Retry-After seconds on a faulted query
    force_cached: bool = False  # real results, but flagged is_cached (no evidence to the tracer)
    destinations: list[str] = field(default_factory=list)  # realtime webhook destination URLs
    queries: int = 0  # query requests received, faulted or not
    captured: int = 0  # events accepted
    rejected: int = 0  # capture requests refused (400/401/413/415)
    _store: _EventStore = field(default_factory=_EventStore, repr=False, compare=False)

    def events(self) -> list[dict[str, Any]]:
        """A copy of every stored event in receipt order (times as epoch seconds), for assertions."""
        return self._store.snapshot()


# --------------------------------------------------------------------------- time helpers


def _iso(epoch: float) -> str:
    """PostHog's rendering of a DateTime64(6, 'UTC'): always microseconds, ``Z`` suffix."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_FRACTION = re.compile(r"(\.\d+)")


def _parse_time(value: Any) -> float | None:
    """Epoch seconds from an ISO-8601 string or a number (seconds, or milliseconds if huge)."""
    number = _number(value)
    if number is not None:
        return number / 1000.0 if abs(number) > 1e11 else number
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().replace(" ", "T", 1)
    text = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
    # Python 3.10's fromisoformat wants exactly 3 or 6 fraction digits.
    text = _FRACTION.sub(lambda m: "." + (m.group(1)[1:] + "000000")[:6], text, count=1)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


# --------------------------------------------------------------------------- capture


class _Refused(Exception):
    """A capture or query request PostHog would refuse; carries the status and error body."""

    def __init__(self, status: int, error_type: str, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.body = {"type": error_type, "code": code, "detail": detail, "attr": None}


def _invalid(detail: str) -> _Refused:
    return _Refused(400, "validation_error", "invalid_payload", detail)


def _inflate(raw: bytes) -> bytes:
    """gzip or zlib (auto-detected), then raw deflate; bounded so a zip bomb is a 413."""
    for wbits in (47, -15):
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(raw, MAX_BODY + 1)
        except zlib.error:
            continue
        if len(out) > MAX_BODY or d.unconsumed_tail:
            raise _Refused(413, "validation_error", "payload_too_large", "payload exceeds 20 MB")
        return out
    raise _invalid("body could not be decompressed")


def _decode_body(raw: bytes, encoding: str, compression: str) -> Any:
    encoding = encoding.strip().lower()
    if encoding == "zstd":
        if zstandard is None:
            raise _Refused(415, "validation_error", "unsupported_encoding", "zstd is not supported here")
        try:
            raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=MAX_BODY)
        except zstandard.ZstdError:
            raise _invalid("body could not be decompressed") from None
    elif (
        encoding in ("gzip", "x-gzip", "deflate")
        or compression in ("gzip", "gzip-js")
        or raw[:2] == b"\x1f\x8b"
    ):
        raw = _inflate(raw)
    elif encoding not in ("", "identity"):
        raise _Refused(
            415, "validation_error", "unsupported_encoding", f"unsupported Content-Encoding {encoding!r}"
        )
    if len(raw) > MAX_BODY:
        raise _Refused(413, "validation_error", "payload_too_large", "payload exceeds 20 MB")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"body is not valid JSON: {exc}") from None


def _token_of(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    for key in ("api_key", "token", "$token"):
        if isinstance(obj.get(key), str):
            return obj[key]
    props = obj.get("properties")
    return props.get("token") if isinstance(props, dict) and isinstance(props.get("token"), str) else None


def _legacy_events(body: Any, batch_only: bool) -> tuple[list[Any], str | None, Any]:
    """(events, token, sent_at) of a legacy capture body: a batch envelope, one event, or a list."""
    if isinstance(body, list):  # posthog-js posts a bare array to /e/
        return body, _token_of(body[0]) if body else None, None
    if not isinstance(body, dict):
        raise _invalid("body must be a JSON object")
    if "batch" in body:
        events = body["batch"]
        if not isinstance(events, list):
            raise _invalid("'batch' must be a list of events")
    elif batch_only:
        raise _invalid("'batch' is required")
    else:
        events = [body]
    token = _token_of(body) or (_token_of(events[0]) if events else None)
    return events, token, body.get("sent_at")


@dataclass
class _Incoming:
    """One event as validated from the wire, before the timestamp rule and storage."""

    event: str
    distinct_id: str
    properties: dict[str, Any]
    uuid: str
    timestamp: Any
    offset_ms: float
    ignore_sent_at: bool
    person_set: dict[str, Any]
    person_set_once: dict[str, Any]


def _validate(raw: Any, index: int) -> _Incoming:
    where = f"event {index}"
    if not isinstance(raw, dict):
        raise _invalid(f"{where}: must be a JSON object")
    name = raw.get("event")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{where}: 'event' must be a non-empty string")
    props = raw.get("properties") or {}
    if not isinstance(props, dict):
        raise _invalid(f"{where}: 'properties' must be an object")
    distinct = raw.get("distinct_id", props.get("distinct_id", props.get("$distinct_id")))
    if distinct is None or isinstance(distinct, (dict, list)) or str(distinct).strip() == "":
        raise _invalid(f"{where}: 'distinct_id' is required")
    event_uuid = raw.get("uuid")
    if event_uuid is None:
        event_uuid = str(uuid.uuid4())
    else:
        try:
            event_uuid = str(uuid.UUID(str(event_uuid)))
        except ValueError:
            raise _invalid(f"{where}: 'uuid' is not a valid UUID") from None
    person_set = {**_dict(raw.get("$set")), **_dict(props.get("$set"))}
    person_set_once = {**_dict(raw.get("$set_once")), **_dict(props.get("$set_once"))}
    return _Incoming(
        event=name,
        distinct_id=str(distinct),
        properties=props,
        uuid=event_uuid,
        timestamp=raw.get("timestamp"),
        offset_ms=_number(raw.get("offset")) or 0.0,
        ignore_sent_at=props.get("$ignore_sent_at") is True,
        person_set=person_set,
        person_set_once=person_set_once,
    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _v1_to_legacy(raw: Any, sdk_info: str) -> Any:
    """Capture v1 moves a few properties to typed fields; fold them back so storage is uniform."""
    if not isinstance(raw, dict):
        return raw
    props = dict(_dict(raw.get("properties")))
    options = _dict(raw.get("options"))
    if options.get("disable_skew_correction") is True:
        props["$ignore_sent_at"] = True
    if isinstance(options.get("process_person_profile"), bool):
        props["$process_person_profile"] = options["process_person_profile"]
    for wire, prop in (("session_id", "$session_id"), ("window_id", "$window_id")):
        if isinstance(raw.get(wire), str):
            props[prop] = raw[wire]
    lib, _, version = sdk_info.partition("/")
    if lib:  # PostHog injects $lib from the PostHog-Sdk-Info header on v1
        props.setdefault("$lib", lib)
        props.setdefault("$lib_version", version)
    return {**raw, "properties": props}


def _event_time(inc: _Incoming, now: float, sent_at: float | None) -> float:
    """PostHog's rule: correct client clock skew by ``sent_at``; no timestamp means now."""
    ts = _parse_time(inc.timestamp)
    if ts is None:
        return now - inc.offset_ms / 1000.0  # "offset": ms before receipt, when no timestamp
    if sent_at is not None and not inc.ignore_sent_at:
        return now + (ts - sent_at)
    return ts


# --------------------------------------------------------------------------- HogQL subset


class HogQLError(ValueError):
    """The query uses something outside the supported subset; the message says what."""


_TOKEN = re.compile(
    r"""(?P<ws>\s+)
      |(?P<str>'(?:[^'\\]|\\.|'')*')
      |(?P<num>\d+(?:\.\d+)?)
      |(?P<ident>[A-Za-z_$][A-Za-z0-9_$]*)
      |(?P<op><=|>=|!=|<>|==|[=<>(),.*;])""",
    re.X | re.S,
)
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "`": "`", "n": "\n", "t": "\t", "r": "\r", "b": "\b",
            "f": "\f", "a": "\a", "v": "\v", "0": ""}  # fmt: skip
_KEYWORDS = {"SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "IN", "LIKE", "ILIKE", "ORDER", "BY", "ASC", "DESC",
             "LIMIT", "OFFSET", "AS"}  # fmt: skip
_SCALAR_COLUMNS = {"uuid": "UUID", "event": "String", "distinct_id": "String"}
_TIME_COLUMNS = {"timestamp", "created_at"}
_TIME_TYPE = "DateTime64(6, 'UTC')"


@dataclass(frozen=True)
class _Tok:
    kind: str  # str | num | ident | op | eof
    text: str
    pos: int
    value: Any = None


def _unescape(body: str) -> str:
    """HogQL string literal rules: known backslash escapes, ``''`` for a quote; unknown escapes
    (``\\%``) keep their backslash so LIKE can still see them."""
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
        elif c == "'" and body[i + 1 : i + 2] == "'":
            out.append("'")
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            what = (
                "unterminated string literal" if text[pos] == "'" else f"unexpected character {text[pos]!r}"
            )
            raise HogQLError(f"{what} at position {pos}")
        kind = m.lastgroup or ""
        if kind == "str":
            toks.append(_Tok("str", m.group(), pos, _unescape(m.group()[1:-1])))
        elif kind == "num":
            toks.append(_Tok("num", m.group(), pos, float(m.group())))
        elif kind != "ws":
            toks.append(_Tok(kind, m.group(), pos))
        pos = m.end()
    toks.append(_Tok("eof", "end of query", len(text)))
    return toks


# AST. Values are str (strings, properties), float (datetimes, numbers) or None (missing property).
@dataclass(frozen=True)
class _Col:
    name: str  # uuid | event | distinct_id | timestamp | created_at | properties
    path: tuple[str, ...] = ()

    @property
    def type(self) -> str:
        if self.name == "properties":
            return "Nullable(String)"
        return _TIME_TYPE if self.name in _TIME_COLUMNS else _SCALAR_COLUMNS[self.name]

    @property
    def text(self) -> str:
        return ".".join((self.name, *self.path))


@dataclass(frozen=True)
class _Lit:
    value: str | float


@dataclass(frozen=True)
class _Cmp:
    op: str  # = != < <= > >=
    left: _Col
    right: _Lit | _Col


@dataclass(frozen=True)
class _In:
    col: _Col
    values: frozenset[str]
    negated: bool


@dataclass(frozen=True)
class _Like:
    """``col LIKE p1 OR col LIKE p2 ...`` as one regex search.

    The parser merges an OR of LIKEs on one column into one node: the tracer sends one LIKE per
    in-flight probe, and a single alternation is about 20x faster than trying them one by one.
    """

    col: _Col
    fragments: tuple[str, ...]
    ignore_case: bool
    negated: bool
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        flags = re.S | (re.I if self.ignore_case else 0)
        object.__setattr__(self, "regex", re.compile("|".join(f"(?:{f})" for f in self.fragments), flags))


@dataclass(frozen=True)
class _Bool:
    op: str  # and | or
    parts: tuple[_Expr, ...]


@dataclass(frozen=True)
class _Not:
    part: _Expr


_Expr = _Cmp | _In | _Like | _Bool | _Not
_FLIP = {"=": "=", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


def _like_fragment(pattern: str) -> str:
    """A LIKE pattern as a regex for ``search``: ``%`` any run, ``_`` one char, backslash makes
    the next char literal. Outer ``%`` become a missing anchor, so ``'%abc%'`` is a plain
    substring search that the regex engine can speed up."""
    pieces: list[str | None] = []  # None is a '%' wildcard
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            pieces.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        pieces.append(None if c == "%" else "." if c == "_" else re.escape(c))
        i += 1
    start = end = True
    while pieces and pieces[0] is None:
        pieces.pop(0)
        start = False
    while pieces and pieces[-1] is None:
        pieces.pop()
        end = False
    body = "".join(".*" if p is None else p for p in pieces)
    return ("\\A" if start else "") + body + ("\\Z" if end else "")


@dataclass(frozen=True)
class _Select:
    col: _Col
    name: str


@dataclass(frozen=True)
class HogQLQuery:
    """A parsed query in the supported subset."""

    select: tuple[_Select, ...]
    where: _Expr | None
    order: tuple[tuple[_Col, bool], ...]  # (column, descending)
    limit: int
    offset: int


class _Parser:
    """Recursive descent over the token list. Grammar (keywords any case)::

    SELECT col [AS name] {, ...} FROM events [WHERE expr] [ORDER BY col [ASC|DESC] {, ...}]
        [LIMIT n [OFFSET m]] [;]
    expr    := and {OR and};   and := unary {AND unary};   unary := NOT unary | '(' expr ')' | pred
    pred    := operand cmp operand | col [NOT] IN (str, ...) | col [NOT] [I]LIKE str
    operand := col | str | num | toDateTime(str [, tz])
    col     := uuid | event | distinct_id | timestamp | created_at | properties.path
    """

    def __init__(self, text: str) -> None:
        self.toks = _tokenize(text)
        self.i = 0

    # -- token helpers
    def peek(self, ahead: int = 0) -> _Tok:
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def take(self) -> _Tok:
        tok = self.peek()
        self.i += 1
        return tok

    def is_kw(self, *words: str, ahead: int = 0) -> bool:
        tok = self.peek(ahead)
        return tok.kind == "ident" and tok.text.upper() in words

    def accept_kw(self, *words: str) -> bool:
        if self.is_kw(*words):
            self.i += 1
            return True
        return False

    def expect_kw(self, word: str) -> None:
        if not self.accept_kw(word):
            self.fail(f"expected {word}")

    def accept_op(self, op: str) -> bool:
        if self.peek().kind == "op" and self.peek().text == op:
            self.i += 1
            return True
        return False

    def expect_op(self, op: str) -> None:
        if not self.accept_op(op):
            self.fail(f"expected '{op}'")

    def fail(self, what: str) -> None:
        tok = self.peek()
        raise HogQLError(f"{what}, found {tok.text!r} at position {tok.pos}")

    # -- grammar
    def query(self) -> HogQLQuery:
        self.expect_kw("SELECT")
        select = [self.select_item()]
        while self.accept_op(","):
            select.append(self.select_item())
        self.expect_kw("FROM")
        table = self.take()
        if table.kind != "ident" or table.text != "events":
            raise HogQLError(f"unsupported table {table.text!r}: only 'events' is available here")
        where = self.expr() if self.accept_kw("WHERE") else None
        order: list[tuple[_Col, bool]] = []
        if self.accept_kw("ORDER"):
            self.expect_kw("BY")
            order.append(self.order_item(select))
            while self.accept_op(","):
                order.append(self.order_item(select))
        limit, offset = DEFAULT_LIMIT, 0
        if self.accept_kw("LIMIT"):
            limit = self.integer()
            if self.accept_kw("OFFSET"):
                offset = self.integer()
        self.accept_op(";")
        if self.peek().kind != "eof":
            self.fail("unsupported clause")
        return HogQLQuery(tuple(select), where, tuple(order), min(limit, MAX_LIMIT), offset)

    def select_item(self) -> _Select:
        col = self.column()
        if self.accept_kw("AS"):
            alias = self.take()
            if alias.kind != "ident" or alias.text.upper() in _KEYWORDS:
                raise HogQLError(f"expected an alias after AS at position {alias.pos}")
            return _Select(col, alias.text)
        return _Select(col, col.text)

    def order_item(self, select: list[_Select]) -> tuple[_Col, bool]:
        tok = self.peek()
        alias = next((s.col for s in select if tok.kind == "ident" and s.name == tok.text), None)
        if alias is not None and self.peek(1).text != ".":
            self.i += 1
            col = alias
        else:
            col = self.column()
        desc = self.accept_kw("DESC")
        if not desc:
            self.accept_kw("ASC")
        return col, desc

    def integer(self) -> int:
        tok = self.take()
        if tok.kind != "num" or not tok.text.isdigit():
            raise HogQLError(f"expected a whole number, found {tok.text!r} at position {tok.pos}")
        return int(tok.text)

    def column(self) -> _Col:
        tok = self.take()
        if tok.kind != "ident" or tok.text.upper() in _KEYWORDS:
            raise HogQLError(f"expected a column, found {tok.text!r} at position {tok.pos}")
        if self.peek().text == "(":
            raise HogQLError(f"unsupported function {tok.text}() at position {tok.pos}")
        if tok.text == "properties":
            path: list[str] = []
            while self.accept_op("."):
                part = self.take()
                if part.kind != "ident":
                    raise HogQLError(f"expected a property name, found {part.text!r} at position {part.pos}")
                path.append(part.text)
            if not path:
                raise HogQLError(
                    f"selecting the whole 'properties' column is not supported (position {tok.pos})"
                )
            return _Col("properties", tuple(path))
        if tok.text in _SCALAR_COLUMNS or tok.text in _TIME_COLUMNS:
            if self.peek().text == ".":
                self.fail(f"column {tok.text!r} has no fields")
            return _Col(tok.text)
        raise HogQLError(f"unsupported column {tok.text!r} at position {tok.pos}")

    def expr(self) -> _Expr:
        parts = [self.conj()]
        while self.accept_kw("OR"):
            parts.append(self.conj())
        if len(parts) == 1:
            return parts[0]
        likes = [p for p in parts if isinstance(p, _Like) and not p.negated]
        if len(likes) == len(parts) and len({(p.col, p.ignore_case) for p in likes}) == 1:
            return _Like(
                likes[0].col, tuple(f for p in likes for f in p.fragments), likes[0].ignore_case, False
            )
        return _Bool("or", tuple(parts))

    def conj(self) -> _Expr:
        parts = [self.unary()]
        while self.accept_kw("AND"):
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else _Bool("and", tuple(parts))

    def unary(self) -> _Expr:
        if self.accept_kw("NOT"):
            return _Not(self.unary())
        if self.accept_op("("):
            inner = self.expr()
            self.expect_op(")")
            return inner
        return self.predicate()

    def predicate(self) -> _Expr:
        left = self.operand()
        negated = self.is_kw("NOT") and self.is_kw("IN", "LIKE", "ILIKE", ahead=1)
        if negated:
            self.i += 1
        if self.is_kw("IN", "LIKE", "ILIKE"):
            kw = self.take().text.upper()
            if not isinstance(left, _Col) or left.name in _TIME_COLUMNS:
                raise HogQLError(f"{kw} needs a string column on its left")
            if kw == "IN":
                return _In(left, frozenset(self.string_list()), negated)
            pat = self.take()
            if pat.kind != "str":
                raise HogQLError(f"{kw} needs a string pattern, found {pat.text!r} at position {pat.pos}")
            return _Like(left, (_like_fragment(pat.value),), kw == "ILIKE", negated)
        op_tok = self.take()
        op = {"==": "=", "<>": "!="}.get(op_tok.text, op_tok.text)
        if op_tok.kind != "op" or op not in _FLIP:
            raise HogQLError(f"expected a comparison, found {op_tok.text!r} at position {op_tok.pos}")
        right = self.operand()
        return self.comparison(op, left, right, op_tok.pos)

    def comparison(self, op: str, left: _Col | _Lit, right: _Col | _Lit, pos: int) -> _Cmp:
        if isinstance(left, _Lit):
            if isinstance(right, _Lit):
                raise HogQLError(f"comparison of two constants at position {pos}")
            left, right, op = right, left, _FLIP[op]
        assert isinstance(left, _Col)
        is_time = left.name in _TIME_COLUMNS
        if isinstance(right, _Col):
            if (right.name in _TIME_COLUMNS) != is_time:
                raise HogQLError(f"cannot compare {left.text} with {right.text} at position {pos}")
        elif is_time and isinstance(right.value, str):
            epoch = _parse_time(right.value)
            if epoch is None:
                raise HogQLError(f"cannot read {right.value!r} as a date-time at position {pos}")
            right = _Lit(epoch)
        elif is_time != isinstance(right.value, float):
            raise HogQLError(f"cannot compare {left.text} with {right.value!r} at position {pos}")
        return _Cmp(op, left, right)

    def operand(self) -> _Col | _Lit:
        tok = self.peek()
        if tok.kind == "str":
            self.i += 1
            return _Lit(tok.value)
        if tok.kind == "num":
            self.i += 1
            return _Lit(tok.value)
        if tok.kind == "ident" and tok.text.lower() == "todatetime" and self.peek(1).text == "(":
            return self.to_datetime()
        return self.column()

    def to_datetime(self) -> _Lit:
        start = self.take()
        self.expect_op("(")
        arg = self.take()
        if arg.kind != "str":
            raise HogQLError(f"toDateTime needs a string, found {arg.text!r} at position {arg.pos}")
        tz = "UTC"
        if self.accept_op(","):
            tz_tok = self.take()
            if tz_tok.kind != "str":
                raise HogQLError(f"toDateTime's time zone must be a string at position {tz_tok.pos}")
            tz = tz_tok.value
        self.expect_op(")")
        try:
            zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise HogQLError(f"unknown time zone {tz!r} at position {start.pos}") from None
        try:
            dt = datetime.fromisoformat(arg.value.strip().replace(" ", "T", 1))
        except ValueError:
            raise HogQLError(f"cannot read {arg.value!r} as a date-time at position {arg.pos}") from None
        return _Lit((dt if dt.tzinfo else dt.replace(tzinfo=zone)).timestamp())

    def string_list(self) -> list[str]:
        self.expect_op("(")
        values: list[str] = []
        while True:
            tok = self.take()
            if tok.kind != "str":
                raise HogQLError(f"IN lists take string literals, found {tok.text!r} at position {tok.pos}")
            values.append(tok.value)
            if not self.accept_op(","):
                break
        self.expect_op(")")
        return values


def parse_hogql(text: str) -> HogQLQuery:
    """Parse ``text`` or raise ``HogQLError`` naming the first thing outside the subset."""
    return _Parser(text).query()


def _hogql_string(value: Any) -> str | None:
    """A property as HogQL returns it: strings as-is, other JSON as its compact text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _value(col: _Col, ev: StoredEvent) -> str | float | None:
    if col.name == "properties":
        node: Any = ev.properties
        for part in col.path:
            if not isinstance(node, dict):
                return None
            node = node.get(part)
        return _hogql_string(node)
    return getattr(ev, col.name)


def _holds(expr: _Expr, ev: StoredEvent) -> bool:
    """SQL truth: a comparison with a missing property is never true (NULL)."""
    if isinstance(expr, _Bool):
        parts = (_holds(p, ev) for p in expr.parts)
        return all(parts) if expr.op == "and" else any(parts)
    if isinstance(expr, _Not):
        return not _holds(expr.part, ev)
    if isinstance(expr, _In):
        got = _value(expr.col, ev)
        return got is not None and ((got in expr.values) != expr.negated)
    if isinstance(expr, _Like):
        got = _value(expr.col, ev)
        return isinstance(got, str) and (expr.regex.search(got) is not None) != expr.negated
    left = _value(expr.left, ev)
    right = _value(expr.right, ev) if isinstance(expr.right, _Col) else expr.right.value
    if left is None or right is None:
        return False
    op = expr.op
    try:
        if op == "=":
            return left == right
        if op == "!=":
            return left != right
        if op == "<":
            return left < right  # type: ignore[operator]
        if op == "<=":
            return left <= right  # type: ignore[operator]
        if op == ">":
            return left > right  # type: ignore[operator]
        return left >= right  # type: ignore[operator]
    except TypeError:
        return False


def _event_names(expr: _Expr | None) -> set[str] | None:
    """Event names the filter can possibly match, or None when it does not pin them down."""
    if (
        isinstance(expr, _Cmp)
        and expr.op == "="
        and expr.left.name == "event"
        and isinstance(expr.right, _Lit)
    ):
        return {str(expr.right.value)}
    if isinstance(expr, _In) and expr.col.name == "event" and not expr.negated:
        return set(expr.values)
    if isinstance(expr, _Bool):
        sets = [_event_names(p) for p in expr.parts]
        if expr.op == "or":
            return None if any(s is None for s in sets) else set().union(*sets)  # type: ignore[arg-type]
        known = [s for s in sets if s is not None]
        return set.intersection(*known) if known else None
    return None


def _window(expr: _Expr | None) -> tuple[float, float]:
    """Timestamp bounds implied by the top-level AND of the filter (a superset is fine)."""
    lo, hi = -math.inf, math.inf
    conjuncts = list(expr.parts) if isinstance(expr, _Bool) and expr.op == "and" else [expr]
    for c in conjuncts:
        if isinstance(c, _Cmp) and c.left.name == "timestamp" and isinstance(c.right, _Lit):
            v = float(c.right.value)
            if c.op in (">", ">=", "="):
                lo = max(lo, v)
            if c.op in ("<", "<=", "="):
                hi = min(hi, v)
    return lo, hi


def run_query(q: HogQLQuery, store: _EventStore, now: float) -> tuple[list[list[Any]], bool]:
    """Rows of ``q`` over events ingested by ``now``, and whether more rows exist past the limit."""
    lo, hi = _window(q.where)
    # Candidates come in timestamp order, so the tracer's ORDER BY timestamp ASC can stop early.
    enough = q.offset + q.limit + 1 if q.order in ((), ((_Col("timestamp"), False),)) else math.inf
    matched: list[StoredEvent] = []
    for ev in store.candidates(_event_names(q.where), lo, hi):
        if ev.created_at <= now and (q.where is None or _holds(q.where, ev)):
            matched.append(ev)
            if len(matched) >= enough:
                break
    for col, desc in reversed(q.order):  # stable sorts, last key first; NULLs last either way
        if desc:
            matched.sort(key=lambda e, c=col: (_value(c, e) is not None, _value(c, e)), reverse=True)
        else:
            matched.sort(key=lambda e, c=col: (_value(c, e) is None, _value(c, e)))
    page = matched[q.offset : q.offset + q.limit]
    rows = [[_render(s.col, ev) for s in q.select] for ev in page]
    return rows, len(matched) > q.offset + q.limit


def _render(col: _Col, ev: StoredEvent) -> Any:
    got = _value(col, ev)
    return _iso(got) if col.name in _TIME_COLUMNS and isinstance(got, float) else got


# --------------------------------------------------------------------------- the app


class _Server:
    """Request handlers plus the background work (destinations) bound to one ``PostHogState``."""

    def __init__(self, state: PostHogState) -> None:
        self.state = state
        self.persons: dict[str, dict[str, Any]] = {}  # distinct_id -> person properties
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    # -- capture
    async def capture_legacy(self, request: Request) -> JSONResponse:
        batch_only = request.url.path.rstrip("/").endswith("/batch")
        try:
            body = _decode_body(
                await request.body(),
                request.headers.get("content-encoding", ""),
                request.query_params.get("compression", ""),
            )
            events, token, sent_at = _legacy_events(body, batch_only)
            self._check_token(token)
            if sent_at is None and request.query_params.get("_", "").isdigit():
                sent_at = int(request.query_params["_"]) / 1000.0  # posthog-js sends sent_at as ?_=ms
            self._accept([_validate(e, i) for i, e in enumerate(events)], _parse_time(sent_at), request)
        except _Refused as exc:
            return self._refuse(exc)
        return JSONResponse({"status": "Ok"})

    async def capture_v1(self, request: Request) -> JSONResponse:
        """Capture v1: Bearer token, ``{"created_at", "batch"}``, per-event results in the answer."""
        try:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            self._check_token(token.strip() if scheme.lower() == "bearer" else None)
            body = _decode_body(await request.body(), request.headers.get("content-encoding", ""), "")
            if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
                raise _invalid("body must be an object with a 'batch' list")
            sdk_info = request.headers.get("posthog-sdk-info", "")
            events = [_validate(_v1_to_legacy(e, sdk_info), i) for i, e in enumerate(body["batch"])]
            # The per-attempt request timestamp is v1's sent_at; the batch created_at is the fallback.
            sent_at = _parse_time(request.headers.get("posthog-request-timestamp")) or _parse_time(
                body.get("created_at")
            )
            self._accept(events, sent_at, request)
        except _Refused as exc:
            return self._refuse(exc)
        return JSONResponse({"results": {e.uuid: {"result": "ok"} for e in events}})

    def _check_token(self, token: str | None) -> None:
        if token != self.state.project_api_key:
            raise _Refused(401, "authentication_error", "invalid_api_key", _INVALID_KEY)

    def _refuse(self, exc: _Refused) -> JSONResponse:
        self.state.rejected += 1
        return JSONResponse(exc.body, status_code=exc.status)

    def _accept(self, events: list[_Incoming], sent_at: float | None, request: Request) -> None:
        """Store a validated request's events. All-or-nothing: validation happened before."""
        if not events:
            raise _invalid("no events in the request")
        now = time.time()
        delay = max(0.0, float(self.state.ingest_delay))
        site = str(request.base_url).rstrip("/")
        for inc in events:
            stored = StoredEvent(
                uuid=inc.uuid,
                event=inc.event,
                distinct_id=inc.distinct_id,
                properties=inc.properties,
                timestamp=round(_event_time(inc, now, sent_at), 6),  # DateTime64(6)
                created_at=round(now + delay, 6),
                received_at=now,
            )
            person = self.persons.setdefault(inc.distinct_id, {})
            person.update({k: v for k, v in inc.person_set_once.items() if k not in person})
            person.update(inc.person_set)
            self.state._store.add(stored)
            self.state.captured += 1
            if self.state.destinations:  # no idle task per event when nothing listens
                self._spawn(self._deliver(stored, site))

    # -- destinations
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, ev: StoredEvent, site: str) -> None:
        """Once the event is ingested, POST it to every destination configured at that moment."""
        wait = ev.created_at - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        urls = list(self.state.destinations)
        if not urls:
            return
        body = self._webhook_body(ev, site)
        await asyncio.gather(*(self._post(url, body) for url in urls))

    def _webhook_body(self, ev: StoredEvent, site: str) -> dict[str, Any]:
        """PostHog's default webhook destination body: ``{"event": {event}, "person": {person}}``."""
        pid = self.state.project_id
        ts = _iso(ev.timestamp)
        props = self.persons.get(ev.distinct_id, {})
        name = props.get("email") or props.get("name") or ev.distinct_id
        return {
            "event": {
                "uuid": ev.uuid,
                "event": ev.event,
                "distinct_id": ev.distinct_id,
                "properties": ev.properties,
                "timestamp": ts,
                "url": f"{site}/project/{pid}/events/{quote(ev.uuid)}/{quote(ts)}",
            },
            "person": {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"posthog-sandbox/{pid}/{ev.distinct_id}")),
                "name": str(name),
                "url": f"{site}/project/{pid}/person/{quote(ev.distinct_id, safe='')}",
                "properties": dict(props),
            },
        }

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=5.0, headers={"User-Agent": "posthog-sandbox-webhook"})
        for attempt in range(DESTINATION_RETRIES + 1):
            try:
                resp = await self._client.post(url, json=body)
                if resp.is_success:
                    return
                problem = f"HTTP {resp.status_code}"
            except Exception as exc:  # a bad URL or dead receiver must never take the server down
                problem = f"{type(exc).__name__}: {exc}"
            if attempt == DESTINATION_RETRIES:
                log.warning("destination %s gave up after %d attempts: %s", url, attempt + 1, problem)
                return
            log.info("destination %s failed (%s); retrying", url, problem)
            await asyncio.sleep(DESTINATION_BACKOFF * 2**attempt)

    # -- query
    async def query(self, request: Request) -> JSONResponse:
        st = self.state
        st.queries += 1
        if st.query_fault is not None:
            return self._fault(st.query_fault, st.retry_after)
        auth = request.headers.get("authorization", "")
        if not auth:
            return _error(
                401,
                "authentication_error",
                "not_authenticated",
                "Authentication credentials were not provided.",
            )
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or key.strip() != st.personal_api_key:
            detail = "Personal API key found in request Authorization header is invalid."
            return _error(401, "authentication_error", "authentication_failed", detail)
        if request.path_params["project_id"] != st.project_id:
            return _error(404, "invalid_request", "not_found", "Not found.")
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            return _error(
                400, "validation_error", "parse_error", "JSON parse error - request body is not valid JSON"
            )
        spec = body.get("query") if isinstance(body, dict) else None
        if (
            not isinstance(spec, dict)
            or spec.get("kind") != "HogQLQuery"
            or not isinstance(spec.get("query"), str)
        ):
            kind = spec.get("kind") if isinstance(spec, dict) else None
            detail = (
                f"unsupported query kind {kind!r}: only HogQLQuery is served here"
                if kind
                else "'query' must be a HogQLQuery"
            )
            return _error(400, "validation_error", "invalid_input", detail)
        text = spec["query"]
        try:
            parsed = parse_hogql(text)
        except HogQLError as exc:
            return _error(400, "validation_error", "query_error", str(exc))
        except RecursionError:
            return _error(400, "validation_error", "query_error", "query is nested too deeply")
        now = time.time()
        rows, has_more = run_query(parsed, st._store, now)
        return JSONResponse(
            {
                "columns": [s.name for s in parsed.select],
                "results": rows,
                "types": [[s.name, s.col.type] for s in parsed.select],
                "hasMore": has_more,
                "limit": parsed.limit,
                "offset": parsed.offset,
                "is_cached": bool(st.force_cached),
                "last_refresh": _iso(now),
                "timings": [],
                "error": None,
                "query_status": None,
                "hogql": text,
            }
        )

    @staticmethod
    def _fault(status: int, retry_after: float | None) -> JSONResponse:
        if status == 429:
            resp = _error(429, "throttled_error", "throttled", "Request was throttled.")
        else:
            resp = _error(status, "server_error", "error", "A server error occurred.")
        if retry_after is not None:
            resp.headers["Retry-After"] = f"{retry_after:g}"
        return resp


def _error(status: int, error_type: str, code: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {"type": error_type, "code": code, "detail": detail, "attr": None}, status_code=status
    )


async def _health(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


_LEGACY_CAPTURE = ("/batch", "/i/v0/e", "/e", "/capture", "/track", "/i/v0/ai/batch")


def create_app(state: PostHogState) -> Starlette:
    """The sandbox PostHog as an ASGI app. Run it with lifespan on so destination tasks are
    cancelled and their HTTP client closed at shutdown."""
    server = _Server(state)
    routes = [Route("/_health", _health, methods=["GET"])]
    for path in _LEGACY_CAPTURE:  # trailing slash optional, without a redirect (the SDK POSTs)
        routes += [
            Route(path, server.capture_legacy, methods=["POST"]),
            Route(path + "/", server.capture_legacy, methods=["POST"]),
        ]
    routes += [
        Route("/i/v1/analytics/events", server.capture_v1, methods=["POST"]),
        Route("/i/v1/analytics/events/", server.capture_v1, methods=["POST"]),
        Route("/api/projects/{project_id}/query", server.query, methods=["POST"]),
        Route("/api/projects/{project_id}/query/", server.query, methods=["POST"]),
    ]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await server.aclose()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.posthog = state
    return app
