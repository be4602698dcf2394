"""Benchmark the canary: RSS and CPU of a real ``funnel-tracer canary`` process.

(a) sustained: 10 probes/s (one step, 100 ms interval) for ``--duration`` seconds (default 300);
(b) in flight: 10,000 probes in flight at once (the funnel drops every event, deadlines are long),
    RSS at 10,000, and the cost of matching one sighting with 10 vs 10,000 watches in flight
    (dict lookups by trace id: it must not grow with the number in flight);
(c) idle: 1 probe per 10 s per step (two steps) for ``--idle-duration`` seconds (default 120).

The sandbox (funnel + PostHog-compatible server) runs in its own process, so only the canary is
measured. CPU is user+system time of the canary process (all threads) over wall time, from
/proc; RSS from /proc/<pid>/status (VmRSS now, VmHWM peak). Linux only.

    python bench/canary_load.py                                  # full run (~8 minutes)
    python bench/canary_load.py --duration 60 --idle-duration 60 # shorter
    python bench/canary_load.py --only in_flight
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import free_port, wait_port  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")

SPEC = """
service: bench-funnel
collectors:
  posthog:
    host: http://127.0.0.1:{ph}
    project_id: "1"
    personal_api_key: phx_sandbox
    queries_per_minute: 600
    queries_per_hour: 36000
    budget_share: 1.0
    min_interval: {poll}
    timeout: 10s
canary:
  grace: 2s
  jitter: 0.2
  max_in_flight: {cap}
steps:
{steps}
"""

STEP = """
  {name}:
    interval: {interval}
    inject:
      http:
        url: http://127.0.0.1:{fn}/api/v1/leads
        json: {{name: "Canary {{probe_id}}", email: "canary+{{trace_id}}@example.com", metadata: {{canary_trace_id: "{{trace_id}}"}}}}
        timeout: 10s
    hops:
      - name: posthog_event
        target: {target}
        deadline: {deadline}
        posthog: {{event: lead_captured, property: canary_trace_id, value: "{{trace_id}}"}}
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def rss_mb(pid: int) -> tuple[float, float]:
    text = Path(f"/proc/{pid}/status").read_text()
    now = int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024
    peak = int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024
    return now, peak


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if name in ("funnel_probes_in_flight", "funnel_probes_started_total", "funnel_probes_skipped_total"):
            out[name] = out.get(name, 0) + float(value)
        elif name == "funnel_probes_total":
            verdict = re.search(r'verdict="(\w+)"', name_labels).group(1)
            out[f"verdict.{verdict}"] = out.get(f"verdict.{verdict}", 0) + float(value)
    return out


