# ruff: noqa: F811  (the ph fixture is imported from test_posthog_server and used as a parameter)
"""PostHog answers that must never become a false verdict (issue 10 items 1-6, 14), on the real
sandbox server over HTTP and the official SDK for capture."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from collectors.posthog import PostHogCollector, PostHogConfig, build_query, property_field
from tests.test_posthog_server import ph, query, sdk, tracer_query, watch  # noqa: F401 (fixture)
from tracer.sandbox.posthog import PostHogState
from tracer.sandbox.posthog.parser import parse_select
from tracer.watch import Watch

pytestmark = pytest.mark.timeout(60)


def poll(url: str, watches: list[Watch], cycles: int = 1, **cfg: Any) -> PostHogCollector:
    async def run() -> PostHogCollector:
        async with httpx.AsyncClient() as client:
            config = PostHogConfig(host=url, project_id="1", personal_api_key="phx_sandbox", **cfg)
            c = PostHogCollector(config, client=client)
            for w in watches:
                c.watch(w)
            for _ in range(cycles):
                await c.poll_once()
            return c

    return asyncio.run(run())


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"detail": "Service under maintenance"},
        {"results": None, "columns": ["uuid"]},
        {
            "results": [],
            "columns": ["uuid", "event", "timestamp", "created_at"],
            "query_status": {"complete": False},
        },
        {"results": [[1, 2]], "columns": ["uuid", "event", "timestamp", "created_at"]},
        [1, 2, 3],
        "null",
    ],
)
def test_a_200_that_is_not_a_complete_result_set_is_no_evidence(
    ph: tuple[PostHogState, str], body: Any
) -> None:
    state, url = ph
    if body == "null":
        state.query_raw = b"null"
    else:
        state.query_body = body
    w = watch("lead_captured", "canary_trace_id", "equals", "{trace_id}")
    c = poll(url, [w])
    assert c.coverage.blind_now and c.failed_queries == 1 and c.malformed_answers == 1
    assert w.first is None


def test_the_poller_survives_garbage_and_reports_blind_then_recovers(ph: tuple[PostHogState, str]) -> None:
    state, url = ph
    w = watch("lead_captured", "canary_trace_id", "equals", "{trace_id}")

    async def run() -> tuple[dict[str, Any], dict[str, Any], bool]:
        async with httpx.AsyncClient() as client:
            config = PostHogConfig(
                host=url, project_id="1", personal_api_key="phx_sandbox", min_interval=0.05, max_backoff=0.1
            )
            c = PostHogCollector(config, client=client)
            await c.start()
            state.query_body = [1, 2, 3]
            c.watch(w)
            await asyncio.sleep(0.6)
            during = c.health()
            state.query_body = None
            sdk(url).capture("lead_captured", distinct_id="d", properties={"canary_trace_id": w.trace_id})
            await asyncio.sleep(0.8)
            after = c.health()
            alive = c._task is not None and not c._task.done()
            await c.close()
            return during, after, alive

    during, after, alive = asyncio.run(run())
    assert during["up"] is False and during["malformed_answers"] >= 2
    assert alive and w.first is not None and w.first.source == "poll"


def test_a_truncated_answer_is_looked_at_again_and_never_certifies(ph: tuple[PostHogState, str]) -> None:
    state, url = ph
    w = watch("lead_captured", "canary_trace_id", "equals", "{trace_id}")
    client = sdk(url)
    for i in range(120):  # a retrying emitter: many rows with the one watched value
        client.capture("lead_captured", distinct_id=f"d{i}", properties={"canary_trace_id": w.trace_id})

    raised = poll(url, [w])  # LIMIT 100 is cut -> a second look with a higher LIMIT completes
    assert raised.truncated_answers == 1 and raised.queries == 2 and not raised.coverage.blind_now

    state.max_limit = 100  # the server caps every LIMIT: rows past 100 in one second cannot be seen
    w2 = watch("lead_captured", "canary_trace_id", "equals", "{trace_id}")
    # One batch, spread over at most two seconds: one second holds more rows than any LIMIT allowed.
    batch = sdk(url, sync_mode=False, flush_at=500)
    for i in range(250):
        batch.capture("lead_captured", distinct_id=f"e{i}", properties={"canary_trace_id": w2.trace_id})
    batch.flush()
    batch.shutdown()
    capped = poll(url, [w2], max_rows=100)
    assert capped.coverage.blind_now and "truncated" in (capped.last_error or "")
    assert w2.first is not None  # what was seen is still a real sighting


def test_contains_matches_with_hex_next_to_the_trace_id(ph: tuple[PostHogState, str]) -> None:
    _, url = ph
    w = watch("lead_captured", "note", "contains", "lead{trace_id}")  # 'ead' are hex characters
    other = watch("lead_captured", "note", "contains", "lead{trace_id}")
    sdk(url).capture("lead_captured", distinct_id="d", properties={"note": f"xlead{w.trace_id}ab12 done"})
    c = poll(url, [w, other])
    assert w.first is not None and other.first is None and not c.coverage.blind_now


def test_unknown_project_key_loses_the_hop_while_queries_work(ph: tuple[PostHogState, str]) -> None:
    state, url = ph
    w = watch("lead_captured", "canary_trace_id", "equals", "{trace_id}")
    sdk(url, key="phc_other_project").capture(
        "lead_captured", distinct_id="d", properties={"canary_trace_id": w.trace_id}
    )
    c = poll(url, [w])
    assert state.dropped_unknown_key == 1 and state.captured == 0
    assert w.first is None and not c.coverage.blind_now  # a certified look found nothing: lost is true


@pytest.mark.parametrize(
    "text",
    [
        "SELECT properties.null FROM events",
        "SELECT uuid FROM events WHERE",
        "SELECT uuid FROM events WHERE event = 'x' LIMIT 10 OFFSET 5",
    ],
)
def test_what_posthog_refuses_is_a_400(ph: tuple[PostHogState, str], text: str) -> None:
    _, url = ph
    resp = query(url, text)
    assert resp.status_code == 400 and resp.json()["type"] == "validation_error", resp.text


@pytest.mark.parametrize(
    "path", ["canary_trace_id", "null", "select.from", "$set.$meta.trace", "LIMIT.in.order"]
)
def test_every_generated_query_shape_parses_with_posthogs_parser(path: str) -> None:
    ws = [
        watch("lead_captured", path, "equals", "{trace_id}"),
        watch("lead_captured", path, "contains", "x,{trace_id}|"),
        watch("paid", "canary_trace_id", "equals", "a,b|c;d~e^f#g h\tI'\\{trace_id}"),
    ]
    now = time.time()
    text, _ = build_query(ws, now - 60, now + 60)
    tree = parse_select(text)
    assert tree["node"] == "SelectQuery"
    field = parse_select(f"SELECT {property_field(path)} FROM events")["select"][0]
    assert field["chain"] == ["properties", *path.split(".")]


def test_contains_query_parses_fast_at_scale() -> None:
    ws = [watch("lead_captured", "email", "contains", "c+{trace_id}@") for _ in range(2000)]
    now = time.time()
    text = build_query(ws, now - 60, now + 60)[0]
    assert parse_select(text)["node"] == "SelectQuery" and len(text) < 200 * len(ws)
