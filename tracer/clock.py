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


# -- stamps: monotonic readings that outlive the process (canary ledger) ----------------------
def boot_id() -> str:
    """This machine's boot id. ``time.monotonic()`` (CLOCK_MONOTONIC) is shared by every process
    of one boot, so a reading taken by a process that has since died is still comparable here."""
    global _BOOT
    if _BOOT is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                _BOOT = f.read().strip()
        except OSError:  # not Linux: readings of another process are not comparable
            _BOOT = f"process-{id(_MONO0)}-{_WALL0}"
    return _BOOT


_BOOT: str | None = None


def stamp(mono: float) -> dict[str, float | str]:
    """A monotonic reading in a form another process can read back (see ``from_stamp``)."""
    return {"mono": mono, "wall": wall(mono), "boot": boot_id()}


def mono_of_wall(epoch: float) -> float:
    """The monotonic reading of this process that corresponds to an epoch time (inverse of ``wall``)."""
    return _MONO0 + (epoch - _WALL0)


def from_stamp(s: dict[str, float | str]) -> float:
    """A monotonic reading for a stamp taken by any process: exact on the same boot (the same
    CLOCK_MONOTONIC), otherwise through wall time (then as good as the two wall clocks agree)."""
    if s.get("boot") == boot_id():
        return float(s["mono"])
    return mono_of_wall(float(s["wall"]))
