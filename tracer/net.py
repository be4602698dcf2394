"""Network helpers every layer may use: secret-free URLs and errors, loopback checks.

Kept here, below the collectors and injectors, so a sink never borrows from another sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
from typing import Any
from urllib.parse import urlsplit

import httpx

from tracer.schema import Secret

MAX_BODY = 1 << 20  # bytes of a response kept: an answer, a token, captures; never a download


def redact_url(url: str) -> str:
    """``redis://:pw@host:6379/0?x=y`` -> ``redis://host:6379/0``: userinfo and query may hold secrets."""
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return f"{p.scheme}://{host}{p.path}"


def scrub(text: str, url: str) -> str:
    """Remove the URL's password and username from an error message, should a library echo them."""
    p = urlsplit(url)
    for secret in (p.password, p.username):
        if secret:
            text = text.replace(secret, "***")
    return text


def short_redis_error(exc: BaseException, url: str) -> str:
    """A short, secret-free description of a Redis failure."""
    name = type(exc).__name__
    if isinstance(exc, TimeoutError) or name == "TimeoutError":
        return "timeout"
    if isinstance(exc, OSError) or name == "ConnectionError":
        return "connection refused or lost"
    if name == "AuthenticationError":
        return "authentication failed"
    return scrub(f"{name}: {exc}", url)[:160]


def check_redis_url(v: Secret) -> Secret:
    """Pydantic field validator for Redis URLs (the value itself is never echoed)."""
    if not v.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return v


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Backoff:
    """A poller's wait after a failed look: doubling from its interval up to ``cap``, with jitter,
    and never shorter than a numeric ``Retry-After`` (bounded at 5 x ``cap``; an HTTP-date one
    keeps our own). ``reset`` after a good look. One rule for every polling collector."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.current = 0.0

    def next(self, interval: float, retry_after: str | None = None) -> float:
        self.current = min(self.cap, max(interval, self.current * 2 or interval))
        delay = self.current * (0.8 + 0.4 * random.random())
        if retry_after:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), self.cap * 5))
        return delay

    def longest(self) -> float:
        """Wait the cap (a permanent error: look again rarely, it may have been fixed)."""
        self.current = self.cap
        return self.current

    def reset(self) -> None:
        self.current = 0.0


async def request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    timeout: float,
    max_body: int = MAX_BODY,
    **kw: Any,
) -> httpx.Response:
    """``client.request`` with ``timeout`` as a bound on the *whole* exchange and at most
    ``max_body`` bytes of the body kept (the rest is not read; the connection is dropped).

    Why: httpx's timeout bounds each network read, so a server that drips a byte a second (or
    streams a gigabyte) holds a plain ``request`` forever and its memory grows. An exchange that
    overruns raises ``httpx.TimeoutException``; a body cut short sets ``extensions["truncated"]``."""
    req = client.build_request(method, url, timeout=timeout, **kw)
    try:
        async with asyncio.timeout(timeout):
            resp = await client.send(req, stream=True)
            try:
                body = bytearray()
                truncated = False
                async for chunk in resp.aiter_bytes():  # decoded, one chunk at a time
                    body += chunk
                    if len(body) > max_body:
                        truncated = True
                        break
            finally:
                await resp.aclose()
    except TimeoutError:
        raise httpx.ReadTimeout(f"no complete answer within {timeout:g}s", request=req) from None
    headers = [
        (k, v)
        for k, v in resp.headers.multi_items()
        if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")  # decoded above
    ]
    return httpx.Response(
        resp.status_code,
        headers=headers,
        content=bytes(body[:max_body]),
        request=req,
        extensions={"truncated": truncated, "http_version": resp.http_version.encode()},
    )
