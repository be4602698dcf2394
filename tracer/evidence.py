"""Evidence: what a verdict that is not ``ok`` rests on, so a user can tell an outage from a typo.

Every such hop carries what was searched for (sink, event or key, property path as sent,
expected value, the window; secrets redacted), how many near misses the sink held (items that
matched part of the search but not the probe), what they looked like, and when the collector was
blind and why. ``reason`` is one sentence built from it; every report prints that sentence.

Collectors that can say more than the default implement ``tracer.plugins.Explains``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tracer import clock

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass
class Evidence:
    searched: dict[str, Any]  # sink, what was looked for, window, query or key pattern
    near_misses: int = 0  # items that matched part of the search but not the probe
    found: dict[str, Any] = field(default_factory=dict)  # sink-specific: what was there instead
    summary: str | None = None  # one clause on what was there instead (the sink's words)
    hint: str | None = None  # what to check or fix, when the evidence points at the setup
    blind: list[dict[str, Any]] = field(default_factory=list)  # [{"from", "to", "seconds", "why"}]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "searched": self.searched,
            "near_misses": self.near_misses,
            "blind": self.blind,
        }
        if self.found:
            out["found"] = self.found
        if self.hint:
            out["hint"] = self.hint
        return out


def window(start: float, end: float) -> dict[str, str]:
    """A monotonic window as the ISO times a user can compare with the sink's own records."""
    return {"from": clock.iso(clock.wall(start)), "to": clock.iso(clock.wall(end))}


def blind_json(windows: list[tuple[float, float, str | None]]) -> list[dict[str, Any]]:
    return [
        {**window(b0, b1), "seconds": round(max(0.0, b1 - b0), 3), "why": why or "a look failed"}
        for b0, b1, why in windows[:20]
    ]


def sentence(verdict: str, evidence: Evidence, detail: str | None) -> str:
    """``lost: 3 lead_captured events arrived in the window, none with ...; Check the property path.``

    ``detail`` is the verdict rule's own clause ("not seen within the 30s deadline"); the sink's
    summary, the blind windows and the hint follow it."""
    parts = [p for p in (detail, evidence.summary) if p]
    if evidence.blind:
        seconds = sum(b["seconds"] for b in evidence.blind)
        whys = list(dict.fromkeys(b["why"] for b in evidence.blind))
        parts.append(f"the collector was blind for {seconds:.1f}s of the window ({'; '.join(whys[:3])})")
    if evidence.hint:
        parts.append(evidence.hint)
    return f"{verdict}: " + ("; ".join(parts) if parts else "no further evidence")


def excerpt(body: bytes | str, secrets: list[str], limit: int = 300) -> str:
    """The first ``limit`` characters of a body, secrets replaced, one line."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    for s in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(s, "***")
    # Control characters would reach terminals (escape sequences) and JUnit (invalid XML).
    text = _CONTROL.sub("\ufffd", " ".join(text.split()))
    return text if len(text) <= limit else text[:limit] + "…"
