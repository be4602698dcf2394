"""Benchmark: how long from a mail's delivery to the IMAP collector's sighting?

Not a test. Run ``python bench/imap_idle.py [--mails 20]`` from the repo root (needs Dovecot:
``apt-get install dovecot-imapd``; it runs a private one, as the tests do).

Why: with IDLE the collector claims ``at == not_before`` (the push time). This measures the
delay from the end of the delivery (``dovecot-lda`` returned: the mail is in the maildir) to
``Watch.observe``, next to the floor, a bare ``imaplib`` client that does nothing but IDLE and
timestamp each ``* n EXISTS`` line, and the collector in polling mode (1 s) for scale.

All three watch the same mailbox at once (three IMAP sessions), so every delivery is seen by
each of them; deliveries are spaced 1-2 s at random so the poller's phase is random too.
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import random
import ssl
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collectors.imap import ImapCollector, ImapConfig  # noqa: E402
from tests.dovecot import Dovecot, available  # noqa: E402
from tracer import clock  # noqa: E402
from tracer.probe import Probe  # noqa: E402
from tracer.spec import HopSpec  # noqa: E402
from tracer.watch import Watch  # noqa: E402


class BareIdle:
    """The floor: imaplib, one IDLE, a timestamp per EXISTS line, nothing else."""

    def __init__(self, d: Dovecot) -> None:
        self.seen: list[float] = []
        self.conn = imaplib.IMAP4_SSL(
            "127.0.0.1", d.imaps_port, ssl_context=ssl.create_default_context(cafile=d.cert)
        )
        self.conn.login("ana", "ana-secret")
        self.conn.select("INBOX", readonly=True)
        self.conn.send(b"B1 IDLE\r\n")
        assert self.conn.readline().startswith(b"+")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                line = self.conn.readline()
            except OSError:
                return
            if not line:
                return
            if line.endswith(b"EXISTS\r\n"):
                self.seen.append(clock.now())


def row(name: str, delays: list[float], n: int) -> str:
    ms = sorted(d * 1000 for d in delays)
    p95 = ms[min(len(ms) - 1, int(0.95 * len(ms)))] if ms else float("nan")
    return f"| {name} | {statistics.median(ms):.1f} ms | {p95:.1f} ms | {ms[0]:.1f} ms | {ms[-1]:.1f} ms | {len(ms)}/{n} |"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mails", type=int, default=20)
    args = ap.parse_args()
    if not available():
        sys.exit("needs Dovecot: apt-get install dovecot-imapd")
    d = Dovecot().start()
    try:
        base = {
            "host": "127.0.0.1",
            "port": d.imaps_port,
            "ca_file": d.cert,
            "username": "ana",
            "password": "ana-secret",
        }
        idle = ImapCollector(ImapConfig(**base, idle=True, idle_refresh="10s"))
        poll = ImapCollector(ImapConfig(**base, idle=False, poll_interval="1s"))
        await idle.start()
        await poll.start()
        bare = BareIdle(d)
        delays: dict[str, list[float]] = {
            "collector IDLE": [],
            "bare imaplib IDLE": [],
            "collector poll 1 s": [],
        }
        errs: list[float] = []
        for _ in range(args.mails):
            probe = Probe(step="approval")
            ws = {
                c: Watch(probe=probe, hop=HopSpec(name="email", target=300, imap={}), since=clock.now())
                for c in (idle, poll)
            }
            for c, w in ws.items():
                c.watch(w)
            raw = f"Subject: bench\r\nTo: ana@funnel.invalid\r\n\r\ntrace {probe.trace_id}\r\n".encode()
            before = len(bare.seen)
            await asyncio.to_thread(d.deliver, "ana", raw)
            delivered = clock.now()
            for c, w in ws.items():
                if await w.wait_seen(10) and w.first is not None:
                    key = "collector IDLE" if c is idle else "collector poll 1 s"
                    delays[key].append(w.first.at - delivered)
                    if c is idle:
                        errs.append(w.first.error_bar)
            if len(bare.seen) > before:
                delays["bare imaplib IDLE"].append(bare.seen[before] - delivered)
            await asyncio.sleep(random.uniform(1.0, 2.0))
        await idle.close()
        await poll.close()
        print("| watcher | p50 | p95 | min | max | seen |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, ds in delays.items():
            print(row(name, ds, args.mails))
        print(f"\ncollector IDLE stated error bar: max {max(errs) * 1000:.1f} ms")
    finally:
        d.close()


if __name__ == "__main__":
    asyncio.run(main())
