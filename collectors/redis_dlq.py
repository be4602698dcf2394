"""Redis dead-letter-queue collector. (Being built: issue 3.)"""

from __future__ import annotations

from tracer.schema import Model


class RedisDlqConfig(Model):
    url: str


class RedisDlqHop(Model):
    key: str
    event: str = "entry"
