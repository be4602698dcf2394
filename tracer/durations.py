"""Durations as people write them in YAML: ``5s``, ``250ms``, ``5m``, ``1h``, ``1m30s`` or a number of seconds.

Errors never echo the value: it may have come from a ``${VAR}`` holding a secret pasted into the
wrong field, and error messages end up in CI logs.
"""

from __future__ import annotations

import math
import re

MAX_SECONDS = 30 * 86400.0
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5s, 250ms or 5m")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError("not a duration (use e.g. 5s, 250ms, 5m, 1h)") from None
            scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
            seconds = sum(float(n) * scale[u] for n, u in parts)
    else:
        raise ValueError("expected a duration such as 5s, 250ms or 5m")
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise ValueError("a duration must be finite (at most 30 days)")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.2f}s"
    return f"{seconds / 60:.1f}m"
