"""Adversarial re-run (issue 10) for the Redis side: the DLQ collector, its injector, the Redis
gauge and the sandbox's DLQ worker, attacked with real redis-server processes and small hostile
socket servers on loopback.

The promise under attack: ``late``/``lost`` only when the funnel really failed; when the tracer
could not look (or what it saw may not be the funnel's doing) it says ``unknown``. Never a
forged ``ok`` (a retry the worker did not make), a silent task death, a traceback or a secret
in output. Each attack is bounded (a few seconds)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from redis.asyncio import Redis

from collectors.redis_dlq.preflight import preflight
from tests.support import RedisProcess, free_port, tmp_yaml, wait_port
from tests.test_redis_dlq import KEY, collector, hop, seen, settle, watch, watches
from tracer import clock
from tracer.evidence import Evidence
from tracer.gauges import GaugeSpec
from tracer.gauges import read as read_gauge
from tracer.inject.redis_dlq import DlqInject, remove_entries, send
from tracer.probe import Probe
from tracer.sandbox.dlq import DlqWorker, new_entry


def entry_text(p: Probe, **extra: Any) -> str:
    return json.dumps(
        {**new_entry("webhooks", {"trace_id": p.trace_id}, "HTTP 500", max_attempts=5), **extra}
    )


async def parked(redis_url: str, mode: str = "push", shape: str = "list", **cfg: Any):
    """A collector watching one probe's entry/retry/resolved, its entry parked and seen."""
    r = Redis.from_url(redis_url, decode_responses=True)
    c = await collector(redis_url, mode=mode, **{"poll_interval": 0.1, **cfg})
    p = Probe(step="dlq")
    ws = watches(c, p, hop(shape))
    await settle(c)
    text = entry_text(p)
    if shape == "list":
        await r.lpush(KEY, text)
    elif shape == "zset":
        await r.zadd(KEY, {text: 1})
    else:
        await r.xadd(KEY, {"entry": text})
    await seen(ws, "entry")
    return r, c, p, ws, text


# -- someone else wipes the DLQ: that is no retry ------------------------------------------


async def _wiped(redis_url: str, mode: str, shape: str, how: str) -> None:
    r, c, p, ws, text = await parked(redis_url, mode, shape)
    if how == "flushall":
        await r.flushall()
    elif how == "flushdb":
        await r.flushdb()
    elif how == "del":
        await r.delete(KEY)
    elif how == "expire":
        await r.pexpire(KEY, 1)
    elif how == "rename":
        await r.rename(KEY, "elsewhere")
    await asyncio.sleep(0.6)
    assert not ws["retry"].observations, f"{how}: forged retry {ws['retry'].first}"
    assert not ws["resolved"].observations, f"{how}: forged resolved"
    assert c.coverage.blind_start(ws["retry"].since, clock.now()) is not None, f"{how}: not blind (lost)"
    assert c.health()["wipes"] >= 1
    ev = await c.explain(ws["retry"], ws["retry"].since, clock.now(), Evidence(searched={}))
    assert "without any retry" not in (ev.summary or ""), ev.summary
    await c.close()
    await r.aclose()


@pytest.mark.parametrize(
    "mode,shape,how",
    [
        ("push", "list", "flushall"),
        ("push", "list", "flushdb"),
        ("push", "list", "del"),
        ("push", "zset", "expire"),
        ("push", "list", "rename"),
        ("push", "stream", "del"),
        ("push", "stream", "flushall"),
        ("poll", "list", "flushall"),
        ("poll", "stream", "del"),
    ],
)
def test_dlq_wiped_by_someone_else_is_no_retry(redis_url: str, mode: str, shape: str, how: str) -> None:
    asyncio.run(_wiped(redis_url, mode, shape, how))


# -- Redis restarted mid-wait ----------------------------------------------------------------


