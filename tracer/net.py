"""Network helpers every layer may use: secret-free URLs and errors, loopback checks.

Kept here, below the collectors and injectors, so a sink never borrows from another sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import random
from typing import Any
from urllib.parse import urlsplit

import httpx
from redis.exceptions import RedisError

from tracer.schema import Secret

MAX_BODY = 1 << 20  # bytes of a response kept: an answer, a token, captures; never a download


def redact_url(url: str) -> str:
    """``redis://:pw@host:6379/0?x=y`` -> ``redis://host:6379/0``: userinfo and query may hold secrets.
    Never raises: a URL that does not parse (a password with an unencoded ``/`` in it makes
    part of the password look like a port) is shown as its scheme alone."""
    p = urlsplit(url)
    try:
        port = p.port
    except ValueError:
        return f"{p.scheme}://(unparsable URL)"
    if "@" in p.path + p.query + p.fragment:
        return f"{p.scheme}://(unparsable URL)"
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if port:
        host = f"{host}:{port}"
    return f"{p.scheme}://{host}{p.path}"


def scrub(text: str, url: str) -> str:
    """Remove the URL's password and username from an error message, should a library echo them."""
    p = urlsplit(url)
    for secret in (p.password, p.username):
        if secret:
            text = text.replace(secret, "***")
    return text


def from_redis_library(exc: BaseException) -> bool:
    """Raised inside redis-py itself (an AttributeError, TypeError, ... from parsing a reply):
    the server's answer was not what Redis sends, which is the server's fault, not a bug here."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    path = last.tb_frame.f_code.co_filename.replace("\\", "/")
    return "/redis/" in path and "/collectors/" not in path and "/tracer/" not in path


def is_redis_failure(exc: BaseException) -> bool:
    """Anything talking to a Redis-or-not server can throw at us that is not our own bug."""
    return isinstance(exc, (RedisError, OSError, asyncio.TimeoutError)) or from_redis_library(exc)


def short_redis_error(exc: BaseException, url: str) -> str:
    """A short, secret-free description of a Redis failure."""
    name = type(exc).__name__
    if isinstance(exc, UnicodeDecodeError):
        return "a reply that is not UTF-8 text"
    if not isinstance(exc, (RedisError, OSError)) and from_redis_library(exc):
        return f"not a Redis reply ({name} in the client)"
    if isinstance(exc, TimeoutError) or name == "TimeoutError":
        return "timeout"
    if isinstance(exc, OSError) or name == "ConnectionError":
        # A server that answers, but to say it will not serve us, is worth its own words.
        said = str(exc)
        if name == "ConnectionError" and said and not said.startswith(("Error ", "Connection ")):
            return "connection refused: " + scrub(said, url)[:120]
        return "connection refused or lost"
    if name == "AuthenticationError":
        return "authentication failed"
    return scrub(f"{name}: {exc}", url)[:160]


def check_redis_url(v: Secret) -> Secret:
    """Pydantic field validator for Redis URLs (the value itself is never echoed, not even in
    part: a password with an unencoded ``/``, ``?`` or ``#`` would split the URL inside it)."""
    url = v.get_secret_value()
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    p = urlsplit(url)
    try:
        port = p.port
    except ValueError:
        port = -1
    if port == -1 or "@" in p.path + p.query + p.fragment or (url.startswith("redis") and not p.hostname):
        raise ValueError(
            "is not a valid Redis URL (value not shown): characters such as @ : / ? # in the "
            "user or password must be percent-encoded (%40 %3A %2F %3F %23)"
        )
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


class AnswerError(Exception):
    """An HTTP answer that is no evidence: too slow overall, too large, or not JSON. ``why`` is
    short and secret-free (for ``Coverage.failed`` and logs)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


OFF_LOOP_BYTES = 256 * 1024  # bodies larger than this are parsed in a worker thread


async def fetch_json(
    client: httpx.AsyncClient, method: str, url: str, *, timeout: float, max_bytes: int, **kwargs: Any
) -> tuple[httpx.Response, Any]:
    """One request for a poller: ``(response, parsed JSON or None for a non-2xx answer)``.

    ``request`` bounds the whole exchange and the body; here an answer cut at ``max_bytes`` or
    past the deadline is no evidence (``AnswerError``), and a large body is parsed off the event
    loop (deep nesting, which makes the json module raise ``RecursionError``, is "not JSON" like
    any other bad body). Other transport errors are httpx's own."""
    try:
        resp = await request(client, method, url, timeout=timeout, max_body=max_bytes, **kwargs)
    except DeadlineExceeded:
        raise AnswerError(f"no complete answer within {timeout:g}s") from None
    if not 200 <= resp.status_code < 300:
        return resp, None
    if resp.extensions.get("truncated"):
        raise AnswerError(f"answer over {max_bytes} bytes")
    raw = resp.content
    try:
        data = await asyncio.to_thread(json.loads, raw) if len(raw) > OFF_LOOP_BYTES else json.loads(raw)
    except (ValueError, RecursionError):
        raise AnswerError("response is not JSON") from None
    return resp, data


class DeadlineExceeded(httpx.ReadTimeout):
    """The whole exchange overran its timeout (a dripping or endless answer)."""


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
        raise DeadlineExceeded(f"no complete answer within {timeout:g}s", request=req) from None
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
