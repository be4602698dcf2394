"""Background tasks that never die silently: a collector's poller, listener or heartbeat.

An exception that escapes the loop is counted, logged once per kind, makes the collector blind
(``Coverage.failed`` with the why), and the loop starts again after a backoff. A dead poller
with ``/healthz`` saying "up" would turn every hop into a false ``lost``; a blind one says
``unknown`` until it recovers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tracer import clock
from tracer.watch import Coverage

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, name: str, coverage: Coverage, backoff: float = 1.0) -> None:
        self.name = name
        self.coverage = coverage
        self.backoff = backoff
        self.crashes = 0  # for health(): unexpected exceptions caught
        self._kinds: set[str] = set()

    def start(self, loop: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``loop()`` as a task; restart it whenever it raises (until cancelled)."""
        return asyncio.create_task(self._keep(loop), name=self.name)

    async def _keep(self, loop: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.crashed(exc)
                await asyncio.sleep(self.backoff)

    def crashed(self, exc: BaseException) -> None:
        self.crashes += 1
        kind = type(exc).__name__
        self.coverage.failed(clock.now(), f"internal error ({kind})")
        if kind not in self._kinds:  # once per kind: a loop failing every second must not flood the log
            self._kinds.add(kind)
            log.error("%s: unexpected %s; restarting (blind meanwhile)", self.name, kind, exc_info=exc)
