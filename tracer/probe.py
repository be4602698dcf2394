"""A probe: one synthetic lead, payment or approval, and the identities it carries.

Every probe owns a W3C trace id (32 hex digits). That id is the needle every collector looks
for on its sink, and the trace the probe's spans are exported under.
"""

from __future__ import annotations

import os
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from tracer import clock

_PLACEHOLDER = re.compile(
    r"\{(trace_id|traceparent|probe_id|now_iso|now_epoch_ms|uuid|step|env:[A-Za-z_][A-Za-z0-9_]*)\}"
)
TRACE_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")


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

    @property
    def traceparent(self) -> str:
        """W3C ``traceparent`` naming the injection span as parent, sampled."""
        return f"00-{self.trace_id}-{self.inject_span_id}-01"

    def render(self, value: Any) -> Any:
        """Fill ``{trace_id}``, ``{traceparent}``, ``{probe_id}``, ``{now_iso}``, ``{now_epoch_ms}``, ``{uuid}``,
        ``{step}`` and ``{env:NAME}`` in every string of a (nested) value.

        Unknown ``{...}`` text is left alone, so literal braces in bodies survive.
        """
        if isinstance(value, str):
            return _PLACEHOLDER.sub(self._fill, value)
        if isinstance(value, dict):
            return {self.render(k): self.render(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.render(v) for v in value]
        return value

    def _fill(self, m: re.Match[str]) -> str:
        name = m.group(1)
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
        if name == "now_epoch_ms":
            return str(int(epoch * 1000))
        return os.environ.get(name[4:], "")
