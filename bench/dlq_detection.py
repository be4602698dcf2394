"""Benchmark: how long from a DLQ write to the Redis DLQ collector's observation?

Not a test. Run ``python bench/dlq_detection.py [--seconds 20] [--rates 1,100] [--shapes list]``
from the repo root. It starts its own private redis-server.

Why: push mode claims a sighting within a round trip of the write; poll mode within
``poll_interval``. This measures both, next to the floor: a bare redis-py client doing the same
wait with nothing else to do (push: a keyspace notification, then reading the key; streams:
``XREAD BLOCK``; poll: reading the key every ``poll_interval``).

Setup: the writer is a separate process (its own interpreter, as the funnel would be), writing
entries in the sandbox DLQ format open-loop, Poisson arrivals at the given mean rate (a fixed rate
would lock into phase with the poll interval), and keeping the key bounded (LTRIM /
ZREMRANGEBYRANK / XADD MAXLEN, ``--keep`` entries). It stamps ``time.monotonic()`` just before each
write; ``time.monotonic`` is system-wide, so that stamp and the watcher's are comparable. Delay is
the moment ``Watch.observe`` is called (or the bare client finds the trace id) minus that stamp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis  # noqa: E402

from collectors.redis_dlq import RedisDlqCollector, RedisDlqConfig  # noqa: E402
from tracer import clock  # noqa: E402
from tracer.probe import Probe  # noqa: E402
from tracer.sandbox.dlq import new_entry, to_fields  # noqa: E402
from tracer.sandbox.redis_process import PrivateRedis  # noqa: E402
from tracer.spec import HopSpec  # noqa: E402
from tracer.watch import Observation, Watch  # noqa: E402

KEY = "dlq:bench"
TRACE = re.compile(r"[0-9a-f]{32}")
POLL = 0.5


@dataclass(eq=False)
class StampedWatch(Watch):
    """Remembers when the collector called ``observe`` (the moment it knew)."""

    seen_at: float | None = None

    def observe(self, obs: Observation) -> None:
        if self.seen_at is None:
            self.seen_at = clock.now()
        super().observe(obs)


# -- the writer (another process) ----------------------------------------------------------


def write_entries(
    url: str, shape: str, trace_ids: list[str], rate: float, start_at: float, keep: int
) -> list[float]:
    """Open loop, Poisson arrivals (seeded). Returns the monotonic stamp taken just before each write."""
    import random

    import redis

    r = redis.Redis.from_url(url)
    rng = random.Random(7)
    stamps = []
    due = start_at
    for tid in trace_ids:
        due += rng.expovariate(rate)
        while (left := due - time.monotonic()) > 0:
            time.sleep(min(left, 0.005))
        entry = new_entry("webhooks", {"trace_id": tid}, "HTTP 500", max_attempts=5)
        stamps.append(time.monotonic())
        if shape == "list":
            p = r.pipeline(transaction=False)
            p.lpush(KEY, json.dumps(entry))
            p.ltrim(KEY, 0, keep - 1)
            p.execute()
        elif shape == "zset":
            p = r.pipeline(transaction=False)
            p.zadd(KEY, {json.dumps(entry): time.time() + 3600})
            p.zremrangebyrank(KEY, 0, -keep - 1)
            p.execute()
        else:
            r.xadd(KEY, to_fields(entry), maxlen=keep, approximate=False)
    r.close()
    return stamps


# -- the watchers ----------------------------------------------------------------------------


async def watch_collector(
    url: str, mode: str, shape: str, trace_ids: list[str], run: Any
) -> dict[str, float]:
    c = RedisDlqCollector(RedisDlqConfig(url=url, mode=mode, poll_interval=POLL))
    await c.start()
    watches = []
    for tid in trace_ids:
        hop = HopSpec(name="entry", target=60, redis_dlq={"key": KEY, "shape": shape})
        w = StampedWatch(probe=Probe(step="dlq", trace_id=tid), hop=hop, since=clock.now())
        c.watch(w)
        watches.append(w)
    await run()
    await c.close()
    return {w.trace_id: w.seen_at for w in watches if w.seen_at is not None}


async def watch_bare(url: str, mode: str, shape: str, trace_ids: list[str], run: Any) -> dict[str, float]:
    """The floor: the least a client can do to learn that an entry arrived."""
    wanted, seen = set(trace_ids), {}
    r = Redis.from_url(url, decode_responses=True)
    stop = asyncio.Event()

    def found(text: str, at: float) -> None:
        for tid in TRACE.findall(text):
            if tid in wanted and tid not in seen:
                seen[tid] = at

    async def push() -> None:
        if shape == "stream":
            last = "$"
            while not stop.is_set():
                for _, entries in await r.xread({KEY: last}, block=200) or []:
                    at = clock.now()
                    for entry_id, fields in entries:
                        last = entry_id
                        found(json.dumps(fields), at)
            return
        await r.config_set("notify-keyspace-events", "Klz")
        ps = r.pubsub()
        await ps.psubscribe(f"__keyspace@0__:{KEY}")
        while not stop.is_set():
            msg = await ps.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if msg and msg["data"] in ("lpush", "zadd"):
                head = await (r.lrange(KEY, 0, 9) if shape == "list" else r.zrevrange(KEY, 0, 9))
                found(" ".join(head), clock.now())
        await ps.aclose()

    async def poll() -> None:
        last = "0-0"
        while not stop.is_set():
            if shape == "list":
                found(" ".join(await r.lrange(KEY, 0, -1)), clock.now())
            elif shape == "zset":
                found(" ".join(await r.zrange(KEY, 0, -1)), clock.now())
            else:
                entries = await r.xrange(KEY, f"({last}", "+")
                at = clock.now()
                for entry_id, fields in entries:
                    last = entry_id
                    found(json.dumps(fields), at)
            await asyncio.sleep(POLL)

    task = asyncio.create_task(push() if mode == "push" else poll())
    await asyncio.sleep(0.2)
    await run()
    stop.set()
    await asyncio.wait([task], timeout=2)
    await r.aclose()
    return seen


# -- one case --------------------------------------------------------------------------------


async def one_case(
    pool: ProcessPoolExecutor,
    server: PrivateRedis,
    watcher: str,
    shape: str,
    rate: float,
    seconds: float,
    keep: int,
) -> dict[str, Any]:
    server.flush()
    trace_ids = [Probe(step="dlq").trace_id for _ in range(max(1, int(rate * seconds)))]
    kind, mode = watcher.split(" ")
    stamps: list[float] = []

    async def run() -> None:
        await asyncio.sleep(0.5)  # first look / subscription done
        loop = asyncio.get_running_loop()
        start_at = time.monotonic() + 0.5
        stamps.extend(
            await loop.run_in_executor(
                pool, write_entries, server.url, shape, trace_ids, rate, start_at, keep
            )
        )
        await asyncio.sleep(2 * POLL + 0.5)  # stragglers

    fn = watch_collector if kind == "collector" else watch_bare
    seen = await fn(server.url, mode, shape, trace_ids, run)
    delays = sorted(seen[tid] - t for tid, t in zip(trace_ids, stamps, strict=True) if tid in seen)
    return {
        "watcher": watcher,
        "shape": shape,
        "rate": rate,
        "n": len(trace_ids),
        "seen": len(delays),
        "p50": _pct(delays, 0.50),
        "p99": _pct(delays, 0.99),
        "max": delays[-1] if delays else float("nan"),
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="writing time per case")
    ap.add_argument("--rates", default="1,100", help="entries per second, comma-separated")
    ap.add_argument("--shapes", default="list", help="list,zset,stream")
    ap.add_argument("--keep", type=int, default=200, help="entries kept in the DLQ key")
    args = ap.parse_args()
    rates = [float(x) for x in args.rates.split(",")]
    shapes = args.shapes.split(",")
    watchers = ["collector push", "bare push", "collector poll", "bare poll"]
    rows = []
    with (
        PrivateRedis() as server,
        ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool,
    ):
        for shape in shapes:
            for rate in rates:
                for watcher in watchers:
                    row = await one_case(pool, server, watcher, shape, rate, args.seconds, args.keep)
                    rows.append(row)
                    print(
                        f"  {shape} {rate:g}/s {watcher}: p50 {_ms(row['p50'])} p99 {_ms(row['p99'])}",
                        file=sys.stderr,
                    )
    print(
        f"python bench/dlq_detection.py --seconds {args.seconds:g} --rates {args.rates} --shapes {args.shapes}\n"
    )
    print(
        f"{platform.machine()}, Python {platform.python_version()}, poll_interval {POLL:g} s, key kept at {args.keep} entries\n"
    )
    print("| shape | entries/s | watcher | p50 | p99 | max | seen |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['rate']:g} | {r['watcher']} | {_ms(r['p50'])} | {_ms(r['p99'])} | "
            f"{_ms(r['max'])} | {r['seen']}/{r['n']} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
