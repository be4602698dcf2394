"""The YAML side of the Redis DLQ sink: the sink's connection settings and one hop's keys.

Kept apart from the collector so ``tracer.spec`` can build its schema without importing the
Redis session, and so a reader sees every knob of the sink in one place.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tracer.net import check_redis_url
from tracer.schema import Duration, Model, Secret

_PATH = r"^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*$"
GLOB = re.compile(r"(?<!\\)[*?\[]")
Event = Literal["entry", "retry", "resolved", "dead"]


class RedisDlqConfig(Model):
    url: Secret = Field(description="redis:// URL of the DLQ's Redis; may carry a password (never logged)")
    mode: Literal["push", "poll"] = Field("push", description="push: keyspace notifications + XREAD BLOCK")
    poll_interval: Duration = Field(0.5, gt=0, description="poll mode: look interval; push: safety-net look")
    reconnect_backoff: Duration = Field(
        0.2, gt=0, description="first reconnect delay; doubles up to max_backoff"
    )
    max_backoff: Duration = Field(5.0, gt=0)
    timeout: Duration = Field(2.0, gt=0, description="connect and command timeout")
    max_scan: int = Field(10_000, gt=0, description="entries read per key per look")
    max_keys: int = Field(1_000, gt=0, description="keys a glob pattern may match")
    configure_notifications: bool = Field(True, description="allow CONFIG SET notify-keyspace-events")
    keep_notifications: bool = Field(
        False,
        description="leave the notify-keyspace-events flags funnel-tracer added in place on exit "
        "(default: they are removed again, so Redis is left as it was found)",
    )

    _url = field_validator("url")(check_redis_url)


class RedisDlqHop(Model):
    key: str = Field(min_length=1, description="the DLQ key, or a glob pattern such as dlq:*")
    shape: Literal["list", "zset", "stream"] = "list"
    event: Event = "entry"
    trace_path: str | None = Field(
        None, pattern=_PATH, description="dotted path to the trace id; default: anywhere"
    )
    attempt_field: str = Field("attempt", pattern=_PATH)
    first_attempt: int = Field(
        1, description="attempt of a freshly parked entry; higher on first sight = retried"
    )
    timestamp_field: str | None = Field("created_at", pattern=_PATH, description="the entry's own timestamp")
    processing_key: str | None = Field(None, description="where the worker keeps claimed entries (list/zset)")
    dead_key: str | None = None
    meta_hash: str | None = Field(None, description="hash of entry id -> JSON metadata; members are ids")
    meta_id_path: str | None = Field(
        None,
        pattern=_PATH,
        description="members are JSON entries and their meta_hash field is named from the id at "
        "this path inside each member (default: members are bare ids)",
    )
    meta_field: str = Field(
        "{id}",
        description="template of the meta_hash field holding an entry's metadata, e.g. "
        "'attempts:{id}'; its value is JSON metadata, or a bare number taken as the attempt",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RedisDlqHop:
        if self.event == "dead" and self.dead_key is None:
            raise ValueError("event 'dead' needs dead_key")
        if self.shape == "stream" and (self.processing_key or self.meta_hash):
            raise ValueError(
                "a stream keeps claimed entries in its consumer group: no processing_key or meta_hash"
            )
        if self.meta_id_path is not None and self.meta_hash is None:
            raise ValueError("meta_id_path needs meta_hash")
        if "{id}" not in self.meta_field:
            raise ValueError("meta_field must contain {id}")
        for name in ("processing_key", "dead_key", "meta_hash"):
            value = getattr(self, name)
            if value is not None and GLOB.search(value):
                raise ValueError(f"{name} must be a single key, not a pattern")
        return self
