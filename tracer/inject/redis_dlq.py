"""Inject mode (b): write a synthetic entry straight into a Redis dead-letter queue.

Why: the SLO "DLQ entry -> first retry < 60 s" is about the retry worker, and waiting for a real
delivery to fail would mean breaking one. A synthetic entry in the funnel's own format lets the
worker's freshness be measured in production. Its payload says ``"canary": true`` and carries
the trace id, so the handler the worker retries into can recognize it and do nothing harmful.

The entry is written the way the funnel parks one: LPUSH (or RPUSH) for ``list``, ZADD scored by
the next retry time for ``zset``, XADD with flat fields (non-strings JSON-encoded) for ``stream``.
"""

from __future__ import annotations

import json
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tracer import clock
from tracer.inject import CleanupOutcome, Injection
from tracer.net import check_redis_url, is_redis_failure, redact_url
from tracer.net import short_redis_error as short_error
from tracer.plugins import InjectContext, InjectorPlugin
from tracer.probe import Probe
from tracer.schema import Duration, Model, Secret

DEFAULT_ENTRY: dict[str, Any] = {
    "id": "{uuid}",
    "queue": "webhooks",
    "payload": {"canary": True, "trace_id": "{trace_id}", "probe_id": "{probe_id}", "step": "{step}"},
    "error": "synthetic entry (funnel-tracer canary)",
    "attempt": 1,
    "max_attempts": 5,
    "created_at": "{now_iso}",
    "last_attempt_at": "{now_iso}",
}


class DlqInject(Model):
    url: Secret = Field(description="redis:// URL of the DLQ's Redis; may carry a password (never logged)")
    key: str = Field(min_length=1)
    shape: Literal["list", "zset", "stream"] = "list"
    entry: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_ENTRY),
        description="the entry in the funnel's own format; templates like {trace_id} are filled in",
    )
    push: Literal["lpush", "rpush"] = Field("lpush", description="list: which end the funnel parks at")
    retry_in: Duration = Field(0.0, ge=0, description="zset: score = now + retry_in (the next retry time)")
    score_unit: Literal["s", "ms"] = "s"
    timeout: Duration = Field(5.0, ge=0.1)
    cleanup: bool = Field(
        True, description="remove the probe's synthetic entries once its hops resolved (matched by trace id)"
    )
    cleanup_keys: list[str] = Field(
        default_factory=list,
        description="more keys swept for the probe's entries at cleanup, e.g. the dead-letter key "
        "(key itself always is); lists, sorted sets and streams",
    )

    _url = field_validator("url")(check_redis_url)


def render_entry(spec: DlqInject, probe: Probe) -> dict[str, Any]:
    """The entry for ``probe``. ``{now_iso}`` is filled once, so created_at == last_attempt_at."""
    now_iso = clock.iso(clock.wall(clock.now()))
    fixed = json.loads(json.dumps(spec.entry).replace("{now_iso}", now_iso))
    return probe.render(fixed)


def stream_fields(entry: dict[str, Any]) -> dict[str, str]:
    return {
        str(k): v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in entry.items()
    }


