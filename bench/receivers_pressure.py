"""Benchmark: receivers under pressure (issue 10, items 7 and 8).

Not a test. Run ``python bench/receivers_pressure.py [--duration 10] [--case a|b]`` from the repo
root (both cases by default).

(a) The webhook receiver while 120 slowloris clients (a separate process: each trickles a
    request head one byte every 300 ms and reconnects when shed) hold its connections, and a
    second process sends real signed deliveries (timestamped HMAC, a fresh connection each, as
    a funnel's notifier does) at a fixed rate. Reported: deliveries sent / answered 200 / seen,
    and the lag from the sender's write to ``Watch.observe`` (``time.monotonic`` is
    system-wide, so both sides' clocks agree), plus the receiver's shed/refused/timed-out counts.
(b) The SMTP receiver's event loop while a sender process delivers one hostile mail (about
    4 MB, 100,000 tiny MIME parts) and then a good one: a ticker task on the receiver's loop
    sleeps 5 ms again and again; how late it wakes is the loop's stall. Goal: under 50 ms.
    ``--shapes`` adds other hostile bodies of about 4 MB (short lines, lines smtplib dot-stuffs,
    empty lines, one long line, over the size limit), each alone, with a watch in flight so
    the accepted ones are parsed as a canary's would be.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import smtplib
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collectors.smtp import SmtpCollector, SmtpConfig  # noqa: E402
from collectors.webhook import WebhookCollector, WebhookConfig, timestamped_signature  # noqa: E402
from tracer import clock  # noqa: E402
from tracer.probe import Probe  # noqa: E402
from tracer.spec import HopSpec  # noqa: E402
from tracer.watch import Watch  # noqa: E402

SECRET, KEY, TOKEN = "bench-secret", "bench-key", "benchtoken123"


# -- processes ---------------------------------------------------------------------------------
def slowloris(port: int, n: int, duration: float) -> int:
    async def one(stop: float) -> int:
        connects = 0
        while time.monotonic() < stop:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            connects += 1
            try:
                for ch in f"POST /{SECRET}/slack HTTP/1.1\r\nHost: x\r\nX-Pad: {'a' * 10_000}":
                    if time.monotonic() >= stop or w.is_closing():
                        break
                    w.write(ch.encode())
                    await w.drain()
                    await asyncio.sleep(0.3)
            except OSError:
                pass
            finally:
                w.close()
        return connects

    async def main() -> int:
        stop = time.monotonic() + duration
        return sum(await asyncio.gather(*(one(stop) for _ in range(n))))

    return asyncio.run(main())


def deliveries(port: int, trace_ids: list[str], rate: float) -> list[tuple[str, float, int]]:
    async def one(tid: str) -> tuple[str, float, int]:
        body = json.dumps({"text": f"Approval requested (trace {tid})"}).encode()
        head = (
            f"POST /{SECRET}/slack HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"X-Signature: {timestamped_signature(KEY, body)}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            written = time.monotonic()
            w.write(head + body)
            status = int((await asyncio.wait_for(r.readline(), 10)).split()[1])
            w.close()
        except (OSError, asyncio.TimeoutError, IndexError, ValueError):
            return tid, 0.0, 0
        return tid, written, status

    async def main() -> list[tuple[str, float, int]]:
        tasks = []
        start = time.monotonic()
        for i, tid in enumerate(trace_ids):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(tid)))
        return list(await asyncio.gather(*tasks))

    return asyncio.run(main())


def hostile_then_good(port: int, good_trace: str) -> tuple[int, float]:
    lines = [b"From: x@funnel.invalid", b"To: approver@funnel.invalid", b"Subject: hi", b"MIME-Version: 1.0"]
    lines += [b'Content-Type: multipart/mixed; boundary="b"', b""]
    for i in range(100_000):
        lines += [b"--b", b"Content-Type: text/plain", b"", b"p%d" % i]
    raw = b"\r\n".join([*lines, b"--b--"]) + b"\r\n"
    to = f"approver+{TOKEN}@funnel.invalid"
    code = 250
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
        try:
            smtp.sendmail("x@funnel.invalid", [to], raw)
        except smtplib.SMTPDataError as exc:
            code = exc.smtp_code
    done = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail("x@funnel.invalid", [to], f"Subject: approval\r\n\r\ntrace {good_trace}\r\n".encode())
    return code, done, len(raw)


SHAPES = {  # name -> body after a Subject header (smtplib makes every line end in CRLF)
    "1,000,000 lines 'a.'": lambda: b"a.\r\n" * 1_000_000,
    "1,000,000 lone dots (stuffed on the wire)": lambda: b".\r\n" * 1_000_000,
    "2,000,000 empty lines": lambda: b"\r\n" * 2_000_000,
    "one 4 MB line": lambda: b"x" * 4_000_000 + b"\r\n",
    "6 MB of short lines (over the limit)": lambda: b"abcd\r\n" * 1_000_000,
}


def one_mail(port: int, shape: str) -> tuple[int, float, int]:
    """Deliver one shaped mail without the SIZE parameter (so DATA itself meets the limit)."""
    raw = b"Subject: shape\r\n\r\n" + SHAPES[shape]()
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
        smtp.ehlo()
        smtp.mail("x@funnel.invalid")
        smtp.rcpt(f"approver+{TOKEN}@funnel.invalid")
        code = smtp.data(raw)[0]
    return code, time.monotonic(), len(raw)


# -- cases ------------------------------------------------------------------------------------
def q(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


async def slow_clients_case(pool: ProcessPoolExecutor, duration: float, rate: float) -> str:
    hook = WebhookCollector(
        WebhookConfig(secret_path=SECRET, hmac_secret=KEY, hmac_scheme="timestamped", max_connections=100)
    )
    await hook.start()
    assert hook.port is not None
    loop = asyncio.get_running_loop()
    slow = loop.run_in_executor(pool, slowloris, hook.port, 120, duration + 2)
    await asyncio.sleep(2)  # the slow clients hold every slot by now
    held = len(hook._guard.conns)
    hop = HopSpec(name="slack", target=300, webhook={"path": "slack"})
    watches = {}
    for _ in range(int(rate * duration)):
        w = Watch(probe=Probe(step="bench"), hop=hop, since=clock.now())
        hook.watch(w)
        watches[w.trace_id] = w
    sent = await loop.run_in_executor(pool, deliveries, hook.port, list(watches), rate)
    connects = await slow
    await hook.close()
    ok = [s for s in sent if s[2] == 200]
    lags = [watches[t].first.at - written for t, written, _ in ok if watches[t].first is not None]  # type: ignore[union-attr]
    h = hook.health()
    ms = [x * 1000 for x in (q(lags, 50), q(lags, 99), max(lags))] if lags else [float("nan")] * 3
    return (
        "| connections held by slow clients at start | slow-client connects | deliveries sent | 200 | seen "
        "| p50 ms | p99 ms | max ms | shed | timed out | refused |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {held} | {connects} | {len(sent)} | {len(ok)} | {len(lags)} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} "
        f"| {h['shed']} | {h['timed_out']} | {h['refused']} |"
    )


Tick = tuple[float, float, float]  # when, how late, CPU time of the loop's thread meanwhile


async def ticker(lags: list[Tick], stop: asyncio.Event) -> None:
    """5 ms sleeps on this loop until ``stop``; how late each wakes is the loop's stall. The
    loop thread's own CPU time in that stretch tells the loop's work apart from waiting (for
    the GIL a parse worker holds, or for a core on a loaded machine)."""
    while not stop.is_set():
        t, cpu = time.monotonic(), time.thread_time()
        await asyncio.sleep(0.005)
        lags.append((t, time.monotonic() - t - 0.005, time.thread_time() - cpu))


def lag_cells(lags: list[Tick], start: float, done: float) -> str:
    """ticks | p50 | p99 | max | the most loop-thread CPU in one tick (ms) while [start, done]."""
    during = [(lag, cpu) for t, lag, cpu in lags if start <= t <= done] or [(0.0, 0.0)]
    late = [lag for lag, _ in during]
    cells = (q(late, 50), q(late, 99), max(late), max(cpu for _, cpu in during))
    return f"{len(during)} | " + " | ".join(f"{x * 1000:.1f}" for x in cells)


async def hostile_mail_case(pool: ProcessPoolExecutor) -> str:
    mx = SmtpCollector(SmtpConfig(rcpt_token=TOKEN))
    await mx.start()
    assert mx.port is not None
    hop = HopSpec(name="email", target=300, smtp={})
    good = Watch(probe=Probe(step="bench"), hop=hop, since=clock.now())
    mx.watch(good)
    lags: list[Tick] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(lags, stop))
    start = time.monotonic()
    code, done, size = await asyncio.get_running_loop().run_in_executor(
        pool, hostile_then_good, mx.port, good.trace_id
    )
    seen = await good.wait_seen(10)
    stop.set()
    await tick
    await mx.close()
    return (
        "| mail | bytes | reply | ticks | loop lag p50 ms | p99 ms | max ms | max loop CPU/tick ms "
        "| next good mail seen |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
        f"| 100,000 parts | {size:,} | {code} | {lag_cells(lags, start, done)} | {'yes' if seen else 'NO'} |"
    )


async def shapes_case(pool: ProcessPoolExecutor) -> str:
    mx = SmtpCollector(SmtpConfig(rcpt_token=TOKEN))
    await mx.start()
    assert mx.port is not None
    mx.watch(
        Watch(probe=Probe(step="bench"), hop=HopSpec(name="email", target=300, smtp={}), since=clock.now())
    )
    rows = []
    for shape in SHAPES:
        lags: list[Tick] = []
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(lags, stop))
        start = time.monotonic()
        code, done, size = await asyncio.get_running_loop().run_in_executor(pool, one_mail, mx.port, shape)
        stop.set()
        await tick
        rows.append(
            f"| {shape} | {size:,} | {code} | {done - start:.2f} s | {lag_cells(lags, start, done)} |"
        )
    await mx.close()
    return "\n".join(
        [
            "| body | bytes | reply | time | ticks | loop lag p50 ms | p99 ms | max ms | max loop CPU/tick ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of deliveries in case (a)")
    parser.add_argument("--rate", type=float, default=5.0, help="deliveries per second in case (a)")
    parser.add_argument("--case", choices=("a", "b"), help="run only this case (default: both)")
    parser.add_argument("--shapes", action="store_true", help="case (b): other hostile bodies too")
    args = parser.parse_args()
    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(time.sleep, [0, 0]))  # start the workers before timing anything
        if args.case in (None, "a"):
            print("(a) webhook receiver, 120 slow clients, real signed deliveries\n")
            print(await slow_clients_case(pool, args.duration, args.rate))
        if args.case in (None, "b"):
            print("\n(b) SMTP receiver event loop during a hostile mail\n")
            print(await hostile_mail_case(pool))
            if args.shapes:
                print("\n(b) other hostile bodies, one at a time\n")
                print(await shapes_case(pool))


if __name__ == "__main__":
    asyncio.run(main())
