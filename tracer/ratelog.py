"""Rate-limited log lines: the first of a kind now, then at most one per period with a count.

A receiver under a flood (slow clients, hostile mail) must not write thousands of identical
warnings: the log is where an operator looks, and a flood of lines there hides everything else
and costs the event loop time. Counters (``health()``, ``/metrics``) carry the exact numbers.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from tracer import clock


class Throttle:
    """``throttle.log(kind, level, msg, *args)``: logs the first line of each ``kind``, then at
    most one per ``period`` seconds, saying how many were suppressed since the last one."""

    def __init__(self, logger: logging.Logger, period: float = 60.0) -> None:
        self.logger = logger
        self.period = period
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (last logged, suppressed since)

    def log(self, kind: str, level: int, msg: str, *args: Any) -> bool:
        """Returns whether the line was written."""
        now = clock.now()
        last, suppressed = self._last.get(kind, (-math.inf, 0))
        if now - last < self.period:
            self._last[kind] = (last, suppressed + 1)
            return False
        self._last[kind] = (now, 0)
        if suppressed:
            msg += " (%d more like this in the last %.0fs)"
            args = (*args, suppressed, min(self.period, now - last))
        self.logger.log(level, msg, *args)
        return True
