"""Time to a launch-gate verdict for 59 lead probes (p95 at 95 %): serial against parallel.

Serial is ``concurrency: 1`` (each probe waits for the previous one to resolve); parallel is the
default concurrency (target / spacing, at most 10) under the same rate limit. Against the
sandbox with the demo's delays (lead 0.2 s, PostHog ingestion 0.3 s), over real sockets.

    python bench/check_parallel.py [--runs 3] [--lead-delay 0.2] [--ingest-delay 0.3]

Numbers go in docs/BENCHMARKS.md; this asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import yaml

from tracer.engine import Engine
from tracer.export.report import summarize
from tracer.sandbox.funnel import Knobs
from tracer.sandbox.posthog import PostHogState
from tracer.sandbox.runner import Sandbox
from tracer.spec import parse_spec

SPEC = """
service: bench
collectors:
  posthog: {{host: "{posthog}", project_id: "1", personal_api_key: phx_sandbox, queries_per_minute: 6000,
            queries_per_hour: 360000, budget_share: 1.0, min_interval: 250ms}}
steps:
  lead:
    spacing: {spacing}
    {concurrency}
    inject:
      http:
        url: "{funnel}/api/v1/leads"
        json: {{name: "Canary {{probe_id}}", email: "canary+{{trace_id}}@example.com"}}
    hops:
      - {{name: posthog_event, target: 5s, deadline: 20s,
         posthog: {{event: lead_captured, property: email, match: contains, value: "canary+{{trace_id}}@"}}}}
"""


async def one_run(sb: Sandbox, concurrency: int | None, spacing: str) -> tuple[float, str, int]:
    text = SPEC.format(
        posthog=sb.posthog_url,
        funnel=sb.url,
        spacing=spacing,
        concurrency=f"concurrency: {concurrency}" if concurrency else "",
    )
    spec = parse_spec(yaml.safe_load(text))
    async with Engine(spec) as engine:
        t0 = time.monotonic()
        results = await engine.check()
        took = time.monotonic() - t0
    hop = summarize(spec, results)["steps"][0]["hops"][0]
    return took, hop["claim"]["outcome"], hop["samples"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lead-delay", type=float, default=0.2)
    ap.add_argument("--ingest-delay", type=float, default=0.3)
    args = ap.parse_args()
    cases = [
        ("serial (concurrency 1)", 1, "100ms"),
        ("parallel, default concurrency (10), spacing 100ms", None, "100ms"),
        ("parallel, default concurrency (10), spacing 500ms", None, "500ms"),
    ]
    with Sandbox(
        knobs=Knobs(lead_delay=args.lead_delay), posthog=PostHogState(ingest_delay=args.ingest_delay)
    ) as sb:
        print(
            f"59 lead probes, lead delay {args.lead_delay}s, ingest delay {args.ingest_delay}s, {args.runs} runs"
        )
        print("| mode | time to verdict (median, min-max) | outcome | probes |")
        print("|---|---:|---|---:|")
        for name, conc, spacing in cases:
            runs = [asyncio.run(one_run(sb, conc, spacing)) for _ in range(args.runs)]
            times = [r[0] for r in runs]
            outcomes = sorted({r[1] for r in runs})
            print(
                f"| {name} | {statistics.median(times):.1f} s ({min(times):.1f}-{max(times):.1f}) | "
                f"{', '.join(outcomes)} | {runs[0][2]} |"
            )


if __name__ == "__main__":
    main()
