"""The canary's small HTTP endpoint: ``/healthz`` and ``/metrics`` (Prometheus text).

``/healthz`` answers 200 only when every collector is healthy (can see its sink), else 503; the
JSON body has each collector's ``health()`` and the ledger's (no secrets in either). The ledger's
state is reported but does not fail the check: probes keep running from memory while it is down.

A plain asyncio server on the canary's own loop: one request per connection, bounded request
size and read time, so a misbehaving scraper cannot hold memory or the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_HEAD = 8192
READ_TIMEOUT = 5.0


class StatusServer:
    def __init__(
        self,
        host: str,
        port: int,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        metrics: Callable[[], str],
    ) -> None:
        self.host, self.port = host, port
        self._health = health
        self._metrics = metrics
        self._server: asyncio.base_events.Server | None = None
        self.requests = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._reply(writer, 400, "text/plain", b"bad request\n")
                return
            method, target = parts[0], parts[1].split("?", 1)[0]
            self.requests += 1
            if method not in ("GET", "HEAD"):
                await self._reply(writer, 405, "text/plain", b"GET only\n", head_only=False)
            elif target == "/healthz":
                ok, body = self._health()
                data = (json.dumps(body, indent=1, default=str) + "\n").encode()
                await self._reply(writer, 200 if ok else 503, "application/json", data, method == "HEAD")
            elif target == "/metrics":
                data = self._metrics().encode()
                await self._reply(
                    writer, 200, "text/plain; version=0.0.4; charset=utf-8", data, method == "HEAD"
                )
            else:
                await self._reply(writer, 404, "text/plain", b"not found: try /healthz or /metrics\n")
        except (
            asyncio.TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        except Exception:
            log.exception("status endpoint failed on a request")
            with contextlib.suppress(Exception):
                await self._reply(writer, 500, "text/plain", b"internal error\n")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, head_only: bool = False
    ) -> None:
        reason = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }[status]
        headers = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        )
        writer.write(headers.encode() + (b"" if head_only else body))
        await writer.drain()