class DurableRedis(RedisProcess):
    """A private redis-server with an fsync-always append-only file: a kill loses nothing."""

    def start(self) -> DurableRedis:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"]
            + ["--appendfsync", "always", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        return self


async def _until(pred: Any, timeout: float = 5.0) -> bool:
    end = clock.now() + timeout
    while clock.now() < end:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return bool(pred())


def test_restart_without_persistence_is_unknown_not_removed_unretried() -> None:
    server = RedisProcess().start()

    async def run() -> None:
        r, c, p, ws, _ = await parked(server.url, reconnect_backoff=0.05, max_backoff=0.2, timeout=0.5)
        await r.aclose()
        server.kill()
        await asyncio.sleep(0.3)
        server.start()
        assert await _until(lambda: c.health()["up"])
        await asyncio.sleep(0.3)
        assert not ws["retry"].observations and not ws["resolved"].observations
        assert c.coverage.blind_start(ws["retry"].since, clock.now()) is not None
        ev = await c.explain(ws["retry"], ws["retry"].since, clock.now(), Evidence(searched={}))
        assert ev.found["entry"]["redis_restarted"]
        assert "whether it was retried first is unknown" in ev.summary, ev.summary
        assert "without any retry" not in ev.summary and "never reached" not in (ev.hint or "")
        await c.close()

    try:
        asyncio.run(run())
    finally:
        server.stop()


def test_restart_with_persistence_keeps_measuring_the_entry() -> None:
    """The entry survives the restart (AOF): once Redis is back and the worker retries it, the
    retry is seen, never a false lost."""
    server = DurableRedis().start()

    async def run() -> None:
        r, c, p, ws, text = await parked(server.url, reconnect_backoff=0.05, max_backoff=0.2, timeout=0.5)
        await r.aclose()
        server.kill()
        await asyncio.sleep(0.3)
        server.start()
        assert await _until(lambda: c.health()["up"])
        r = Redis.from_url(server.url, decode_responses=True)
        assert await r.lrange(KEY, 0, -1) == [text]  # it came back
        await asyncio.sleep(0.3)
        async with r.pipeline(transaction=True) as pipe:  # the worker takes it now
            pipe.lrem(KEY, 1, text)
            pipe.lpush(f"{KEY}:processing", text)
            await pipe.execute()
        await seen(ws, "retry")
        assert ws["retry"].first.at > ws["entry"].first.at
        await r.aclose()
        await c.close()

    try:
        asyncio.run(run())
    finally:
        server.stop()


# -- the key changes type, notifications are switched off --------------------------------


@pytest.mark.parametrize("mode", ["push", "poll"])
def test_key_changing_type_and_back_is_no_retry(redis_url: str, mode: str) -> None:
    async def run() -> None:
        r, c, p, ws, text = await parked(redis_url, mode)
        await r.set(KEY, "not a list any more")
        await asyncio.sleep(0.4)
        assert c.coverage.blind_now and "is not a list" in c.health()["last_error"]
        await r.delete(KEY)
        await r.lpush(KEY, entry_text(Probe(step="dlq")))  # a list again, without our entry
        await asyncio.sleep(0.5)
        assert not c.coverage.blind_now
        assert not ws["retry"].observations, ws["retry"].first
        assert c.coverage.blind_start(ws["retry"].since, clock.now()) is not None
        assert c.health()["internal_errors"] == 0
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_notifications_switched_off_then_a_flash_is_blind_not_lost(redis_url: str) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url, poll_interval=0.3)
        p = Probe(step="dlq")
        w = watch(c, p, "entry", hop())
        await settle(c)
        await r.config_set("notify-keyspace-events", "")
        text = entry_text(p)
        await r.lpush(KEY, text)  # parked and taken between two looks, no event about it
        await r.lrem(KEY, 1, text)
        await asyncio.sleep(0.8)
        assert not w.observations
        assert c.coverage.blind_start(w.since, clock.now()) is not None
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_notifications_switched_off_then_a_real_retry_is_never_lost(redis_url: str) -> None:
    async def run() -> None:
        r, c, p, ws, text = await parked(redis_url, poll_interval=0.3)
        await r.config_set("notify-keyspace-events", "")
        await r.lrem(KEY, 1, text)
        await asyncio.sleep(0.8)
        # Either the retry is seen, or the window it happened in is blind: never a silent lost.
        assert ws["retry"].observations or c.coverage.blind_start(ws["retry"].since, clock.now())
        await c.close()
        await r.aclose()

    asyncio.run(run())


# -- our connections are killed, paused, refused ---------------------------------------------


@pytest.mark.parametrize("kind", ["normal", "pubsub"])
def test_client_kill_is_blind_then_measures_again(redis_url: str, kind: str, caplog: Any) -> None:
    async def run() -> None:
        r, c, p, ws, text = await parked(redis_url, reconnect_backoff=0.05)
        await r.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")
        assert await _until(lambda: c.health()["reconnects"] >= 1 and c.health()["up"])
        await r.lrem(KEY, 1, text)
        await r.lpush(f"{KEY}:processing", text)
        await seen(ws, "retry")
        assert c.health()["internal_errors"] == 0
        await c.close()
        await r.aclose()

    with caplog.at_level(logging.WARNING):
        asyncio.run(run())
    assert "Traceback" not in caplog.text


def test_client_pause_is_blind_and_recovers(redis_url: str) -> None:
    async def run() -> None:
        r, c, p, ws, text = await parked(redis_url, timeout=0.5, reconnect_backoff=0.05)
        admin = Redis.from_url(redis_url, decode_responses=True)
        paused = clock.now()
        await admin.execute_command("CLIENT", "PAUSE", "2500", "ALL")
        await asyncio.sleep(1.5)
        assert c.coverage.blind_now
        await asyncio.sleep(1.3)
        assert await _until(lambda: c.health()["up"])
        assert c.coverage.blind_start(paused, clock.now()) is not None
        await r.lrem(KEY, 1, text)
        await r.lpush(f"{KEY}:processing", text)
        await seen(ws, "retry")
        assert c.health()["internal_errors"] == 0
        await c.close()
        await r.aclose()
        await admin.aclose()

    asyncio.run(run())


def test_maxclients_reached_on_reconnect_is_blind_with_the_reason(redis_url: str) -> None:
    async def run() -> None:
        r, c, p, ws, text = await parked(redis_url, reconnect_backoff=0.05, max_backoff=0.2)
        (before,) = (await r.config_get("maxclients")).values()
        try:
            clients = len(await r.client_list())
            await r.config_set("maxclients", str(clients - 1))  # ours (2) minus one must go
            await r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            assert await _until(lambda: c.health()["last_error"] not in (None,) and c.coverage.blind_now)
            await asyncio.sleep(0.5)
            assert c.coverage.blind_now and not c.health()["up"]
            assert "max number of clients" in (c.health()["last_error"] or ""), c.health()
        finally:
            await r.config_set("maxclients", before)
        assert await _until(lambda: c.health()["up"])
        assert not ws["retry"].observations
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_password_changed_mid_run_is_unknown_and_secret_free(redis_url: str, caplog: Any) -> None:
    old, new = "Old-pw-1#x", "New-pw-2#y"

    async def run() -> None:
        admin = Redis.from_url(redis_url, decode_responses=True)
        await admin.execute_command("ACL", "SETUSER", "dlq", "on", f">{old}", "~*", "&*", "+@all")
        url = redis_url.replace("redis://", f"redis://dlq:{quote(old, safe='')}@")
        try:
            r, c, p, ws, text = await parked(url, reconnect_backoff=0.05, max_backoff=0.2)
            await admin.execute_command("ACL", "SETUSER", "dlq", "resetpass", f">{new}")
            await admin.execute_command("CLIENT", "KILL", "USER", "dlq")
            assert await _until(lambda: c.coverage.broken is not None)
            assert "authentication failed" in c.coverage.broken
            assert not ws["retry"].observations
            shown = repr(c.health()) + c.coverage.broken + caplog.text
            assert old not in shown and quote(old, safe="") not in shown and new not in shown
            await c.close()
            await r.aclose()
        finally:
            await admin.execute_command("ACL", "DELUSER", "dlq")
            await admin.aclose()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(run())