class Proc:
    def __init__(self, args: list[str], log: Path | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["PYTHONPATH"] = str(ROOT)
        self.log = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
        self.p = subprocess.Popen(
            [sys.executable, "-m", "tracer.cli", *args],
            cwd=str(ROOT),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


def sandbox(drop_rate: float, lead_delay: float) -> tuple[Proc, int, int]:
    fn, ph = free_port(), free_port()
    proc = Proc(
        [
            "sandbox",
            "--port",
            str(fn),
            "--posthog-port",
            str(ph),
            "--drop-rate",
            str(drop_rate),
            "--lead-delay",
            str(lead_delay),
        ]
    )
    wait_port(fn, 20)
    wait_port(ph, 20)
    return proc, fn, ph


def canary(steps: str, ph: int, poll: str, tmp: Path, name: str, cap: int = 20_000) -> tuple[Proc, int]:
    spec = tmp / f"{name}.yaml"
    spec.write_text(SPEC.format(ph=ph, poll=poll, steps=steps, cap=cap))
    port = free_port()
    proc = Proc(
        ["canary", "-c", str(spec), "--http-port", str(port), "--log-format", "json"], log=tmp / f"{name}.log"
    )
    wait_port(port, 20)
    return proc, port


def measure(pid: int, seconds: float) -> tuple[float, float]:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0) * 100, time.monotonic() - t0


def sustained(tmp: Path, duration: float) -> dict[str, object]:
    sb, fn, ph = sandbox(0.0, 0.2)
    try:
        steps = STEP.format(name="lead", interval="100ms", fn=fn, target="5s", deadline="30s")
        proc, port = canary(steps, ph, "500ms", tmp, "sustained")
        pid = proc.p.pid
        time.sleep(10)  # warm up
        rss0, _ = rss_mb(pid)
        m0 = scrape(port)
        cpu, elapsed = measure(pid, duration)
        rss1, peak = rss_mb(pid)
        m1 = scrape(port)
        proc.stop()
        resolved = sum(v for k, v in m1.items() if k.startswith("verdict.")) - sum(
            v for k, v in m0.items() if k.startswith("verdict.")
        )
        return {
            "scenario": f"10 probes/s sustained, {elapsed:.0f} s",
            "cpu_pct": cpu,
            "rss_mb": rss1,
            "rss_start_mb": rss0,
            "peak_mb": peak,
            "rate": resolved / elapsed,
            "verdicts": {k[8:]: int(v) for k, v in m1.items() if k.startswith("verdict.") and v},
            "skipped": int(m1.get("funnel_probes_skipped_total", 0)),
            "exit": proc.p.returncode,
        }
    finally:
        sb.stop()


def in_flight(tmp: Path, target_n: int) -> dict[str, object]:
    sb, fn, ph = sandbox(1.0, 0.0)  # every event dropped: probes wait for their (long) deadline
    try:
        # Injects as fast as it can (2 ms interval) up to the global cap, then holds the cap: every
        # further slot is skipped (and counted), so what is measured is holding N in flight.
        steps = STEP.format(name="lead", interval="2ms", fn=fn, target="5m", deadline="10m")
        proc, port = canary(steps, ph, "1s", tmp, "in_flight", cap=target_n)
        pid = proc.p.pid
        started = time.monotonic()
        n = 0.0
        while n < target_n and time.monotonic() - started < 300:
            time.sleep(1)
            n = scrape(port).get("funnel_probes_in_flight", 0)
        reached = time.monotonic() - started
        fill_cpu = cpu_seconds(pid) / reached * 100
        time.sleep(2)
        cpu, _ = measure(pid, 20)
        rss, peak = rss_mb(pid)
        m = scrape(port)
        proc.p.send_signal(signal.SIGKILL)  # N unresolved probes with 10 min deadlines: no point waiting
        proc.p.wait(10)
        return {
            "scenario": f"{int(m.get('funnel_probes_in_flight', 0)):,} probes in flight, held 20 s",
            "cpu_pct": cpu,
            "rss_mb": rss,
            "peak_mb": peak,
            "fill": f"filled at {n / reached:.0f} probes/s using {fill_cpu:.0f} % CPU",
        }
    finally:
        sb.stop()


def idle(tmp: Path, duration: float) -> dict[str, object]:
    sb, fn, ph = sandbox(0.0, 0.2)
    try:
        steps = "".join(
            STEP.format(name=n, interval="10s", fn=fn, target="5s", deadline="30s")
            for n in ("lead", "signup")
        )
        proc, port = canary(steps, ph, "1s", tmp, "idle")
        pid = proc.p.pid
        time.sleep(5)
        cpu, elapsed = measure(pid, duration)
        rss, peak = rss_mb(pid)
        m = scrape(port)
        proc.stop()
        return {
            "scenario": f"idle: 1 probe / 10 s on each of 2 steps, {elapsed:.0f} s",
            "cpu_pct": cpu,
            "rss_mb": rss,
            "peak_mb": peak,
            "verdicts": {k[8:]: int(v) for k, v in m.items() if k.startswith("verdict.") and v},
        }
    finally:
        sb.stop()


def match_cost() -> list[tuple[int, float, float]]:
    """Microseconds to match one pushed body / one shared-ledger sighting, by watches in flight."""
    import asyncio
    import timeit

    from tracer import clock
    from tracer.probe import Probe
    from tracer.spec import HopSpec
    from tracer.watch import Watch, WatchIndex

    async def go() -> list[tuple[int, float, float]]:
        out = []
        hop = HopSpec(name="h", target=5, webhook={"path": "events"})
        for n in (10, 10_000):
            index = WatchIndex()
            local: dict[str, Watch] = {}
            for _ in range(n):
                w = Watch(probe=Probe(step="s"), hop=hop, since=clock.now())
                index.add(w)
                local[w.trace_id] = w
            needle = next(iter(local))
            body = f"Approval requested (trace {needle}) " + "x" * 500
            reps = 20_000
            push = timeit.timeit(lambda: index.in_text(body), number=reps) / reps * 1e6  # noqa: B023
            ledger = timeit.timeit(lambda: local.get(needle), number=reps) / reps * 1e6  # noqa: B023
            out.append((n, push, ledger))
        return out

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300, help="sustained run, seconds (default 300)")
    ap.add_argument("--idle-duration", type=float, default=120, help="idle run, seconds (default 120)")
    ap.add_argument("--in-flight", type=int, default=10_000)
    ap.add_argument("--only", choices=["sustained", "in_flight", "idle", "match"], default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ft-bench-") as d:
        tmp = Path(d)
        if args.only in (None, "sustained"):
            rows.append(sustained(tmp, args.duration))
        if args.only in (None, "in_flight"):
            rows.append(in_flight(tmp, args.in_flight))
        if args.only in (None, "idle"):
            rows.append(idle(tmp, args.idle_duration))
    print(
        f"\nfunnel-tracer canary benchmark, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs\n"
    )
    if rows:
        print("| scenario | CPU (% of one core) | RSS (MB) | peak RSS (MB) | notes |")
        print("|---|---:|---:|---:|---|")
        for r in rows:
            notes = []
            if "rate" in r:
                notes.append(
                    f"{r['rate']:.2f} probes/s resolved, RSS {r['rss_start_mb']:.0f} MB after warm-up"
                )
            if "verdicts" in r:
                notes.append("verdicts " + json.dumps(r["verdicts"]))
            if r.get("skipped"):
                notes.append(f"{r['skipped']} skipped")
            if "fill" in r:
                notes.append(str(r["fill"]) + "; PostHog: one query per second naming every probe")
            print(
                f"| {r['scenario']} | {r['cpu_pct']:.1f} | {r['rss_mb']:.0f} | {r['peak_mb']:.0f} | {'; '.join(notes)} |"
            )
    if args.only in (None, "match"):
        print("\n| watches in flight | match a pushed body (µs) | match a shared-ledger sighting (µs) |")
        print("|---:|---:|---:|")
        for n, push, ledger in match_cost():
            print(f"| {n:,} | {push:.2f} | {ledger:.3f} |")


if __name__ == "__main__":
    main()
