"""A probe: one synthetic lead, payment or approval, and the identities it carries.

Every probe owns a W3C trace id (32 hex digits). That id is the needle every collector looks
for on its sink, and the trace the probe's spans are exported under.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from tracer import clock

_PLACEHOLDER = re.compile(
    r"\{(trace_id|traceparent|probe_id|now_iso|now_epoch_s|now_epoch_ms|uuid|step"
    r"|env:[A-Za-z_][A-Za-z0-9_]*|capture\.[A-Za-z_][A-Za-z0-9_]*)\}"
)
_WHOLE = re.compile(rf"^{_PLACEHOLDER.pattern}$")
CAPTURE_REF = re.compile(r"\{capture\.([A-Za-z_][A-Za-z0-9_]*)\}")
TRACE_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
SCAN_WINDOW = 64 * 1024  # characters per regex call in ``trace_ids``


def trace_ids(text: str) -> set[str]:
    """Every trace id in ``text``, any case, lower-cased: ``set(TRACE_ID.findall(text.lower()))``
    in windows of ``SCAN_WINDOW`` characters. ``re`` holds the GIL for a whole call, so one
    findall over a 4 MB mail in a worker thread froze the event loop for ~110 ms."""
    text = text.lower()  # once, whole: lower() may change the length of some characters
    found: set[str] = set()
    for start in range(0, len(text), SCAN_WINDOW):
        # One character before (the lookbehind) and an id plus one after (the lookahead); only
        # matches starting in [start, start + SCAN_WINDOW) count, the next window has the rest.
        lo = max(start - 1, 0)
        window = text[lo : start + SCAN_WINDOW + 32]
        found.update(
            m.group() for m in TRACE_ID.finditer(window) if start <= lo + m.start() < start + SCAN_WINDOW
        )
    return found


def _nonzero_hex(nbytes: int) -> str:
    while True:
        value = secrets.token_hex(nbytes)
        if int(value, 16):  # all-zero ids are invalid in W3C trace context
            return value


def new_trace_id() -> str:
    return _nonzero_hex(16)


def new_span_id() -> str:
    return _nonzero_hex(8)


@dataclass(eq=False)
class Probe:
    step: str
    trace_id: str = field(default_factory=new_trace_id)
    probe_id: str = field(default_factory=lambda: secrets.token_hex(6))
    created_at: float = field(default_factory=clock.now)
    # Span ids are fixed up front: the injection span's id goes out in ``traceparent`` before the
    # span exists, and a restarted canary can rebuild the same trace from a ledger record.
    root_span_id: str = field(default_factory=new_span_id)
    inject_span_id: str = field(default_factory=new_span_id)
    # Values captured from the responses of a multi-request injection (``capture:``), for the
    # templates of later requests, the hop matchers and cleanup: ``{capture.<name>}``.
    captures: dict[str, Any] = field(default_factory=dict)

    @property
    def traceparent(self) -> str:
        """W3C ``traceparent`` naming the injection span as parent, sampled."""
        return f"00-{self.trace_id}-{self.inject_span_id}-01"

    def request_span_id(self, index: int, start: int) -> str:
        """Span id of request ``index`` of a multi-request injection: the start request's is
        ``inject_span_id`` (a single request keeps the id it always had); the others are derived
        from it, so a probe rebuilt from a ledger record rebuilds the same spans."""
        if index == start:
            return self.inject_span_id
        digest = hashlib.sha256(f"{self.inject_span_id}:{index}".encode()).hexdigest()[:16]
        return digest if int(digest, 16) else "0000000000000001"

    def render(self, value: Any) -> Any:
        """Fill ``{trace_id}``, ``{traceparent}``, ``{probe_id}``, ``{now_iso}``, ``{now_epoch_s}``,
        ``{now_epoch_ms}``, ``{uuid}``, ``{step}``, ``{env:NAME}`` and ``{capture.NAME}`` in every
        string of a (nested) value.

        Typed: a string that is exactly one placeholder becomes that placeholder's native value:
        ``"{now_epoch_ms}"`` an int, ``"{capture.id}"`` whatever JSON type was captured. Inside
        longer text every value is text. Unknown ``{...}`` text (a capture not made yet, too) is
        left alone, so literal braces in bodies survive.
        """
        if isinstance(value, str):
            whole = _WHOLE.match(value)
            if whole is not None:
                return self._native(whole.group(1), value)
            return _PLACEHOLDER.sub(self._fill, value)
        if isinstance(value, dict):
            return {self.render_text(k): self.render(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.render(v) for v in value]
        return value

    def render_text(self, value: str) -> str:
        """``render`` for a place that only takes text (a URL, a header, a key)."""
        return _PLACEHOLDER.sub(self._fill, value)

    def _native(self, name: str, text: str) -> Any:
        if name.startswith("capture."):
            return self.captures.get(name[8:], text)
        epoch = clock.wall(clock.now())
        if name == "now_epoch_s":
            return int(epoch)
        if name == "now_epoch_ms":
            return int(epoch * 1000)
        return self._value(name)

    def _fill(self, m: re.Match[str]) -> str:
        name = m.group(1)
        if name.startswith("capture."):
            if name[8:] not in self.captures:
                return m.group(0)
            got = self.captures[name[8:]]
            return got if isinstance(got, str) else json.dumps(got, separators=(",", ":"))
        return self._value(name)

    def _value(self, name: str) -> str:
        if name == "trace_id":
            return self.trace_id
        if name == "traceparent":
            return self.traceparent
        if name == "probe_id":
            return self.probe_id
        if name == "step":
            return self.step
        if name == "uuid":
            return str(uuid.uuid4())
        epoch = clock.wall(clock.now())
        if name == "now_iso":
            return clock.iso(epoch)
        if name == "now_epoch_s":
            return str(int(epoch))
        if name == "now_epoch_ms":
            return str(int(epoch * 1000))
        return os.environ.get(name[4:], "")
