"""A raw-socket HTTP/1.1 server on loopback for adversarial tests: each request goes to a handler
that may answer anything at all (stall, reset, trickle, bombs), which no framework would send.

Threads, not asyncio: the code under test runs its own event loop in the test thread, and a
handler that sleeps must stall only its own connection.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = 0.0  # time.monotonic() when it was read

    def json(self) -> Any:
        return json.loads(self.body or b"null")


Handler = Callable[[Request, socket.socket], None]


def response(
    status: int = 200, body: bytes | str | Any = b"", headers: dict[str, str] | None = None, reason: str = "X"
) -> bytes:
    """A whole HTTP/1.1 response with ``Connection: close``; non-bytes bodies are sent as JSON."""
    if isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, bytes):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    head = {"Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in head.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Hostile:
    """Serve ``handler`` on a free loopback port until closed. ``requests`` keeps what arrived."""

    handler: Handler
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        import time

        with conn:
            try:
                conn.settimeout(30)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                first, *rest = head.decode("latin-1").split("\r\n")
                method, path, _ = first.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest)}
                want = int(headers.get("content-length", "0"))
                while len(body) < want:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    body += chunk
                req = Request(method, path, headers, body, time.monotonic())
                self.requests.append(req)
                self.handler(req, conn)
            except OSError:
                return  # the client gave up: that is the point of most of these tests

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def __enter__(self) -> Hostile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
