"""Collectors: one module per sink, each implementing the small ``Collector`` protocol.

A collector is told which hops to look for (``watch``), finds them on its sink, and reports a
sighting with ``Watch.observe``. It keeps a ``Coverage`` so verdicts know when it was blind.
Everything runs on the engine's asyncio loop.
"""

from __future__ import annotations

import importlib
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


def build(sink: str, config: Any) -> Collector:
    module, cls = REGISTRY[sink].split(":")
    return getattr(importlib.import_module(module), cls)(config)
