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
    # A multi-request injection: every request's own record (one CLIENT span each), in order,
    # and which of them is the probe's start (its ``sent_at`` is this one's).
    requests: list[Injection] = field(default_factory=list)
    start_index: int = 0


@dataclass
class CleanupOutcome:
    """One cleanup action after a probe resolved (a DELETE, a DLQ entry removed). Reported under
    the probe; never changes a verdict."""

    what: str  # "DELETE http://host/api/v1/leads/{id}", "LREM dlq:webhooks"
    ok: bool
    error: str | None = None  # short and secret-free
    status: int | None = None
    removed: int | None = None  # records removed, when the sink says
