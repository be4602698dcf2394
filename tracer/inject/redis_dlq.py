"""Write a synthetic entry straight into a Redis DLQ. (Being built: issue 3.)"""

from __future__ import annotations

from tracer.schema import Model


class DlqInject(Model):
    url: str
    key: str
