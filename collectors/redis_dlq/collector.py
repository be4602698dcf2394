"""``RedisDlqCollector``: the ``Collector`` protocol on top of the session and the targets.

The engine talks to this class only; it hands each watch to the target for its keys, wakes the
session so that target gets a look, and reports the session's health.
"""

from __future__ import annotations

from typing import Any, ClassVar

from collectors.redis_dlq.config import RedisDlqConfig
from collectors.redis_dlq.explain import explain
from collectors.redis_dlq.session import Session
from collectors.redis_dlq.target import Targets
from tracer.evidence import Evidence
from tracer.net import redact_url
from tracer.watch import Coverage, Watch


class RedisDlqCollector:
    sink: ClassVar[str] = "redis_dlq"

    def __init__(self, config: RedisDlqConfig) -> None:
        self.config = config
        self.coverage = Coverage(retroactive=False)
        self._targets = Targets(config.max_scan)
        self._session = Session(config, self.coverage, self._targets)

    # The session's counters, readable as before the split (tests wait on ``looks``).
    @property
    def looks(self) -> int:
        return self._session.looks

    @property
    def failed_looks(self) -> int:
        return self._session.failed_looks

    @property
    def reconnects(self) -> int:
        return self._session.reconnects

    @property
    def possible_misses(self) -> int:
        return self._session.possible_misses

    @property
    def notifications(self) -> str:
        return self._session.notifications

    @property
    def last_error(self) -> str | None:
        return self._session.last_error

    @property
    def error_bar(self) -> float:
        return 0.0 if self._session.push else self.config.poll_interval

    async def start(self) -> None:
        await self._session.start()

    async def close(self) -> None:
        await self._session.close()

    def watch(self, w: Watch) -> None:
        t = self._targets.of(w.sink_spec)
        tr = t.add(w)
        done = tr.seen.get(w.sink_spec.event)
        if done is not None:  # a hop registered after its event happened
            t.deliver(w, done)
        self._session.wake.set()

    def unwatch(self, w: Watch) -> None:
        t = self._targets.find(w.sink_spec)
        if t is not None:
            t.drop(w)

    async def explain(self, w: Watch, start: float, end: float, base: Evidence) -> Evidence:
        """Where the probe's entry was at the last look (still parked at attempt N, taken, dead,
        removed unretried) and the other entries met in the keys: from state the looks keep."""
        t = self._targets.find(w.sink_spec)
        if w.first is not None and (t is None or w.trace_id not in t.traces):
            return base  # seen (late): its state is forgotten once delivered; the lag says it all
        return explain(t, w.trace_id, w.sink_spec.event, start, end, base)

    def health(self) -> dict[str, Any]:
        s = self._session
        return {
            "up": not self.coverage.blind_now and s.ready.is_set() and s.failure is None,
            "url": redact_url(self.config.url.get_secret_value()),
            "mode": self.config.mode,
            "push_active": s.push,
            "notifications": s.notifications,
            "looks": s.looks,
            "failed_looks": s.failed_looks,
            "reconnects": s.reconnects,
            "possible_misses": s.possible_misses,
            "wipes": s.wipes,  # looks that found a watched entry wiped (flushed, deleted), not retried
            "internal_errors": s.supervisor.crashes,
            "in_flight": sum(len(t.index) for t in self._targets),
            "last_error": s.last_error,
        }