# -- servers that are not Redis -----------------------------------------------------------------


class Hostile:
    """A loopback TCP server in a thread: ``blackhole`` reads and never answers; otherwise it
    answers ``reply`` to whatever arrives (garbage, or a well-formed RESP value of the wrong kind)."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"redis://:Sekrit-pw-9@127.0.0.1:{self.port}/0"
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self._conns.append(conn)
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if self.reply is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(self.reply)

    def close(self) -> None:
        self._stop.set()
        for c in [self.sock, *self._conns]:
            with contextlib.suppress(OSError):
                c.close()


GARBAGE = [
    None,  # black hole
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    b"+OK\r\n",
    b":42\r\n",
    b"*1\r\n$-1\r\n",
    b"\x00\xff\xfe garbage \r\n",
]


@pytest.mark.parametrize("reply", GARBAGE, ids=["blackhole", "http", "ok", "int", "nil-array", "bytes"])
def test_a_server_that_is_not_redis_is_blind_bounded_and_quiet(reply: bytes | None, caplog: Any) -> None:
    server = Hostile(reply)

    async def run() -> None:
        began = clock.now()
        c = await collector(server.url, timeout=0.5, reconnect_backoff=0.05, max_backoff=0.2)
        w = watch(c, Probe(step="dlq"), "entry", hop())
        await asyncio.sleep(1.0)
        assert not w.observations and c.coverage.blind_now and not c.health()["up"]
        assert c.health()["last_error"], c.health()
        closing = clock.now()
        await c.close()
        assert clock.now() - closing < 3 and clock.now() - began < 8
        findings = await asyncio.wait_for(preflight(c.config, []), 5)
        assert not findings[0].ok or len(findings) > 1
        shown = repr(findings) + repr(c.health())
        assert "Sekrit" not in shown

    try:
        with caplog.at_level(logging.WARNING):
            asyncio.run(run())
    finally:
        server.close()
    assert "Traceback" not in caplog.text and "Sekrit" not in caplog.text, caplog.text[-2000:]


SPEC = """
service: shop
collectors:
  redis_dlq: {{url: "{collector_url}", timeout: 500ms}}
steps:
  dlq:
    inject:
      redis_dlq:
        url: "{inject_url}"
        key: dlq:adv
    hops:
      - {{name: parked, target: 1s, deadline: 2s, redis_dlq: {{key: dlq:adv}}}}
      - {{name: first_retry, after: parked, target: 1s, deadline: 2s, redis_dlq: {{key: dlq:adv, event: retry}}}}
gauges:
  depth: {{redis: {{url: "{collector_url}", key: dlq:adv}}, ok_below: 10, readings: 1}}
