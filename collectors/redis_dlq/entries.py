"""What one DLQ entry says: its trace ids, attempt, own timestamp and id.

Every shape stores entries differently (a list member, a zset member, stream fields, or an id
whose JSON lives in ``meta_hash``), but they are all read by the same rules, here, once per
distinct entry text.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from collectors.redis_dlq.config import RedisDlqHop
from tracer import clock
from tracer.payload import value_at
from tracer.probe import TRACE_ID


@dataclass(frozen=True)
class Info:
    """What one entry says, parsed once per distinct entry text."""

    traces: tuple[str, ...]
    attempt: int | None
    sink_time: float | None
    entry_id: str | None


NO_META = Info((), None, None, None)  # a meta_hash id whose metadata is not (yet) there


@dataclass(frozen=True)
class Hit:
    """An entry of a probe, found in ``key``."""

    key: str
    info: Info
    handle: str | None = None  # stream entry id


class Entries:
    """Parsed entries of one hop, cached by text (bounded by ``4 * max_scan``)."""

    def __init__(self, spec: RedisDlqHop, max_scan: int) -> None:
        self.spec = spec
        self.max_scan = max_scan
        self.parsed: dict[str, Info] = {}

    async def of_members(self, r: Redis, members: list[str], in_flight: Container[str]) -> dict[str, Info]:
        """Parse list/zset members. With ``meta_hash`` the members are ids and the entry is the
        hash's value, re-read for ids of probes in flight (attempts change)."""
        spec = self.spec
        out: dict[str, Info] = {}
        if spec.meta_hash is None:
            for m in members:
                info = self.parsed.get(m)
                if info is None:
                    info = self.parsed[m] = extract(spec, m, maybe_json(m))
                out[m] = info
            if len(self.parsed) > 4 * self.max_scan:
                self.parsed = dict(out)
            return out
        # Re-read ids we have no metadata for yet, and ids of probes in flight.
        stale = [
            m
            for m in members
            if (i := self.parsed.get(m)) is None or i is NO_META or any(x in in_flight for x in i.traces)
        ]
        if stale:
            for m, text in zip(stale, await r.hmget(spec.meta_hash, stale), strict=True):
                self.parsed[m] = extract(spec, text, maybe_json(text)) if text else NO_META
        if len(self.parsed) > 4 * self.max_scan:
            self.parsed = {m: self.parsed[m] for m in members}
        return {m: self.parsed[m] for m in members}

    def of_fields(self, fields: dict[str, str]) -> Info:
        """Parse a stream entry's fields; one field holding JSON is taken as the whole entry."""
        text = json.dumps(fields, sort_keys=True)
        info = self.parsed.get(text)
        if info is None:
            obj: Any = {k: maybe_json(v) for k, v in fields.items()}
            if len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
                obj = next(iter(obj.values()))  # one field holding the whole entry as JSON
            info = extract(self.spec, text, obj)
            if len(self.parsed) > 4 * self.max_scan:
                self.parsed.clear()
            self.parsed[text] = info
        return info


def maybe_json(text: str) -> Any:
    if text[:1] in ("{", "["):
        with contextlib.suppress(ValueError):
            return json.loads(text)
    return text


def dig(obj: Any, path: str | None) -> Any:
    # payloads are often JSON inside a string field
    return None if path is None else value_at(obj, path, json_strings=True)


def extract(spec: RedisDlqHop, text: str, obj: Any) -> Info:
    if spec.trace_path is not None:
        value = dig(obj, spec.trace_path)
        traces = (str(value).lower(),) if value else ()
    else:
        traces = tuple(dict.fromkeys(TRACE_ID.findall(text.lower())))
    attempt = dig(obj, spec.attempt_field)
    try:
        attempt = int(attempt) if attempt is not None else None
    except (TypeError, ValueError):
        attempt = None
    entry_id = dig(obj, "id")
    return Info(traces, attempt, epoch(dig(obj, spec.timestamp_field)), str(entry_id) if entry_id else None)


def epoch(value: Any) -> float | None:
    """Epoch seconds from an ISO string or an epoch number in seconds or milliseconds."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return clock.parse_iso(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value / 1000.0 if value > 1e11 else float(value)
    return None
