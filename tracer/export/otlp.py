"""Which OTLP exporter the standard ``OTEL_*`` variables ask for, per signal (traces, metrics).

Per the OTel spec: a signal-specific variable wins over the generic one; the protocol defaults to
``http/protobuf``; ``OTEL_SDK_DISABLED=true`` or ``OTEL_<SIGNAL>_EXPORTER=none`` turns export off.
With no endpoint set nothing is exported, so a laptop run never spams connection errors.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
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


class TelemetryConfigError(Exception):
    """An ``OTEL_*`` variable the OpenTelemetry SDK refuses (it raises for some, e.g. a negative
    ``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT`` or an unknown ``OTEL_METRICS_EXEMPLAR_FILTER``, where it
    only warns for others): a configuration error, exit 2, before any probe."""


@contextlib.contextmanager
def from_env(what: str) -> Iterator[None]:
    """Build ``what`` (a provider, an exporter) from the environment; the SDK's ValueError
    becomes one line naming the OTEL_* variables set (never their values: headers are secrets)."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        names = sorted(k for k in os.environ if k.startswith("OTEL_"))
        raise TelemetryConfigError(
            f"invalid OpenTelemetry settings for {what}: {exc} (OTEL_* variables set: {', '.join(names) or 'none'})"
        ) from None


FLUSH_BUDGET = 5.0  # seconds the last export may hold a process's exit


def bounded(fn: object, seconds: float = FLUSH_BUDGET) -> bool:
    """Run a flush or shutdown (``fn()``) for at most ``seconds``, in a daemon thread: an OTLP
    endpoint that accepts and never answers would otherwise hold the exit for the exporter's
    timeout, per signal and per retry (20 s and more), past a supervisor's kill deadline. The
    SDK's export threads are daemons too, so the process still exits. True if it finished."""
    done = threading.Event()

    def run() -> None:
        try:
            fn()  # type: ignore[operator]
        finally:
            done.set()

    threading.Thread(target=run, name="otlp-final-flush", daemon=True).start()
    return done.wait(seconds)
