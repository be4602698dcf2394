"""HTTP receiver collector for Slack-style and generic JSON webhooks. (Being built: issue 4.)"""

from __future__ import annotations

from tracer.schema import Model


class WebhookConfig(Model):
    host: str = "127.0.0.1"
    port: int = 0


class WebhookHop(Model):
    path: str
