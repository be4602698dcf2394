"""The sandbox PostHog's state: stored events, the knobs tests flip while it runs, and what it counts.

Why a module of its own: the capture side writes here, the query side reads here, and tests
turn the knobs here; none of the three needs to know the others' code.
"""

from __future__ import annotations

import copy
import math
import re
import threading
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from starlette.responses import JSONResponse

DEFAULT_LIMIT = 100  # PostHog's row count when a query has no LIMIT
MAX_LIMIT = 50_000  # PostHog caps larger LIMITs silently


@dataclass(slots=True)
class StoredEvent:
    """One ingested event. Times are epoch seconds on the server's wall clock."""

    uuid: str
    event: str
    distinct_id: str
    properties: dict[str, Any]
    timestamp: float  # event time after PostHog's clock-skew correction
    created_at: float  # stamped at capture, like PostHog's ingestion worker (before the row is queryable)
    received_at: float
    visible_at: float  # created_at + ingest_delay: queries see the row only from then on
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
            "visible_at": self.visible_at,
        }


class EventStore:
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
    ingest_delay: float = 0.0  # seconds between capture (created_at) and the event becoming queryable
    query_fault: int | None = None  # answer every query with this status (429, 500, 503, ...)
    retry_after: float | None = None  # Retry-After seconds on a faulted query
    query_body: Any = None  # when set: answer every query 200 with this JSON body (garbage, maintenance)
    query_raw: bytes | None = None  # when set: answer every query 200 with these bytes (e.g. b"null")
    force_cached: bool = False  # real results, but flagged is_cached (no evidence to the tracer)
    max_limit: int = MAX_LIMIT  # the silent cap on a query's LIMIT
    destinations: list[str] = field(default_factory=list)  # realtime webhook destination URLs
    queries: int = 0  # query requests received, faulted or not
    captured: int = 0  # events accepted and stored
    dropped_unknown_key: int = 0  # events answered 200 but dropped: well-formed key of no project
    rejected: int = 0  # capture requests refused (400/401/413/415)
    persons: dict[str, dict[str, Any]] = field(default_factory=dict)  # distinct_id -> person properties
    _store: EventStore = field(default_factory=EventStore, repr=False, compare=False)

    def events(self) -> list[dict[str, Any]]:
        """A copy of every stored event in receipt order (times as epoch seconds), for assertions."""
        return self._store.snapshot()


# --------------------------------------------------------------------------- shared helpers


def iso(epoch: float) -> str:
    """PostHog's rendering of a DateTime64(6, 'UTC'): always microseconds, ``Z`` suffix."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_FRACTION = re.compile(r"(\.\d+)")


def parse_time(value: Any) -> float | None:
    """Epoch seconds from an ISO-8601 string or a number (seconds, or milliseconds if huge)."""
    got = number(value)
    if got is not None:
        return got / 1000.0 if abs(got) > 1e11 else got
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


def number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def error(status: int, error_type: str, code: str, detail: str) -> JSONResponse:
    """PostHog's error body."""
    return JSONResponse(
        {"type": error_type, "code": code, "detail": detail, "attr": None}, status_code=status
    )