"""


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("where", ["wrong-port", "blackhole"])  # garbage: collector-level test above
def test_redis_unreachable_for_the_whole_run_is_inconclusive(redis_url: str, where: str) -> None:
    """doctor says so (exit 1, one line each); check runs anyway and is inconclusive (exit 3):
    every hop unknown, the gauge unknown, no traceback, no password."""
    server = None
    if where == "wrong-port":
        url = f"redis://:Sekrit-pw-9@127.0.0.1:{free_port()}/0"
    else:
        server = Hostile(None if where == "blackhole" else b"-ERR what\r\n+OK\r\n:1\r\n")
        url = server.url
    try:
        path = str(tmp_yaml(SPEC.format(collector_url=url, inject_url=redis_url)))
        doc = cli("doctor", "-c", path)
        res = cli("check", "-c", path, "-n", "1", "--format", "json")
    finally:
        if server is not None:
            server.close()
    assert doc.returncode == 1, doc.stdout + doc.stderr
    assert "FAIL collectors.redis_dlq: Redis at redis://127.0.0.1:" in doc.stdout
    assert res.returncode == 3, res.stdout + res.stderr
    summary = json.loads(res.stdout)
    verdicts = [p["verdict"] for s in summary["steps"] for h in s["hops"] for p in h["probes"]]
    assert verdicts and set(verdicts) == {"unknown"}, verdicts
    for out in (doc, res):
        assert "Traceback" not in out.stderr and "Sekrit" not in out.stdout + out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("reply", GARBAGE, ids=["blackhole", "http", "ok", "int", "nil-array", "bytes"])
def test_injecting_into_a_server_that_is_not_redis_fails_in_one_line(reply: bytes | None) -> None:
    server = Hostile(reply)

    async def run() -> None:
        for shape in ("list", "zset", "stream"):
            spec = DlqInject(url=server.url, key=KEY, shape=shape, timeout=0.5)
            result = await asyncio.wait_for(send(spec, Probe(step="dlq")), 5)
            assert not result.ok and result.error and "\n" not in result.error, result
            assert "Sekrit" not in repr(result)
            outcomes = await asyncio.wait_for(remove_entries(spec, Probe(step="dlq")), 5)
            assert outcomes and not any(o.ok for o in outcomes) and "Sekrit" not in repr(outcomes)

    try:
        asyncio.run(run())
    finally:
        server.close()


# -- hostile data in the DLQ ---------------------------------------------------------------------


def test_binary_and_foreign_members_are_survived_by_everyone(redis_url: str, caplog: Any) -> None:
    """Non-UTF-8 bytes, non-JSON text and JSON without an attempt sit in the DLQ: the collector
    still measures the probe, the injector's cleanup still removes its entry, the sandbox worker
    keeps retrying the real entries, and nobody dies or logs a traceback."""

    async def run() -> None:
        raw = Redis.from_url(redis_url)
        await raw.lpush(KEY, b"\xff\xfe\x00binary", b"not json {", b'{"attempt": "many"}', b"[1,2")
        c = await collector(redis_url)
        async with DlqWorker(redis_url, KEY, retry_interval=0.3) as dlq:
            p = Probe(step="dlq")
            ws = watches(c, p, hop(), events=("entry", "retry"))
            await settle(c)
            inject = DlqInject(url=redis_url, key=KEY)
            assert (await send(inject, p)).ok
            await seen(ws, "entry", "retry")
            q = Probe(step="dlq")
            assert (await send(inject, q)).ok
            (outcome,) = await remove_entries(inject, q)
            assert outcome.ok and outcome.removed == 1, outcome
            assert all(not t.done() for t in dlq._tasks), "the worker died"
            assert dlq.history and all(h.ok for h in dlq.history) and dlq.skipped >= 3
        assert c.health()["internal_errors"] == 0
        await c.close()
        await raw.aclose()

    with caplog.at_level(logging.WARNING):
        asyncio.run(run())
    assert "Traceback" not in caplog.text, caplog.text[-3000:]


# -- forged and odd entries ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["list", "stream"])
def test_a_forged_copy_with_a_higher_attempt_is_not_the_retry(redis_url: str, shape: str) -> None:
    """Someone else writes an entry that carries the probe's trace id (another id, attempt 3)
    while the probe's own entry stays parked at attempt 1: that is not its retry."""

    async def run() -> None:
        r, c, p, ws, text = await parked(redis_url, shape=shape)
        forged = json.dumps({**json.loads(text), "id": "someone-else", "attempt": 3})
        if shape == "list":
            await r.lpush(KEY, forged)
        else:
            await r.xadd(KEY, {"entry": forged})
        await asyncio.sleep(0.5)
        assert not ws["retry"].observations, ws["retry"].first
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_attempt_going_backwards_is_no_retry(redis_url: str) -> None:
    async def run() -> None:
        r, c, p, ws, text = await parked(redis_url)
        lower = json.dumps({**json.loads(text), "attempt": 0})
        async with r.pipeline(transaction=True) as pipe:
            pipe.lrem(KEY, 1, text)
            pipe.lpush(KEY, lower)
            await pipe.execute()
        await asyncio.sleep(0.4)
        # It left the key and came back in one step: a worker's re-park, so a retry, but the
        # attempt must not be read as one more.
        if ws["retry"].observations:
            assert ws["retry"].first.detail["attempt"] in (0, None)
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_stream_recreated_with_lower_ids_is_read_again(redis_url: str) -> None:
    """A stream once held an id far in the future, then was deleted: the new stream's ids are
    lower than our cursor. Its entries must still be seen, not missed forever."""

    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        await r.xadd(KEY, {"entry": "old"}, id="99999999999999-0")
        c = await collector(redis_url, poll_interval=0.1)
        p = Probe(step="dlq")
        ws = watches(c, p, hop("stream"), events=("entry",))
        await settle(c)
        await r.delete(KEY)
        await asyncio.sleep(0.3)
        await r.xadd(KEY, {"entry": entry_text(p)})
        await seen(ws, "entry")
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_two_retries_between_polls_are_one_retry_at_the_last_attempt(redis_url: str) -> None:
    async def run() -> None:
        r, c, p, ws, text = await parked(redis_url, mode="poll", poll_interval=0.5)
        for attempt in (2, 3):
            new = json.dumps({**json.loads(text), "attempt": attempt})
            async with r.pipeline(transaction=True) as pipe:
                pipe.lrem(KEY, 1, text)
                pipe.lpush(KEY, new)
                await pipe.execute()
            text = new
        await seen(ws, "retry")
        assert ws["retry"].first.detail["attempt"] == 3
        assert ws["retry"].first.at - ws["entry"].first.at <= 0.5 + ws["retry"].first.error_bar + 0.3
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_other_dbs_notifications_and_entries_are_not_ours() -> None:
    """The collector watches db 1; the probe's trace id is written to the same key in db 0."""
    server = RedisProcess().start()

    async def run() -> None:
        url1 = server.url[: -len("/0")] + "/1"
        r0 = Redis.from_url(server.url, decode_responses=True)
        c = await collector(url1)
        p = Probe(step="dlq")
        ws = watches(c, p, hop(), events=("entry",))
        await settle(c)
        await r0.lpush(KEY, entry_text(p))
        await asyncio.sleep(0.4)
        assert not ws["entry"].observations
        r1 = Redis.from_url(url1, decode_responses=True)
        await r1.lpush(KEY, entry_text(p))
        await seen(ws, "entry")
        assert ws["entry"].first.source == "push"
        await c.close()
        await r0.aclose()
        await r1.aclose()

    try:
        asyncio.run(run())
    finally:
        server.stop()


