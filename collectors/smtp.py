"""SMTP receiver collector. (Being built: issue 4.)"""

from __future__ import annotations

from tracer.schema import Model


class SmtpConfig(Model):
    host: str = "127.0.0.1"
    port: int = 0


class SmtpHop(Model):
    to: str | None = None
