"""Redis DLQ evidence, preflight, side metadata and leaving Redis as found, on a real redis-server.

Ground truth is what the test itself wrote and when; lags are checked within error bars."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.support import tmp_yaml
from tests.test_redis_dlq import collector, hop, seen, settle, watches
from tracer import clock
from tracer.evidence import Evidence
from tracer.probe import Probe
from tracer.sandbox.dlq import new_entry

KEY = "dlq:ev"

SPEC = """
service: shop
collectors:
  redis_dlq: {{url: "{collector_url}", timeout: 1s}}
steps:
  dlq:
    inject:
      redis_dlq:
        url: "{inject_url}"
        key: {key}
        entry: {{id: "{{uuid}}", payload: {{trace: "{{trace_id}}"}}, attempt: 1, created_at: "{{now_iso}}"}}
    hops:
      - {{name: parked, target: 1s, deadline: 2s, redis_dlq: {{key: {key}}}}}
      - {{name: first_retry, after: parked, target: 1s, deadline: 2s, redis_dlq: {{key: {key}, event: retry}}}}
"""


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def probes(summary: dict[str, Any], hop_name: str) -> list[dict[str, Any]]:
    return [p for s in summary["steps"] for h in s["hops"] if h["hop"] == hop_name for p in h["probes"]]


# -- evidence ---------------------------------------------------------------------------


def test_never_retried_entry_is_lost_and_still_parked_at_its_attempt(redis_url: str) -> None:
    """End to end through ``check``: the retry hop is lost, and its evidence says where the entry is."""
    text = SPEC.format(collector_url=redis_url, inject_url=redis_url, key=KEY)
    res = cli("check", "-c", str(tmp_yaml(text)), "-n", "2", "--format", "json")
    assert res.returncode == 1, res.stdout + res.stderr
    summary = json.loads(res.stdout)
    assert {p["verdict"] for p in probes(summary, "parked")} == {"ok"}
    rows = probes(summary, "first_retry")
    assert [p["verdict"] for p in rows] == ["lost", "lost"]
    for p in rows:
        ev = p["evidence"]
        entry = ev["found"]["entry"]
        assert entry["state"] == "parked" and entry["attempt"] == 1 and entry["events_seen"] == ["entry"]
        assert entry["key"] == KEY and entry["parked_since"] and entry["last_seen"]
        assert "the entry is still parked at attempt 1 (parked " in p["reason"], p["reason"]
        assert "no retry happened" in p["reason"] and "Is the retry worker running?" in p["reason"]
        assert ev["near_misses"] >= 1  # its own entry, waiting for another event


def test_near_misses_count_entries_without_the_trace_id(redis_url: str) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url)
        p = Probe(step="dlq")
        ws = watches(c, p, {"key": KEY, "trace_path": "payload.trace_id"}, events=("entry",))
        await settle(c)
        start = clock.now()
        for i in range(3):  # the trace id sits at another path: three near misses
            await r.lpush(
                KEY,
                json.dumps(new_entry("webhooks", {"trace": p.trace_id, "n": i}, "HTTP 500", max_attempts=5)),
            )
        await asyncio.sleep(0.3)
        assert not ws["entry"].observations
        ev = await c.explain(ws["entry"], start, clock.now(), Evidence(searched={"sink": "redis_dlq"}))
        assert ev.near_misses == 3 and ev.found["other_entries"] == 3
        assert (
            ev.summary
            == f"no entry carrying the trace id was seen in {KEY}; 3 other entries were there in the window"
        )
        assert "payload.trace_id" in (ev.hint or "")
        # Before the window, nothing: the count is about the window only.
        early = await c.explain(ws["entry"], start - 10, start - 5, Evidence(searched={}))
        assert early.near_misses == 0 and "Nothing arrived" in (early.hint or "")
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_dead_without_a_retry_in_between_says_so(redis_url: str) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url)
        p = Probe(step="dlq")
        spec = hop()  # with processing and dead keys
        ws = watches(c, p, spec, events=("entry", "resolved"))
        await settle(c)
        entry = json.dumps(new_entry("webhooks", {"trace_id": p.trace_id}, "HTTP 500", max_attempts=5))
        await r.lpush(KEY_OF(spec), entry)
        await seen(ws, "entry")
        async with r.pipeline(transaction=True) as pipe:
            pipe.lrem(KEY_OF(spec), 1, entry)
            pipe.lpush(spec["dead_key"], entry)
            await pipe.execute()
        await asyncio.sleep(0.3)
        assert not ws["resolved"].observations
        ev = await c.explain(ws["resolved"], ws["entry"].since, clock.now(), Evidence(searched={}))
        assert ev.found["entry"]["state"] == "dead"
        assert ev.summary.startswith(
            f"the entry went straight to the dead key {spec['dead_key']} at attempt 1"
        )
        await c.close()
        await r.aclose()

    asyncio.run(run())


def KEY_OF(spec: dict[str, Any]) -> str:  # noqa: N802 - reads as a constant at the call sites
    return spec["key"]


# -- preflight: a wrong password --------------------------------------------------------


@pytest.fixture()
def locked(redis_url: str):
    """A user 'tracer' with a known password; the URL carries a wrong one."""

    async def acl(*args: str) -> None:
        admin = Redis.from_url(redis_url, decode_responses=True)
        await admin.execute_command("ACL", *args)
        await admin.aclose()

    asyncio.run(acl("SETUSER", "tracer", "on", ">right-pw-123", "~*", "&*", "+@all"))
    yield redis_url.replace("redis://", "redis://tracer:wrong-pw-456@")
    asyncio.run(acl("DELUSER", "tracer"))


def test_doctor_wrong_password_is_exit_1_with_the_auth_line(redis_url: str, locked: str) -> None:
    text = SPEC.format(collector_url=locked, inject_url=redis_url, key=KEY)
    res = cli("doctor", "-c", str(tmp_yaml(text)))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL collectors.redis_dlq: Redis at " in res.stdout and "(authentication failed)" in res.stdout
    assert "fix: check the user and password in collectors.redis_dlq.url" in res.stdout
    assert "wrong-pw-456" not in res.stdout + res.stderr


def test_check_with_a_wrong_password_is_unknown_within_seconds(redis_url: str, locked: str) -> None:
    text = SPEC.format(collector_url=locked, inject_url=redis_url, key=KEY).replace(
        "deadline: 2s", "deadline: 60s"
    )
    began = time.monotonic()
    res = cli("check", "-c", str(tmp_yaml(text)), "-n", "1", "--format", "json")
    took = time.monotonic() - began
    assert res.returncode == 3, res.stdout + res.stderr
    assert took < 30, took  # far from the 60 s deadline (and its grace): the wait ended at once
    summary = json.loads(res.stdout)
    (p,) = probes(summary, "parked")
    assert p["verdict"] == "unknown" and "authentication failed" in p["reason"], p["reason"]
    assert "wrong-pw-456" not in res.stdout + res.stderr


def test_doctor_reports_a_wrong_type_and_the_notification_plan(redis_url: str) -> None:
    async def prepare() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        await r.lpush(KEY, "x")
        await r.config_set("notify-keyspace-events", "")
        await r.aclose()

    asyncio.run(prepare())
    text = SPEC.format(collector_url=redis_url, inject_url=redis_url, key=KEY).replace(
        "redis_dlq: {key: dlq:ev}}", "redis_dlq: {key: dlq:ev, shape: stream}}"
    )
    res = cli("doctor", "-c", str(tmp_yaml(text)))
    assert res.returncode == 1, res.stdout + res.stderr
    assert (
        f"FAIL collectors.redis_dlq: key '{KEY}' (it is a list, but the hop says shape: stream)" in res.stdout
    )
    assert "fix: set shape: list on the hop" in res.stdout
    assert (
        "ok   collectors.redis_dlq: keyspace notifications (off; funnel-tracer will add 'Kglzthxe' at start and remove them again on exit)"
        in res.stdout
    )


# -- side metadata keyed by an id inside each member ------------------------------------


@pytest.mark.parametrize("mode", ["push", "poll"])
def test_side_hash_retry_in_place_is_seen_when_the_attempts_change(redis_url: str, mode: str) -> None:
    """Members are whole JSON entries; attempts live in a hash under 'attempts:<id>' and are bumped
    while the entry stays in the list. The retry is when the bump happened, not the removal."""

    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url, mode=mode, poll_interval=0.1)
        p = Probe(step="dlq")
        spec = {
            "key": KEY,
            "meta_hash": "dlq:attempts",
            "meta_id_path": "id",
            "meta_field": "attempts:{id}",
            "trace_path": "payload.trace_id",
        }
        ws = watches(c, p, spec, events=("entry", "retry", "resolved"))
        await settle(c)
        entry = new_entry("webhooks", {"trace_id": p.trace_id}, "HTTP 500", max_attempts=5)
        member = json.dumps({k: v for k, v in entry.items() if k != "attempt"})
        async with r.pipeline(transaction=True) as pipe:
            pipe.hset("dlq:attempts", f"attempts:{entry['id']}", 0)
            pipe.lpush(KEY, member)
            await pipe.execute()
        parked = clock.now()
        await seen(ws, "entry")
        await asyncio.sleep(0.5)
        await r.hincrby("dlq:attempts", f"attempts:{entry['id']}", 1)  # the retry, in place
        bumped = clock.now()
        await seen(ws, "retry")
        await asyncio.sleep(1.0)
        async with r.pipeline(transaction=True) as pipe:
            pipe.lrem(KEY, 1, member)
            pipe.hdel("dlq:attempts", f"attempts:{entry['id']}")
            await pipe.execute()
        await seen(ws, "resolved")
        e, rt = ws["entry"].first, ws["retry"].first
        assert e.detail["attempt"] == 0 and rt.detail["attempt"] == 1
        assert e.detail["entry_id"] == entry["id"]
        bar = e.error_bar + rt.error_bar
        lag = rt.at - e.at
        truth = bumped - parked
        assert abs(lag - truth) <= bar + 0.05, (lag, truth, bar)  # ~0.5 s, not the 1.5 s removal
        await c.close()
        await r.aclose()

    asyncio.run(run())


def test_side_hash_without_metadata_warns_once_and_says_so_in_evidence(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        r = Redis.from_url(redis_url, decode_responses=True)
        c = await collector(redis_url, poll_interval=0.1)
        p = Probe(step="dlq")
        spec = {"key": KEY, "meta_hash": "dlq:meta", "meta_id_path": "id", "trace_path": "payload.trace_id"}
        ws = watches(c, p, spec, events=("entry", "retry"))
        await settle(c)
        entry = new_entry("webhooks", {"trace_id": p.trace_id}, "HTTP 500", max_attempts=5)
        await r.lpush(KEY, json.dumps(entry))  # no metadata written for it
        await seen(ws, "entry")
        await asyncio.sleep(0.5)
        ev = await c.explain(ws["retry"], ws["entry"].since, clock.now(), Evidence(searched={}))
        assert ev.found["meta_missing"] == {"hash": "dlq:meta", "field": entry["id"]}
        assert "dlq:meta had no field" in ev.summary and "meta_id_path" in (ev.hint or "")
        await c.close()
        await r.aclose()

    with caplog.at_level("WARNING"):
        asyncio.run(run())
    warnings = [m for m in caplog.messages if "has no field" in m]
    assert len(warnings) == 1, warnings


# -- Redis left as found ------------------------------------------------------------------


@pytest.mark.parametrize(("before", "keep"), [("", False), ("Ex", False), ("", True)])
def test_notifications_enabled_by_us_are_restored_on_close(redis_url: str, before: str, keep: bool) -> None:
    async def run() -> str:
        r = Redis.from_url(redis_url, decode_responses=True)
        await r.config_set("notify-keyspace-events", before)
        c = await collector(redis_url, keep_notifications=keep)
        assert c.health()["push_active"]
        during = (await r.config_get("notify-keyspace-events"))["notify-keyspace-events"]
        assert set("Kglz") <= set(during)
        await c.close()
        after = (await r.config_get("notify-keyspace-events"))["notify-keyspace-events"]
        await r.config_set("notify-keyspace-events", "")
        await r.aclose()
        return after

    after = asyncio.run(run())
    if keep:
        assert set("Kglz") <= set(after)
    else:
        assert set(after) == set(before), after


def test_notifications_already_on_are_left_alone(redis_url: str) -> None:
    async def run() -> str:
        r = Redis.from_url(redis_url, decode_responses=True)
        await r.config_set("notify-keyspace-events", "KA")
        c = await collector(redis_url)
        await c.close()
        after = (await r.config_get("notify-keyspace-events"))["notify-keyspace-events"]
        await r.config_set("notify-keyspace-events", "")
        await r.aclose()
        return after

    assert set(asyncio.run(run())) >= set("KA") - {"A"}