async def send(spec: DlqInject, probe: Probe, client: Redis | None = None) -> Injection:
    """Write one synthetic entry. ``client`` may be shared across probes; otherwise one is opened
    and closed here. Failure is ``ok=False`` with a short error that never holds the URL's secrets."""
    url = spec.url.get_secret_value()
    entry = render_entry(spec, probe)
    op = {"list": spec.push.upper(), "zset": "ZADD", "stream": "XADD"}[spec.shape]
    attrs: dict[str, Any] = {
        "db.system.name": "redis",
        "db.operation.name": op,
        "db.collection.name": spec.key,
        "server.address": urlsplit(url).hostname or redact_url(url),
        "server.port": urlsplit(url).port or 6379,
        "messaging.message.id": str(entry.get("id", "")),
    }
    own = client is None
    r = client or Redis.from_url(
        url,
        decode_responses=True,
        encoding_errors="replace",  # someone's binary member must not stop the sweep
        socket_timeout=spec.timeout,
        socket_connect_timeout=spec.timeout,
        retry=Retry(NoBackoff(), 0),
    )
    sent = clock.now()
    try:
        if spec.shape == "list":
            data = json.dumps(entry, separators=(",", ":"))
            await (r.lpush(spec.key, data) if spec.push == "lpush" else r.rpush(spec.key, data))
        elif spec.shape == "zset":
            score = clock.wall(clock.now()) + spec.retry_in
            await r.zadd(
                spec.key,
                {json.dumps(entry, separators=(",", ":")): score * (1000 if spec.score_unit == "ms" else 1)},
            )
        else:
            attrs["messaging.message.id"] = await r.xadd(spec.key, stream_fields(entry))
    except Exception as exc:
        if not is_redis_failure(exc):
            raise
        error = short_error(exc, url)
        attrs["error.type"] = type(exc).__name__
        return Injection(sent, clock.now(), ok=False, error=error, attributes=attrs)
    finally:
        if own:
            await r.aclose()
    return Injection(sent, clock.now(), ok=True, attributes=attrs)


# Cleanup reads at most this many members of a key: a DLQ is short, and a huge one must not
# stall the canary (entries past it stay, and the outcome says how many were removed).
CLEANUP_SCAN = 10_000


async def remove_entries(spec: DlqInject, probe: Probe, client: Redis | None = None) -> list[CleanupOutcome]:
    """Remove every member carrying the probe's trace id from ``key`` and ``cleanup_keys``,
    whatever the retry worker did to it (bumped attempts, moved it to the dead key)."""
    url = spec.url.get_secret_value()
    own = client is None
    r = client or Redis.from_url(
        url,
        decode_responses=True,
        encoding_errors="replace",  # someone's binary member must not stop the sweep
        socket_timeout=spec.timeout,
        socket_connect_timeout=spec.timeout,
        retry=Retry(NoBackoff(), 0),
    )
    out: list[CleanupOutcome] = []
    tid = probe.trace_id
    try:
        for key in dict.fromkeys([spec.key, *spec.cleanup_keys]):
            try:
                kind = await r.type(key)
                removed = 0
                if kind == "list":
                    for m in {m for m in await r.lrange(key, 0, CLEANUP_SCAN - 1) if tid in m}:
                        removed += int(await r.lrem(key, 0, m))
                elif kind == "zset":
                    hits = [m for m in await r.zrange(key, 0, CLEANUP_SCAN - 1) if tid in m]
                    removed = int(await r.zrem(key, *hits)) if hits else 0
                elif kind == "stream":
                    rows = await r.xrange(key, "-", "+", count=CLEANUP_SCAN)
                    ids = [i for i, fields in rows if any(tid in str(v) for v in fields.values())]
                    removed = int(await r.xdel(key, *ids)) if ids else 0
                out.append(CleanupOutcome(f"remove synthetic entries from {key}", ok=True, removed=removed))
            except Exception as exc:
                if not is_redis_failure(exc):
                    raise
                out.append(
                    CleanupOutcome(
                        f"remove synthetic entries from {key}", ok=False, error=short_error(exc, url)
                    )
                )
    finally:
        if own:
            await r.aclose()
    return out


class DlqInjector:
    """One step's synthetic DLQ entries; a connection per probe (the canary injects rarely).
    Removes them again once the probe resolved (``Cleans``)."""

    def __init__(self, config: DlqInject, ctx: InjectContext) -> None:
        self.spec = config
        self.timeout = config.timeout

    async def send(self, probe: Probe) -> Injection:
        return await send(self.spec, probe)

    async def cleanup(self, probe: Probe) -> list[CleanupOutcome]:
        if not self.spec.cleanup:
            return []
        return await remove_entries(self.spec, probe)

    async def close(self) -> None:
        """Nothing held between probes."""


plugin = InjectorPlugin(
    name="redis_dlq",
    config=DlqInject,
    factory=DlqInjector,
    summary="write a synthetic entry straight into a Redis DLQ, in the funnel's own format",
)