# -- URLs: special characters, unix sockets, TLS to a plain server ------------------------------

PASSWORD = "p@ss:w/rd?#%x Sekrit"


def test_a_password_with_special_characters_never_shows(redis_url: str, tmp_path: Any) -> None:
    """Percent-encoded in the URL, it works end to end; neither its raw nor its encoded form
    appears in the JSON report, the HTML/JUnit files or the logs, whatever happens."""

    async def acl(*args: str) -> None:
        admin = Redis.from_url(redis_url, decode_responses=True)
        await admin.execute_command("ACL", *args)
        await admin.aclose()

    asyncio.run(acl("SETUSER", "dlq-user", "on", f">{PASSWORD}", "~*", "&*", "+@all"))
    url = redis_url.replace("redis://", f"redis://dlq-user:{quote(PASSWORD, safe='')}@")
    try:
        path = str(tmp_yaml(SPEC.format(collector_url=url, inject_url=url)))
        html, junit = tmp_path / "r.html", tmp_path / "r.xml"
        res = cli(
            "-v",
            "check",
            "-c",
            path,
            "-n",
            "1",
            "--format",
            "json",
            "--html",
            str(html),
            "--junit",
            str(junit),
        )
    finally:
        asyncio.run(acl("DELUSER", "dlq-user"))
    assert res.returncode in (1, 3), res.stdout + res.stderr  # parked ok, the retry never comes
    summary = json.loads(res.stdout)
    verdicts = {h["hop"]: [p["verdict"] for p in h["probes"]] for s in summary["steps"] for h in s["hops"]}
    assert verdicts["parked"] == ["ok"], verdicts
    shown = res.stdout + res.stderr + html.read_text() + junit.read_text()
    for secret in (PASSWORD, quote(PASSWORD, safe=""), "Sekrit", "w/rd"):
        assert secret not in shown, secret


@pytest.mark.parametrize(
    "bad", ["redis://:pa/ss-Sekrit@127.0.0.1:6379/0", "redis://:pa#ss-Sekrit@127.0.0.1:6379/0"]
)
def test_an_unencoded_password_is_a_config_error_that_shows_none_of_it(bad: str) -> None:
    path = str(tmp_yaml(SPEC.format(collector_url=bad, inject_url=bad)))
    for cmd in ("validate", "check"):  # doctor loads the spec the same way
        res = cli(cmd, "-c", path)
        assert res.returncode == 2, (cmd, res.stdout + res.stderr)
        assert "collectors.redis_dlq.url" in res.stderr and "percent-encoded" in res.stderr
        assert "Traceback" not in res.stderr
        for part in ("pa", "ss-Sekrit", "Sekrit"):
            assert f"'{part}'" not in res.stdout + res.stderr and "Sekrit" not in res.stdout + res.stderr


