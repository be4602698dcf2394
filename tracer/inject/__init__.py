"""The inject stage: put a synthetic probe into the funnel.

Each injector sends one probe and returns an ``Injection``: when it was sent, how the funnel
answered, and whether that counts as delivered. A failed injection is ``inject_failed``, never a
freshness breach.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Injection:
    sent_at: float  # monotonic, just before the first byte left
    done_at: float  # monotonic, response read (or failure noticed)
    ok: bool
    status: int | None = None
    error: str | None = None  # short, secret-free: "HTTP 503", "timeout after 5s", "connection refused"
    attributes: dict[str, Any] = field(default_factory=dict)  # span attributes (semantic conventions)
    response: str | None = None  # failed: the start of the funnel's answer, secrets redacted
