"""Collectors: one module per sink, each implementing the small ``Collector`` protocol.

A collector is told which hops to look for (``watch``), finds them on its sink, and reports a
sighting with ``Watch.observe``. It keeps a ``Coverage`` so verdicts know when it was blind.
Everything runs on the engine's asyncio loop.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from tracer.watch import Coverage, Watch

# sink name -> "module:Class"; imported lazily so an unused sink costs nothing at start-up
REGISTRY = {
    "posthog": "collectors.posthog:PostHogCollector",
    "redis_dlq": "collectors.redis_dlq:RedisDlqCollector",
    "webhook": "collectors.webhook:WebhookCollector",
    "smtp": "collectors.smtp:SmtpCollector",
}


class Collector(Protocol):
    sink: ClassVar[str]
    coverage: Coverage

    @property
    def error_bar(self) -> float:
        """Typical uncertainty of one sighting in seconds (a poller's effective interval)."""
        ...

    async def start(self) -> None:
        """Connect / bind / begin polling. Call ``coverage.looked(now)`` once able to see."""
        ...

    async def close(self) -> None: ...

    def watch(self, w: Watch) -> None:
        """Start looking for ``w`` (registered just before injection)."""
        ...

    def unwatch(self, w: Watch) -> None: ...

    def health(self) -> dict[str, Any]:
        """``{"up": bool, ...}`` for /healthz, metrics and reports. No secrets."""
        ...


class PushReceiver(Collector, Protocol):
    """Optional, for push collectors (webhook): hand every accepted body on ``path`` to
    ``on_body(body, received)`` as well, after the collector's own matching. The canary uses it
    to pass sightings of probes owned by *another* instance to the shared ledger
    (``tracer.ledger``), so instances behind one load balancer each match their probes once."""

    def route(self, path: str, on_body: Callable[[Any, float], None]) -> None: ...


def build(sink: str, config: Any) -> Collector:
    module, cls = REGISTRY[sink].split(":")
    return getattr(importlib.import_module(module), cls)(config)
