"""Benchmark the real trace path: funnel-tracer -> the built Collector -> the built Jaeger v2.

(a) verdict -> visible: `funnel-tracer check -n 1` (ok probes, then lost probes), timed from the
    check process's exit (its verdict is in, its spans flushed on the way out) to the trace
    answering on Jaeger's /api/traces/{id}; polled every 100 ms;
(b) first trace of a fresh stack: Jaeger + Collector + canary started together, time until
    Jaeger lists the first funnel-tracer trace;
(c) load: a real canary at 10 probes/s (one step, 100 ms interval) for --duration seconds;
    the Collector's CPU (user+system over wall, from /proc) and RSS (VmRSS, VmHWM).

Needs the binaries of deploy/build-binaries.sh. Linux only.

    python bench/jaeger_e2e.py                    # ~4 minutes
    python bench/jaeger_e2e.py --samples 5 --duration 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.canary_load import SPEC, STEP, cpu_seconds, rss_mb, sandbox  # noqa: E402
from tests.e2e_stack import Collector, Jaeger  # noqa: E402


def spec_file(fn: int, ph: int, interval: str, target: str = "2s", deadline: str = "3s") -> Path:
    step = STEP.format(name="lead", interval=interval, fn=fn, target=target, deadline=deadline)
    text = SPEC.format(ph=ph, poll="200ms", cap=1000, steps=step)
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)  # noqa: SIM115
    f.write(text)
    f.close()
    return Path(f.name)


def env_for(col: Collector) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FUNNEL_"))}
    return env | {
        "PYTHONPATH": str(ROOT),
        "OTEL_EXPORTER_OTLP_ENDPOINT": col.otlp_http,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "funnel-tracer",
        "POSTHOG_PERSONAL_API_KEY": "phx_sandbox",
    }


def with_otel(proc_args: list[str], col: Collector) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tracer.cli", *proc_args],
        cwd=str(ROOT),
        env=env_for(col),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def verdict_to_visible(jaeger: Jaeger, col: Collector, drop: float, samples: int) -> list[float]:
    sb, fn, ph = sandbox(drop, 0.0)
    spec = spec_file(fn, ph, "1s")
    out: list[float] = []
    try:
        for _ in range(samples):
            res = subprocess.run(
                [sys.executable, "-m", "tracer.cli", "check", "-c", str(spec), "-n", "1", "--format", "json"],
                cwd=str(ROOT),
                env=env_for(col),
                capture_output=True,
                text=True,
                timeout=60,
            )
            t0 = time.monotonic()
            probe = json.loads(res.stdout)["steps"][0]["hops"][0]["probes"][0]
            while jaeger.trace(probe["trace_id"]) is None:
                if time.monotonic() - t0 > 120:
                    raise RuntimeError(f"trace {probe['trace_id']} ({probe['verdict']}) not visible in 120 s")
                time.sleep(0.1)
            out.append(time.monotonic() - t0)
    finally:
        sb.stop()
    return out


def first_trace(duration_limit: float = 120.0) -> float:
    """Fresh Jaeger + Collector + canary, all started at t0; seconds until Jaeger lists a trace."""
    t0 = time.monotonic()
    jaeger = Jaeger().start()
    col = Collector(jaeger.otlp_grpc, ok_sampling_percent=100).start()
    sb, fn, ph = sandbox(0.0, 0.0)
    canary = with_otel(["canary", "-c", str(spec_file(fn, ph, "5s", "5s", "10s"))], col)
    try:
        while time.monotonic() - t0 < duration_limit:
            r = httpx.get(
                f"{jaeger.query_url}/api/traces", params={"service": "funnel-tracer", "limit": 1}, timeout=5
            )
            if r.status_code == 200 and r.json().get("data"):
                return time.monotonic() - t0
            time.sleep(0.2)
        raise RuntimeError("no trace within the limit")
    finally:
        canary.terminate()
        canary.wait(30)
        sb.stop()
        col.stop()
        jaeger.stop()


def load(jaeger: Jaeger, duration: float) -> dict[str, float]:
    col = Collector(jaeger.otlp_grpc, ok_sampling_percent=10).start()
    sb, fn, ph = sandbox(0.0, 0.0)
    canary = with_otel(["canary", "-c", str(spec_file(fn, ph, "100ms", "5s", "10s"))], col)
    try:
        time.sleep(15)  # warm-up: probes in flight, sampler and span metrics steady
        pid = col.process.proc.pid  # type: ignore[union-attr]
        c0, w0, s0 = cpu_seconds(pid), time.monotonic(), accepted_spans(col)
        rss_samples = []
        while time.monotonic() - w0 < duration:
            time.sleep(5)
            rss_samples.append(rss_mb(pid)[0])
        wall = time.monotonic() - w0
        cpu = (cpu_seconds(pid) - c0) / wall
        spans_per_s = (accepted_spans(col) - s0) / wall  # proof the load reached the Collector
        _, peak = rss_mb(pid)
        return {
            "cpu_share_of_one_core": cpu,
            "rss_mb_median": statistics.median(rss_samples),
            "rss_mb_peak": peak,
            "accepted_spans_per_s": spans_per_s,
        }
    finally:
        canary.terminate()
        canary.wait(30)
        sb.stop()
        col.stop()


def accepted_spans(col: Collector) -> float:
    """otelcol_receiver_accepted_spans total, from the Collector's own telemetry endpoint."""
    text = httpx.get(f"http://127.0.0.1:{col.telemetry_port}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("otelcol_receiver_accepted_spans") and not line.startswith("#")
    )


class _Skip(Exception):
    """--only load: leave the latency part out."""


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50_s": statistics.median(xs), "max_s": max(xs), "min_s": min(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--only", choices=["first", "latency", "load"])
    args = ap.parse_args()
    results: dict[str, object] = {}
    if args.only in (None, "first"):
        results["first_trace_s"] = first_trace()
    if args.only == "first":
        print(json.dumps(results, indent=2))
        return
    jaeger = Jaeger().start()
    try:
        col = Collector(jaeger.otlp_grpc, ok_sampling_percent=100).start()
        try:
            if args.only == "load":
                raise _Skip
            results["ok"] = summary(verdict_to_visible(jaeger, col, 0.0, args.samples))
            results["lost"] = summary(verdict_to_visible(jaeger, col, 1.0, args.samples))
        except _Skip:
            pass
        finally:
            col.stop()
        if args.only in (None, "load"):
            results["load_10_per_s"] = load(jaeger, args.duration)
    finally:
        jaeger.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
