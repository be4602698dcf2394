"""Benchmark: how long from a webhook's socket write to the receiver's observation?

Not a test. Run ``python bench/receiver_detection.py [--duration 10]`` from the repo root.

Why: a push receiver claims ``at == not_before`` (no error bar). This measures what that claim
hides: the time between the sender writing the request and ``Watch.observe``, at a calm and a
busy rate, next to the floor, a bare uvicorn ASGI app that does nothing but timestamp.

Setup: the load generator is a separate process (its own interpreter and loop, as a real
sender would be) writing Slack-style posts, open-loop at a fixed rate, over a bounded pool of
keep-alive loopback connections. ``time.monotonic`` is system-wide, so the sender's write time
and the receiver's stamp are comparable. Both receivers run on this process's loop with the
same uvicorn settings; the collector also checks a secret path and an HMAC signature.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn  # noqa: E402

from collectors.webhook import WebhookCollector, WebhookConfig, bind  # noqa: E402
from tracer import clock  # noqa: E402
from tracer.probe import Probe  # noqa: E402
from tracer.spec import HopSpec  # noqa: E402
from tracer.watch import Watch  # noqa: E402

SECRET, KEY = "bench-secret", "bench-key"
CONNECTIONS = 32
TRACE = re.compile(rb"[0-9a-f]{32}")


def request_bytes(trace_id: str, path: str) -> bytes:
    body = json.dumps(
        {
            "text": f"Approval requested: ana wants prod-db (trace {trace_id})",
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": "*ana* wants *prod-db*"}},
                {"type": "context", "elements": [{"type": "mrkdwn", "text": f"trace `{trace_id}`"}]},
            ],
        }
    ).encode()
    sig = hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-Signature: sha256={sig}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# -- load generator (child process) ----------------------------------------------------------
def generate(port: int, requests: list[tuple[str, bytes]], rate: float) -> list[tuple[str, float, int]]:
    return asyncio.run(_generate(port, requests, rate))


async def _generate(
    port: int, requests: list[tuple[str, bytes]], rate: float
) -> list[tuple[str, float, int]]:
    """Open loop: request i is due at start + i/rate; a free connection writes it then."""
    queue: asyncio.Queue[tuple[float, str, bytes]] = asyncio.Queue()
    start = time.monotonic() + 0.2
    for i, (tid, raw) in enumerate(requests):
        queue.put_nowait((start + i / rate, tid, raw))
    results: list[tuple[str, float, int]] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while not queue.empty():
            due, tid, raw = queue.get_nowait()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            written = time.monotonic()
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length:\s*(\d+)", head, re.I).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            results.append((tid, written, int(head.split()[1])))
        writer.close()

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
    return results


# -- receivers (this process) -------------------------------------------------------------------
class Bare:
    """The floor: an ASGI app that reads the body and stamps it; matching happens afterwards."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        self.stamps.append((clock.now(), body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


async def run_bare(rate: float, duration: float, pool: ProcessPoolExecutor) -> list[float]:
    app = Bare()
    sock = bind("127.0.0.1", 0)
    config = uvicorn.Config(
        app, interface="asgi3", lifespan="off", log_config=None, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    ids = [Probe(step="bench").trace_id for _ in range(int(rate * duration))]
    requests = [(tid, request_bytes(tid, "/slack")) for tid in ids]
    port = sock.getsockname()[1]
    sent = await asyncio.get_running_loop().run_in_executor(pool, generate, port, requests, rate)
    server.should_exit = True
    await task
    seen = {}
    for at, body in app.stamps:
        m = TRACE.search(body)
        if m:
            seen[m.group().decode()] = at
    return [seen[tid] - written for tid, written, status in sent if status == 200 and tid in seen]


async def run_collector(rate: float, duration: float, pool: ProcessPoolExecutor) -> list[float]:
    hook = WebhookCollector(WebhookConfig(secret_path=SECRET, hmac_secret=KEY, max_connections=256))
    await hook.start()
    hop = HopSpec(name="slack", target=300, webhook={"path": "slack"})
    watches = {}
    for _ in range(int(rate * duration)):
        w = Watch(probe=Probe(step="bench"), hop=hop, since=clock.now())
        hook.watch(w)
        watches[w.trace_id] = w
    requests = [(tid, request_bytes(tid, f"/{SECRET}/slack")) for tid in watches]
    assert hook.port is not None
    sent = await asyncio.get_running_loop().run_in_executor(pool, generate, hook.port, requests, rate)
    await hook.close()
    lags = []
    for tid, written, status in sent:
        first = watches[tid].first
        if status == 200 and first is not None:
            lags.append(first.at - written)
    return lags


def row(name: str, rate: float, n: int, lags: list[float]) -> str:
    if not lags:
        return f"| {name} | {rate:g} | {n} | 0 | - | - | - |"
    q = statistics.quantiles(lags, n=100, method="inclusive")
    ms = [x * 1000 for x in (q[49], q[98], max(lags))]
    return f"| {name} | {rate:g} | {n} | {len(lags)} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case")
    parser.add_argument("--rates", type=float, nargs="+", default=[10.0, 500.0])
    args = parser.parse_args()
    lines = [
        "| receiver | req/s | sent | seen | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    with ProcessPoolExecutor(max_workers=1) as pool:
        pool.submit(time.sleep, 0).result()  # start the worker before timing anything
        for rate in args.rates:
            n = int(rate * args.duration)
            lines.append(row("bare uvicorn (floor)", rate, n, await run_bare(rate, args.duration, pool)))
            lines.append(row("WebhookCollector", rate, n, await run_collector(rate, args.duration, pool)))
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
