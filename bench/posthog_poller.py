"""Benchmark the PostHog poller against the sandbox's PostHog-compatible server.

(a) HogQL queries per poll cycle with 1, 100 and 1,000 probes in flight (must stay 1).
(b) Measured lag minus ``created_at`` lag over N probes with a known funnel delay. Since the
    sandbox stamps ``created_at`` at capture (as PostHog does), before the row is queryable, this
    error now includes the 0.5 s ingest delay.

(c) Parse time of the collector's query with PostHog's own parser (``hogql-parser``) for 1, 100,
    1,000 and 10,000 probes in flight, both match modes; the old one-LIKE-per-probe shape for
    comparison (at 1,000 only: it grows quadratically).

    python bench/posthog_poller.py [--probes 60] [--parse-only]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time

import yaml

from collectors.posthog import PostHogCollector, PostHogConfig, build_query
from tracer import clock
from tracer.engine import Engine
from tracer.export.report import percentile
from tracer.probe import Probe
from tracer.sandbox.funnel import Knobs
from tracer.sandbox.posthog import PostHogState
from tracer.sandbox.runner import Sandbox
from tracer.spec import HopSpec, parse_spec
from tracer.watch import Watch


async def queries_per_cycle(sb: Sandbox, in_flight: int, cycles: int = 10) -> tuple[int, int, float, int]:
    cfg = PostHogConfig(
        host=sb.posthog_url,
        project_id="1",
        personal_api_key="phx_sandbox",
        queries_per_minute=6000,
        queries_per_hour=360000,
        budget_share=1.0,
        min_interval=0.2,
    )
    hop = HopSpec(
        name="h",
        target=5,
        posthog={
            "event": "lead_captured",
            "property": "email",
            "match": "contains",
            "value": "canary+{trace_id}@",
        },
    )
    collector = PostHogCollector(cfg)
    await collector.start()
    for _ in range(in_flight):
        collector.watch(Watch(probe=Probe(step="lead"), hop=hop, since=clock.now()))
    before, cycles_before = sb.posthog.queries, collector.cycles
    started = time.perf_counter()
    await asyncio.sleep(cycles * collector.interval + 0.05)
    elapsed = time.perf_counter() - started
    received, run = sb.posthog.queries - before, collector.cycles - cycles_before
    await collector.close()
    return run, received, elapsed / max(received, 1), collector.last_query_bytes


def lag_error(sb: Sandbox, probes: int) -> dict[str, float]:
    from pathlib import Path

    text = Path("tracer/data/sandbox.yaml").read_text()

    os.environ["FUNNEL_URL"], os.environ["POSTHOG_HOST"] = sb.url, sb.posthog_url
    spec = parse_spec(yaml.safe_load(text))
    # The lead step alone: the other steps need Redis and receivers this benchmark does not start.
    spec = spec.model_copy(update={"steps": {"lead": spec.steps["lead"].model_copy(update={"spacing": 0.1})}})

    async def go():
        async with Engine(spec) as engine:
            return await engine.check(probes), engine.collectors["posthog"].interval

    results, interval = asyncio.run(go())
    errors = [
        h.lag - h.sink_lag for r in results for h in r.hops if h.lag is not None and h.sink_lag is not None
    ]
    return {
        "n": len(errors),
        "p50": percentile(errors, 50),
        "p99": percentile(errors, 99),
        "max": max(errors),
        "min": min(errors),
        "interval": interval,
    }


def parse_times() -> None:
    """Median of 3 parses per shape, PostHog's parser in this process (no HTTP)."""
    from statistics import median

    from tracer.sandbox.posthog.parser import parse_select

    def watches(n: int, match: str) -> list[Watch]:
        value = "{trace_id}" if match == "equals" else "canary+{trace_id}@"
        hop = HopSpec(
            name="h",
            target=5,
            posthog={"event": "lead_captured", "property": "email", "match": match, "value": value},
        )
        return [Watch(Probe("lead"), hop, since=clock.now()) for _ in range(n)]

    def timed(text: str) -> float:
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            parse_select(text)
            runs.append(time.perf_counter() - t)
        return median(runs)

    now = time.time()
    print("\n(c) parse time with PostHog's parser (hogql-parser), median of 3\n")
    print("| probes in flight | match | query size | parse time |\n|---:|---|---:|---:|")
    for n in (1, 100, 1000, 10_000):
        for match in ("equals", "contains"):
            text = build_query(watches(n, match), now - 60, now + 60)[0]
            print(f"| {n:,} | {match} | {len(text) / 1024:.1f} KiB | {timed(text) * 1000:.0f} ms |")
    old = " OR ".join(f"properties.email LIKE '%canary+{w.trace_id}@%'" for w in watches(1000, "contains"))
    text = f"SELECT uuid FROM events WHERE event = 'lead_captured' AND ({old}) LIMIT 4000"
    print(f"| 1,000 | old `LIKE … OR` chain | {len(text) / 1024:.1f} KiB | {timed(text) * 1000:.0f} ms |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=60)
    ap.add_argument("--parse-only", action="store_true", help="only (c), no sandbox")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    parse_times()
    if args.parse_only:
        return
    with Sandbox(knobs=Knobs(lead_delay=0.5), posthog=PostHogState(ingest_delay=0.5)) as sb:
        print("\n(a) queries per poll cycle (server-side count / collector cycles)\n")
        print(
            "| probes in flight | poll cycles | queries received | queries per cycle | mean gap | query size |"
        )
        print("|---:|---:|---:|---:|---:|---:|")
        for n in (1, 100, 1000):
            run, received, gap, size = asyncio.run(queries_per_cycle(sb, n))
            print(
                f"| {n} | {run} | {received} | {received / max(run, 1):.2f} | {gap * 1000:.0f} ms | {size / 1024:.1f} KiB |"
            )
        r = lag_error(sb, args.probes)
        print(f"\n(b) measured minus true lag, {r['n']} probes, lead delay 0.5 s + ingest delay 0.5 s\n")
        print("| poll interval | p50 error | p99 error | min | max |\n|---:|---:|---:|---:|---:|")
        print(
            f"| {r['interval'] * 1000:.0f} ms | {r['p50'] * 1000:.0f} ms | {r['p99'] * 1000:.0f} ms | "
            f"{r['min'] * 1000:.0f} ms | {r['max'] * 1000:.0f} ms |"
        )


if __name__ == "__main__":
    main()
