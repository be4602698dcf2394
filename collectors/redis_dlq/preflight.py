"""The Redis DLQ sink's preflight (``funnel-tracer doctor``): Redis answers with these
credentials, each watched key holds what its hop's ``shape`` says, and what funnel-tracer will
do about keyspace notifications. Reads only (PING, TYPE, CONFIG GET): nothing is written.
"""

from __future__ import annotations

import contextlib
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, InvalidResponse, ResponseError

from collectors.redis_dlq.config import GLOB, RedisDlqConfig, RedisDlqHop
from collectors.redis_dlq.session import NOTIFY
from tracer.net import is_redis_failure, redact_url
from tracer.net import short_redis_error as short_error
from tracer.plugins import Finding

WHERE = "collectors.redis_dlq"
TYPES = {"list": "list", "zset": "zset", "stream": "stream"}


async def preflight(config: RedisDlqConfig, hops: list[Any]) -> list[Finding]:
    url = config.url.get_secret_value()
    shown = redact_url(url)
    r = Redis.from_url(
        url, decode_responses=True, socket_timeout=config.timeout, socket_connect_timeout=config.timeout
    )
    try:
        try:
            if await r.ping() is not True:  # something answered, but not PONG
                raise InvalidResponse("not a Redis reply to PING")
        except AuthenticationError as exc:
            return [
                Finding(
                    f"{WHERE}: Redis at {shown}",
                    False,
                    short_error(exc, url),
                    fix=f"check the user and password in {WHERE}.url (or the variable it comes from)",
                    blocks=True,
                )
            ]
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            return [
                Finding(
                    f"{WHERE}: Redis at {shown}",
                    False,
                    short_error(exc, url),
                    fix=f"is Redis running and reachable at {shown}?",
                )
            ]
        findings = [Finding(f"{WHERE}: Redis at {shown} answers", True)]
        findings += await _keys(r, url, [h for h in hops if isinstance(h, RedisDlqHop)])
        findings.append(await _notifications(r, config))
        return findings
    finally:
        with contextlib.suppress(Exception):
            await r.aclose()


async def _keys(r: Redis, url: str, hops: list[RedisDlqHop]) -> list[Finding]:
    """Each concrete key's type against the hop's shape (a missing key is fine: not written yet)."""
    want: dict[str, tuple[str, str]] = {}  # key -> (expected type, which option)
    for h in hops:
        if not GLOB.search(h.key):
            want.setdefault(h.key, (TYPES[h.shape], f"shape: {h.shape}"))
        for name in ("processing_key", "dead_key"):
            k = getattr(h, name)
            if k:
                want.setdefault(k, (TYPES[h.shape], f"shape: {h.shape} ({name})"))
        if h.meta_hash:
            want.setdefault(h.meta_hash, ("hash", "meta_hash"))
    out: list[Finding] = []
    for key, (expected, why) in sorted(want.items()):
        try:
            actual = await r.type(key)
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            out.append(Finding(f"{WHERE}: key {key!r}", False, f"TYPE failed: {short_error(exc, url)}"))
            continue
        if actual == "none":
            out.append(Finding(f"{WHERE}: key {key!r}", True, "does not exist yet"))
        elif actual == expected:
            out.append(Finding(f"{WHERE}: key {key!r} is a {actual}", True))
        else:
            out.append(
                Finding(
                    f"{WHERE}: key {key!r}",
                    False,
                    f"it is a {actual}, but the hop says {why}",
                    fix=f"set shape: {actual} on the hop, or point it at the right key"
                    if why.startswith("shape") and actual in TYPES
                    else "point the hop at the right key",
                )
            )
    return out


async def _notifications(r: Redis, config: RedisDlqConfig) -> Finding:
    check = f"{WHERE}: keyspace notifications"
    if config.mode == "poll":
        return Finding(check, True, f"not used (mode: poll, a look every {config.poll_interval:g}s)")
    try:
        current = (await r.config_get("notify-keyspace-events")).get("notify-keyspace-events", "")
    except ResponseError:
        return Finding(
            check,
            True,
            f"CONFIG GET is not allowed: funnel-tracer will poll every {config.poll_interval:g}s",
        )
    have = set(current.replace("A", "g$lshzxetd"))
    missing = "".join(c for c in NOTIFY if c not in have)
    if not missing:
        return Finding(check, True, f"on ({current!r}); funnel-tracer will not change them")
    state = "off" if not current else f"partly on ({current!r})"
    if not config.configure_notifications:
        return Finding(
            check,
            True,
            f"{state}; configure_notifications is false, so funnel-tracer will poll every "
            f"{config.poll_interval:g}s (to use push, add {missing!r} to notify-keyspace-events)",
        )
    after = (
        "keep them (keep_notifications: true)" if config.keep_notifications else "remove them again on exit"
    )
    return Finding(check, True, f"{state}; funnel-tracer will add {missing!r} at start and {after}")
