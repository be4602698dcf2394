"""What one DLQ entry says: its trace ids, attempt, own timestamp and id.

Every shape stores entries differently (a list member, a zset member, stream fields, or an id
whose JSON lives in ``meta_hash``), but they are all read by the same rules, here, once per
distinct entry text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from collectors.redis_dlq.config import RedisDlqHop
from tracer import clock
from tracer.payload import value_at
from tracer.probe import TRACE_ID

log = logging.getLogger(__name__)


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
        self.members: dict[str, Info] = {}  # meta_id_path: what each member says by itself
        # meta_id_path: watched trace id -> the meta_hash field that held nothing for its entry
        self.meta_missing: dict[str, str] = {}
        self.meta_warned = False
        self.meta_read_at: float | None = None  # when the last metadata lookup returned

    def field(self, entry_id: str) -> str:
        return self.spec.meta_field.replace("{id}", entry_id)

    async def of_members(self, r: Redis, members: list[str], in_flight: Container[str]) -> dict[str, Info]:
        """Parse list/zset members. With ``meta_hash`` the members are ids and the entry is the
        hash's value, re-read for ids of probes in flight (attempts change)."""
        spec = self.spec
        out: dict[str, Info] = {}
        if spec.meta_id_path is not None:
            return await self._side_meta(r, members, in_flight)
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
            fields = [self.field(m) for m in stale]
            for m, text in zip(stale, await r.hmget(spec.meta_hash, fields), strict=True):
                self.parsed[m] = extract(spec, text, maybe_json(text)) if text else NO_META
            self.meta_read_at = clock.now()
        if len(self.parsed) > 4 * self.max_scan:
            self.parsed = {m: self.parsed[m] for m in members}
        return {m: self.parsed[m] for m in members}

    async def _side_meta(self, r: Redis, members: list[str], in_flight: Container[str]) -> dict[str, Info]:
        """Members are whole JSON entries; their metadata (attempts, mostly) sits in ``meta_hash``
        under a field named from the id at ``meta_id_path``. Only members carrying a watched
        trace id are looked up, in one HMGET per look: attempts bumped in place are seen at the
        look after the bump, not when the entry is finally removed."""
        spec = self.spec
        assert spec.meta_hash is not None
        out: dict[str, Info] = {}
        want: list[tuple[str, str]] = []
        for m in members:
            base = self.members.get(m)
            if base is None:
                base = self.members[m] = extract(spec, m, maybe_json(m))
            if base.entry_id and any(x in in_flight for x in base.traces):
                want.append((m, self.field(base.entry_id)))
            out[m] = base
        if want:
            texts = await r.hmget(spec.meta_hash, [f for _, f in want])
            self.meta_read_at = clock.now()
            for (m, f), text in zip(want, texts, strict=True):
                base = self.members[m]
                if text is None:
                    # A producer may park the member a moment before writing its metadata:
                    # only a second look that finds nothing is worth a warning.
                    for tid in base.traces:
                        if tid in in_flight:
                            if tid in self.meta_missing:
                                self._warn(f)
                            self.meta_missing[tid] = f
                else:
                    out[m] = merge(spec, base, text)
                    for tid in base.traces:
                        self.meta_missing.pop(tid, None)
        if len(self.members) > 4 * self.max_scan:
            self.members = {m: self.members[m] for m in members}
        return out

    def _warn(self, field: str) -> None:
        if not self.meta_warned:
            self.meta_warned = True
            log.warning(
                "redis_dlq: %s has no field %r for an entry carrying a watched trace id (in %s); "
                "attempts cannot be read there: check meta_hash, meta_field and meta_id_path",
                self.spec.meta_hash,
                field,
                self.spec.key,
            )

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
    entry_id = dig(obj, spec.meta_id_path or "id")
    return Info(traces, attempt, epoch(dig(obj, spec.timestamp_field)), str(entry_id) if entry_id else None)


def merge(spec: RedisDlqHop, base: Info, text: str) -> Info:
    """A member's own Info plus its side metadata: JSON (read by the hop's field paths) or a bare
    number taken as the attempt. What the metadata says wins; the member fills the gaps."""
    meta = maybe_json(text)
    if isinstance(meta, (dict, list)):
        side = extract(spec, text, meta)
        attempt, sink_time, traces = side.attempt, side.sink_time, side.traces
    else:
        try:
            attempt = int(float(text))
        except ValueError:
            attempt = None
        sink_time, traces = None, ()
    return Info(
        base.traces or traces,
        attempt if attempt is not None else base.attempt,
        base.sink_time if base.sink_time is not None else sink_time,
        base.entry_id,
    )


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