def test_unix_socket_url_with_a_db_measures_by_push(tmp_path: Any) -> None:
    sock = str(tmp_path / "r.sock")
    server = RedisProcess()
    server.proc = subprocess.Popen(
        [server.exe, "--port", "0", "--unixsocket", sock, "--save", "", "--dir", server.dir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def run() -> None:
        for _ in range(200):
            if os.path.exists(sock):
                break
            await asyncio.sleep(0.02)
        url = f"unix://{sock}?db=2"
        r = Redis.from_url(url, decode_responses=True)
        c = await collector(url)
        p = Probe(step="dlq")
        ws = watches(c, p, hop(), events=("entry", "retry"))
        await settle(c)
        text = entry_text(p)
        await r.lpush(KEY, text)
        await seen(ws, "entry")
        assert ws["entry"].first.source == "push" and c.health()["push_active"]
        assert c.health()["url"] == f"unix://{sock}"
        await r.lrem(KEY, 1, text)
        await seen(ws, "retry")
        await c.close()
        await r.aclose()

    try:
        asyncio.run(run())
    finally:
        server.stop()


def test_rediss_to_a_plain_server_is_blind_and_bounded(redis_url: str, caplog: Any) -> None:
    async def run() -> None:
        url = redis_url.replace("redis://", "rediss://:Sekrit@")
        c = await collector(url, timeout=0.5, reconnect_backoff=0.05, max_backoff=0.2)
        w = watch(c, Probe(step="dlq"), "entry", hop())
        await asyncio.sleep(0.6)
        assert c.coverage.blind_now and not c.health()["up"] and c.health()["last_error"]
        assert not w.observations
        await c.close()
        result = await send(DlqInject(url=url, key=KEY, timeout=0.5), Probe(step="dlq"))
        assert not result.ok

    with caplog.at_level(logging.WARNING):
        asyncio.run(run())
    assert "Traceback" not in caplog.text and "Sekrit" not in caplog.text


# -- size: huge members, a million entries --------------------------------------------------------


async def _loop_lag(stop: asyncio.Event, worst: list[float]) -> None:
    while not stop.is_set():
        t0 = clock.now()
        await asyncio.sleep(0.01)
        worst[0] = max(worst[0], clock.now() - t0 - 0.01)


def test_a_10mb_member_next_to_the_probe(redis_url: str) -> None:
    """The probe is still measured by push, and the loop keeps running (the worst stall is
    printed, not asserted: benchmarks belong in bench/)."""

    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        await r.lpush(KEY, json.dumps({"blob": "x" * 10_000_000, "attempt": 1}))
        stop, worst = asyncio.Event(), [0.0]
        lag = asyncio.create_task(_loop_lag(stop, worst))
        c = await collector(redis_url)
        p = Probe(step="dlq")
        ws = watches(c, p, hop(), events=("entry", "retry"))
        await settle(c)
        text = entry_text(p)
        await r.lpush(KEY, text)
        await seen(ws, "entry", timeout=10)
        await r.lrem(KEY, 1, text)
        await seen(ws, "retry", timeout=10)
        assert c.health()["internal_errors"] == 0
        stop.set()
        await lag
        print(f"worst event-loop stall with a 10 MB member: {worst[0] * 1000:.0f} ms")
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_a_million_entries_is_a_partial_look_reported_blind(redis_url: str) -> None:
    """Bounded: each look reads max_scan entries; the look is partial, so blind (unknown, never
    lost); the probe's entry at the head is still found; the gauge reads the real depth; the
    injector's cleanup still removes the probe's entry."""

    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        await r.eval("for i = 1, 1000000 do redis.call('RPUSH', KEYS[1], i) end", 1, KEY)
        c = await collector(redis_url, max_scan=2000)
        p = Probe(step="dlq")
        ws = watches(c, p, hop(), events=("entry", "retry"))
        await settle(c)
        inject = DlqInject(url=redis_url, key=KEY)
        assert (await send(inject, p)).ok
        await seen(ws, "entry", timeout=10)
        await asyncio.sleep(0.3)
        assert c.coverage.blind_now and "max_scan=2000" in (c.health()["last_error"] or "")
        assert not ws["retry"].observations
        spec = GaugeSpec(redis={"url": redis_url, "key": KEY}, ok_below=10)
        async with httpx.AsyncClient() as http:
            assert await read_gauge(spec, http) == 1_000_001
        (outcome,) = await remove_entries(inject, p)
        assert outcome.ok and outcome.removed == 1
        await c.close()
        await r.aclose()

    asyncio.run(run())


class DebugRedis(RedisProcess):
    def start(self) -> DebugRedis:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", self.dir]
            + ["--enable-debug-command", "yes"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        return self


def test_debug_sleep_is_blind_then_measures_again() -> None:
    """The whole server stops answering for 2 s (DEBUG SLEEP): timeouts, blind, no false
    retry of the parked entry, and measuring again afterwards."""
    server = DebugRedis().start()

    async def run() -> None:
        r, c, p, ws, text = await parked(server.url, timeout=0.5, reconnect_backoff=0.05, max_backoff=0.2)
        began = clock.now()
        admin = Redis.from_url(server.url)
        sleeper = asyncio.create_task(admin.execute_command("DEBUG", "SLEEP", "2"))
        await asyncio.sleep(1.2)
        assert c.coverage.blind_now
        await sleeper
        assert await _until(lambda: c.health()["up"])
        assert c.coverage.blind_start(began, clock.now()) is not None
        assert not ws["retry"].observations
        await r.lrem(KEY, 1, text)
        await r.lpush(f"{KEY}:processing", text)
        await seen(ws, "retry")
        assert c.health()["internal_errors"] == 0
        await c.close()
        await r.aclose()
        await admin.aclose()

    try:
        asyncio.run(run())
    finally:
        server.stop()


# -- globs, permissions, clocks -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["push", "poll"])
def test_a_glob_matching_more_than_max_keys_is_blind_not_lost(redis_url: str, mode: str) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        for i in range(8):
            await r.lpush(f"dlq:q{i}", json.dumps({"other": i}))
        c = await collector(redis_url, mode=mode, max_keys=3, poll_interval=0.1)
        p = Probe(step="dlq")
        w = watch(c, p, "entry", {"key": "dlq:q*"})
        await settle(c)
        await asyncio.sleep(0.3)
        text = entry_text(p)
        looked = sorted(c._targets.find(w.sink_spec).keys)  # the keys it chose to read
        unread = next(f"dlq:q{i}" for i in range(8) if f"dlq:q{i}" not in looked)
        await r.lpush(unread, text)
        await asyncio.sleep(0.5)
        assert w.observations or c.coverage.blind_start(w.since, clock.now()) is not None
        assert c.coverage.blind_now and "max_keys" in (c.health()["last_error"] or ""), c.health()
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_info_permission_taken_away_mid_run_recovers(redis_url: str, caplog: Any) -> None:
    async def run() -> None:
        admin = Redis.from_url(redis_url, decode_responses=True)
        await admin.execute_command("ACL", "SETUSER", "dlq2", "on", ">pw2-Sekrit", "~*", "&*", "+@all")
        url = redis_url.replace("redis://", "redis://dlq2:pw2-Sekrit@")
        try:
            r, c, p, ws, text = await parked(url, reconnect_backoff=0.05, max_backoff=0.2)
            await admin.execute_command("ACL", "SETUSER", "dlq2", "-info")
            await asyncio.sleep(0.5)
            assert await _until(lambda: c.health()["up"])
            await r.lrem(KEY, 1, text)
            await r.lpush(f"{KEY}:processing", text)
            await seen(ws, "retry")
            assert c.health()["internal_errors"] == 0
            await c.close()
            await r.aclose()
        finally:
            await admin.execute_command("ACL", "DELUSER", "dlq2")
            await admin.aclose()

    with caplog.at_level(logging.WARNING):
        asyncio.run(run())
    assert "Traceback" not in caplog.text and "Sekrit" not in caplog.text


@pytest.mark.parametrize("shape", ["zset", "stream"])
def test_redis_side_times_do_not_move_our_timestamps(redis_url: str, shape: str) -> None:
    """A zset scored a day ahead, a stream id a year ahead and a created_at in 1999: the
    sighting is timed by our own looks; the entry's own time only fills sink_time."""

    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url)
        p = Probe(step="dlq")
        ws = watches(c, p, hop(shape), events=("entry",))
        await settle(c)
        text = entry_text(p, created_at="1999-01-01T00:00:00Z")
        before = clock.now()
        if shape == "zset":
            await r.zadd(KEY, {text: clock.wall(clock.now()) + 86400})
        else:
            await r.xadd(KEY, {"entry": text}, id=f"{int((clock.wall(clock.now()) + 3e7) * 1000)}-0")
        await seen(ws, "entry")
        e = ws["entry"].first
        assert before - 0.05 <= e.at <= clock.now() and e.error_bar < 1
        assert e.sink_time == pytest.approx(clock.parse_iso("1999-01-01T00:00:00Z"))
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_a_user_without_info_permission_still_measures(redis_url: str) -> None:
    async def run() -> None:
        admin = Redis.from_url(redis_url, decode_responses=True)
        await admin.execute_command("ACL", "SETUSER", "noinfo", "on", ">pw3", "~*", "&*", "+@all", "-info")
        url = redis_url.replace("redis://", "redis://noinfo:pw3@")
        try:
            r, c, p, ws, text = await parked(url)
            assert c.health()["up"] and c.health()["push_active"]
            await r.lrem(KEY, 1, text)
            await r.lpush(f"{KEY}:processing", text)
            await seen(ws, "retry")
            await c.close()
            await r.aclose()
        finally:
            await admin.execute_command("ACL", "DELUSER", "noinfo")
            await admin.aclose()

    asyncio.run(run())


def test_check_with_the_dlq_flushed_mid_wait_says_unknown_and_why(redis_url: str) -> None:
    """End to end: someone runs FLUSHALL while the probe's entry waits for its retry. The retry
    hop is unknown (not ok, not lost), and its reason says the database was flushed."""
    import redis as sync_redis

    path = str(
        tmp_yaml(
            SPEC.format(collector_url=redis_url, inject_url=redis_url).replace(
                "deadline: 2s}", "deadline: 4s}"
            )
        )
    )
    admin = sync_redis.Redis.from_url(redis_url)
    done = threading.Event()

    def flusher() -> None:
        while not done.is_set():
            if admin.llen("dlq:adv"):
                time.sleep(0.3)  # seen parked by now
                admin.flushall()
                return
            time.sleep(0.02)

    t = threading.Thread(target=flusher, daemon=True)
    t.start()
    try:
        res = cli("check", "-c", path, "-n", "1", "--format", "json")
    finally:
        done.set()
        t.join(5)
        admin.close()
    assert res.returncode == 3, res.stdout + res.stderr
    summary = json.loads(res.stdout)
    rows = {h["hop"]: h["probes"][0] for s in summary["steps"] for h in s["hops"]}
    assert rows["parked"]["verdict"] == "ok"
    retry = rows["first_retry"]
    assert retry["verdict"] == "unknown", retry
    assert "flushed" in retry["reason"], retry["reason"]
    assert "Traceback" not in res.stderr


# -- the sandbox's worker through a Redis restart -----------------------------------------------


@pytest.mark.parametrize("shape", ["list", "stream"])
def test_sandbox_worker_finishes_a_retry_across_a_redis_restart(shape: str, caplog: Any) -> None:
    """Redis (with an AOF) restarts while a retry is in the handler: the worker finishes it once
    Redis is back (the entry leaves processing / the stream), parks nothing twice, and its task
    does not die with an unretrieved exception."""
    server = DurableRedis().start()

    async def handler(entry: dict[str, Any]) -> None:
        await asyncio.sleep(0.6)
        raise RuntimeError("HTTP 500")  # so it is re-parked: a second copy would show

    async def run() -> None:
        async with DlqWorker(
            server.url, KEY, shape=shape, retry_interval=0.05, backoff=1000, handler=handler
        ) as dlq:
            entry = await dlq.park("webhooks", {"n": 1}, "HTTP 500")
            assert await _until(lambda: bool(dlq._inflight), 5)
            server.kill()
            await asyncio.sleep(0.2)
            server.start()
            assert await _until(lambda: len(dlq.history) >= 1, 5)
            await asyncio.sleep(1.2)
            parked = [e for e in await dlq.entries() if e["id"] == entry["id"]]
            assert [e["attempt"] for e in parked][:1] == [2], parked  # re-parked exactly once
            assert len([e for e in parked if e["attempt"] == 2]) == 1
            if shape == "list":
                assert await dlq.entries(dlq.processing_key) == [] or len(dlq.history) > 1

    try:
        with caplog.at_level(logging.WARNING):
            asyncio.run(run())
    finally:
        server.stop()
    assert "exception was never retrieved" not in caplog.text, caplog.text[-2000:]


def test_requirepass_set_mid_run_is_unknown_quickly() -> None:
    server = RedisProcess().start()

    async def run() -> None:
        r, c, p, ws, text = await parked(server.url, reconnect_backoff=0.05, max_backoff=0.2)
        await r.config_set("requirepass", "Now-Sekrit-1")
        await r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert await _until(lambda: c.coverage.broken is not None or c.coverage.blind_now)
        await asyncio.sleep(0.5)
        assert c.coverage.blind_now and not ws["retry"].observations
        assert "authentication failed" in (c.coverage.broken or "")
        await c.close()
        await r.aclose()

    try:
        asyncio.run(run())
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["push", "poll"])
def test_an_entry_pushed_past_max_scan_is_not_retried(redis_url: str, mode: str) -> None:
    """3000 newer entries push the probe's (oldest) entry past the max_scan=1000 a look reads:
    out of sight is not taken. The look is partial (blind) and no retry is claimed."""

    async def run() -> None:
        r, c, p, ws, text = await parked(redis_url, mode, max_scan=1000)
        await r.eval("for i = 1, 3000 do redis.call('LPUSH', KEYS[1], 'other' .. i) end", 1, KEY)
        # (the listener first works through the 3000 events: under load that takes a while)
        assert await _until(lambda: c.coverage.blind_now, 5)
        await asyncio.sleep(0.3)
        assert not ws["retry"].observations, ws["retry"].first
        assert c.coverage.blind_now and "max_scan=1000" in (c.health()["last_error"] or "")
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_a_dead_key_longer_than_max_scan_is_no_proof_of_resolution(redis_url: str) -> None:
    """The dead key holds 1500 old dead letters and the worker RPUSHes (appends) to it: the
    probe's dead entry lies past the part a look reads. That must not read as resolved."""

    async def run() -> None:
        r, c, p, ws, text = await parked(redis_url, max_scan=1000)
        await r.eval("for i = 1, 1500 do redis.call('RPUSH', KEYS[1], 'old' .. i) end", 1, f"{KEY}:dead")
        await asyncio.sleep(0.2)
        async with r.pipeline(transaction=True) as pipe:  # retried, failed for good: dead-lettered
            pipe.lrem(KEY, 1, text)
            pipe.rpush(f"{KEY}:dead", json.dumps({**json.loads(text), "attempt": 5}))
            await pipe.execute()
        await seen(ws, "retry")
        await asyncio.sleep(0.5)
        assert not ws["resolved"].observations, ws["resolved"].first
        await c.close()
        await r.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("shape", ["list", "stream"])
def test_a_worker_that_reparks_under_a_new_id_is_still_a_retry_and_not_resolved(
    redis_url: str, shape: str
) -> None:
    """The other side of pinning the entry's id: once the probe's own entry is gone, one under a
    new id carrying its trace id is its re-parked (or dead-lettered) self, never 'resolved'."""

    async def run() -> None:
        r, c, p, ws, text = await parked(redis_url, shape=shape)
        w_dead = watch(c, p, "dead", hop(shape))
        reparked = json.dumps({**json.loads(text), "id": "new-id-1", "attempt": 2})
        if shape == "list":
            async with r.pipeline(transaction=True) as pipe:
                pipe.lrem(KEY, 1, text)
                pipe.lpush(KEY, reparked)
                await pipe.execute()
        else:
            ((xid, _),) = await r.xrange(KEY)
            async with r.pipeline(transaction=True) as pipe:
                pipe.xadd(KEY, {"entry": reparked})
                pipe.xdel(KEY, xid)
                await pipe.execute()
        await seen(ws, "retry")
        await asyncio.sleep(0.3)
        assert not ws["resolved"].observations
        dead = json.dumps({**json.loads(text), "id": "new-id-2", "attempt": 5})
        async with r.pipeline(transaction=True) as pipe:
            if shape == "list":
                pipe.lrem(KEY, 1, reparked)
                pipe.lpush(f"{KEY}:dead", dead)
            else:
                pipe.delete(KEY)  # (a stream's entries: gone with XDEL; the key itself stays)
                pipe.xadd(KEY, {"entry": "placeholder"})
                pipe.xadd(f"{KEY}:dead", {"entry": dead})
            await pipe.execute()
        assert await w_dead.wait_seen(3)
        await asyncio.sleep(0.3)
        assert not ws["resolved"].observations
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_a_storm_of_other_entries_never_makes_the_probe_falsely_lost(redis_url: str) -> None:
    """Another client parks and takes 4000 entries as fast as it can while the probe's entry is
    parked and retried: the probe's retry is seen, or its window is blind; never a silent lost,
    never a forged resolved."""

    async def run() -> None:
        r, c, p, ws, text = await parked(redis_url)
        noise = Redis.from_url(redis_url, decode_responses=True)

        async def storm() -> None:
            for i in range(40):
                async with noise.pipeline(transaction=False) as pipe:
                    for j in range(100):
                        pipe.lpush(KEY, f"noise-{i}-{j}")
                    for j in range(0, 100, 2):
                        pipe.lrem(KEY, 1, f"noise-{i}-{j}")
                    await pipe.execute()

        task = asyncio.create_task(storm())
        await asyncio.sleep(0.05)
        async with r.pipeline(transaction=True) as pipe:
            pipe.lrem(KEY, 1, text)
            pipe.lpush(f"{KEY}:processing", text)
            await pipe.execute()
        retried = clock.now()
        await task
        await asyncio.sleep(1.0)
        assert not ws["resolved"].observations  # it sits in processing
        if ws["retry"].observations:
            assert ws["retry"].first.not_before <= retried + 0.05
        else:
            assert c.coverage.blind_start(ws["retry"].since, clock.now()) is not None
        assert c.health()["internal_errors"] == 0
        await c.close()
        await r.aclose()
        await noise.aclose()

    asyncio.run(run())
