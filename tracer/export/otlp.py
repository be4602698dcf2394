"""Which OTLP exporter the standard ``OTEL_*`` variables ask for, per signal (traces, metrics).

Per the OTel spec: a signal-specific variable wins over the generic one; the protocol defaults to
``http/protobuf``; ``OTEL_SDK_DISABLED=true`` or ``OTEL_<SIGNAL>_EXPORTER=none`` turns export off.
With no endpoint set nothing is exported, so a laptop run never spams connection errors.
"""

from __future__ import annotations

import os
from typing import Literal

Signal = Literal["traces", "metrics"]


def _env(signal: Signal, name: str) -> str | None:
    return os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_{name}") or os.environ.get(
        f"OTEL_EXPORTER_OTLP_{name}"
    )


def configured(signal: Signal) -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(_env(signal, "ENDPOINT"))


def protocol(signal: Signal) -> str:
    """``grpc`` or ``http/protobuf``; endpoint, headers and TLS are read by the exporter itself."""
    return (_env(signal, "PROTOCOL") or "http/protobuf").lower()
