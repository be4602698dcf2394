"""Webhook signing schemes for the HTTP injector. (Being built: issue 3.)"""

from __future__ import annotations

from typing import Any

from tracer.schema import Model


class Signing(Model):
    """How to sign the exact bytes sent. Filled in by issue 3."""

    scheme: str

    def prepare(self, body: Any) -> Any:
        """Give the scheme a chance to change the JSON body before it is serialized
        (the body-token scheme adds its secret there). Default: unchanged."""
        return body

    def headers(self, raw_body: bytes) -> dict[str, str]:
        """Signature headers for the exact bytes about to be sent."""
        return {}
