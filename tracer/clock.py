"""One clock for every lag we compute.

Lags are differences of ``time.monotonic()`` readings, so a wall clock stepped by NTP or an
operator mid-run cannot bend them. Wall-clock timestamps (span times, reports) are derived
from a single anchor taken at import, for the same reason.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

_MONO0 = time.monotonic()
_WALL0 = time.time()


def now() -> float:
    """Monotonic seconds: the only time base used for lags."""
    return time.monotonic()


def wall(mono: float) -> float:
    """Epoch seconds for a monotonic reading, immune to wall-clock steps after start."""
    return _WALL0 + (mono - _MONO0)


def wall_ns(mono: float) -> int:
    return int(wall(mono) * 1e9)


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> float | None:
    """Epoch seconds from an ISO-8601 string as sinks write them; None when unreadable."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace(" ", "T", 1))
    except (ValueError, AttributeError):
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()
