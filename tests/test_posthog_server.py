"""The sandbox PostHog, over the wire: the official SDK captures, httpx and the tracer's own
collector query. If these pass, the tracer's PostHog tests exercise the same requests and
answers they would meet at PostHog."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from posthog import Posthog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from collectors.posthog import PostHogCollector, PostHogConfig, build_query
from tests.support import free_port
from tracer import clock
from tracer.probe import Probe
from tracer.sandbox.posthog import PostHogState, create_app
from tracer.sandbox.runner import bind
from tracer.spec import HopSpec
from tracer.watch import Watch

pytestmark = pytest.mark.timeout(30)

ISO_Z = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$"


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a thread, as the sandbox runner does."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture()
def ph() -> Iterator[tuple[PostHogState, str]]:
    state = PostHogState()
    with serve(create_app(state)) as url:
        yield state, url


def sdk(url: str, key: str = "phc_sandbox", **kw: Any) -> Posthog:
    kw.setdefault("sync_mode", True)
    return Posthog(key, host=url, disable_geoip=True, **kw)


def watch(event: str, prop: str, match: str, value: str) -> Watch:
    hop = HopSpec(
        name="h", target=5, posthog={"event": event, "property": prop, "match": match, "value": value}
    )
    return Watch(Probe("lead"), hop, since=clock.now())


def tracer_query(watches: list[Watch]) -> str:
    now = time.time()
    return build_query(watches, now - 120, now + 120)[0]


def query(url: str, text: str, key: str = "phx_sandbox", project: str = "1") -> httpx.Response:
    body = {"query": {"kind": "HogQLQuery", "query": text}, "refresh": "force_blocking"}
    return httpx.post(
        f"{url}/api/projects/{project}/query/", json=body, headers={"Authorization": f"Bearer {key}"}
    )


def rows(resp: httpx.Response) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    data = resp.json()
    return [dict(zip(data["columns"], r, strict=True)) for r in data["results"]]


def collector_poll(url: str, w: Watch) -> tuple[float | None, PostHogCollector]:
    """One poll cycle of the tracer's real PostHog collector for ``w``: (forced delay, collector)."""

    async def run() -> tuple[float | None, PostHogCollector]:
        async with httpx.AsyncClient() as client:
            config = PostHogConfig(host=url, project_id="1", personal_api_key="phx_sandbox")
            c = PostHogCollector(config, client=client)
            c.watch(w)
            return await c.poll_once(), c

    return asyncio.run(run())


# --------------------------------------------------------------------------- capture + query


def test_sdk_capture_is_found_by_the_tracers_query(ph: tuple[PostHogState, str]) -> None:
    state, url = ph
    w = watch("lead_captured", "email", "contains", "canary+{trace_id}@")
    client = sdk(url)
    sent_uuid = client.capture(
        "lead_captured", distinct_id="d1", properties={"email": f"canary+{w.trace_id}@x.io"}
    )
    client.capture("lead_captured", distinct_id="d2", properties={"email": "someone@else.io"})
    client.capture("other_event", distinct_id="d1", properties={"email": f"canary+{w.trace_id}@x.io"})

    resp = query(url, tracer_query([w]))
    data = resp.json()
    found = rows(resp)

    assert state.captured == 3
    assert [r["uuid"] for r in found] == [sent_uuid]
    assert data["columns"] == ["uuid", "event", "timestamp", "created_at", "m0", "traceparent"]
    assert data["types"][2] == ["timestamp", "DateTime64(6, 'UTC')"]
    assert data["is_cached"] is False and data["error"] is None
    # PostHog paginates only queries without their own LIMIT: a full page says nothing here.
    assert not {"hasMore", "limit", "offset"} & data.keys()
    assert found[0]["m0"] == f"canary+{w.trace_id}@x.io"
    for key in ("timestamp", "created_at"):
        assert re.match(ISO_Z, found[0][key]), found[0][key]
    stored = state.events()[0]
    assert stored["properties"]["$lib"] == "posthog-python"
    assert abs(stored["timestamp"] - time.time()) < 5


def test_tracer_collector_observes_the_event(ph: tuple[PostHogState, str]) -> None:
    _, url = ph
    w = watch("lead_captured", "canary_trace_id", "equals", "{trace_id}")
    sdk(url).capture("lead_captured", distinct_id="d", properties={"canary_trace_id": w.trace_id})

    delay, c = collector_poll(url, w)

    assert delay is None and c.failed_queries == 0
    assert w.first is not None and w.first.source == "poll"
    assert w.first.sink_time is not None and abs(w.first.sink_time - time.time()) < 5


def test_ingest_delay_hides_the_event_until_ingested(ph: tuple[PostHogState, str]) -> None:
    state, url = ph
    state.ingest_delay = 1.0
    w = watch("lead_captured", "canary_trace_id", "equals", "{trace_id}")
    sdk(url).capture("lead_captured", distinct_id="d", properties={"canary_trace_id": w.trace_id})
    text = tracer_query([w])
    (stored,) = state.events()

    assert rows(query(url, text)) == []
    assert time.time() < stored["visible_at"], "too slow to observe the hidden window"
    time.sleep(max(0.0, stored["visible_at"] - time.time()) + 0.05)
    found = rows(query(url, text))

    assert len(found) == 1
    # created_at is stamped at capture, before the row is queryable (as PostHog's worker does).
    assert stored["visible_at"] - stored["created_at"] == pytest.approx(1.0, abs=0.01)
    assert stored["created_at"] == pytest.approx(stored["received_at"], abs=1e-5)
    assert clock.parse_iso(found[0]["created_at"]) == pytest.approx(stored["created_at"], abs=1e-5)


def test_equals_and_contains_matching(ph: tuple[PostHogState, str]) -> None:
    """The query narrows ``contains`` hops by trace id; the collector then keeps only rows holding
    the rendered value (LIKE metacharacters, quotes and backslashes are plain text there).
    Values come back as PostHog's raw JSON text: the backslash is escaped."""
    _, url = ph
    eq = watch("paid", "ref", "equals", "ord_{trace_id}")
    like = watch("paid", "note", "contains", "50%_off'\\{trace_id}")
    client = sdk(url)
    uuids = [
        client.capture("paid", distinct_id="d", properties=props)
        for props in (
            {"ref": f"ord_{eq.trace_id}"},  # equals hit
            {"ref": f"xord_{eq.trace_id}"},  # a superstring is no equals hit
            {"note": f"got 50%_off'\\{like.trace_id} today"},  # contains hit
            {"note": f"got 50%Xoff'\\{like.trace_id} today"},  # '_' must not be a wildcard
            {"note": f"got 50X_off'\\{like.trace_id} today"},  # '%' must not be a wildcard
        )
    ]

    found = rows(query(url, tracer_query([eq, like])))
    assert {(r["m0"], r["m1"]) for r in found} == {
        (f"ord_{eq.trace_id}", None),
        (None, f"got 50%_off'\\\\{like.trace_id} today"),
        (None, f"got 50%Xoff'\\\\{like.trace_id} today"),
        (None, f"got 50X_off'\\\\{like.trace_id} today"),
    }
    for w, hit in ((eq, uuids[0]), (like, uuids[2])):
        delay, _ = collector_poll(url, w)
        assert delay is None and [o.detail["uuid"] for o in w.observations] == [hit]


def test_nested_property_path_and_non_string_values(ph: tuple[PostHogState, str]) -> None:
    _, url = ph
    w = watch("signup", "lead.$meta.trace", "equals", "{trace_id}")
    props = {"lead": {"$meta": {"trace": w.trace_id}, "score": 7, "vip": True}}
    sdk(url).capture("signup", distinct_id="d", properties=props)
    sdk(url).capture("signup", distinct_id="d", properties={"lead": "flat string"})

    found = rows(query(url, tracer_query([w])))
    assert [r["m0"] for r in found] == [w.trace_id]

    text = "select properties.lead.score as s, properties.lead.vip as v, properties.nope.x as n from events"
    values = sorted(rows(query(url, text)), key=lambda r: r["s"] is None)
    assert values == [{"s": "7", "v": "true", "n": None}, {"s": None, "v": None, "n": None}]


def test_hand_written_queries_in_the_subset(ph: tuple[PostHogState, str]) -> None:
    _, url = ph
    client = sdk(url)
    for i in range(3):
        client.capture("step", distinct_id=f"d{i}", properties={"n": f"v{i}", "q": "it's a \\ test"})
    # Other AND order, keyword case, escapes, NOT IN, DESC. Properties compare on their raw JSON
    # text, as in PostHog: the stored backslash is the two characters '\\\\' there.
    text = (
        "SELECT distinct_id, properties.n AS n FROM events where properties.q = 'it\\'s a \\\\\\\\ test' "
        "and event = 'step' AND properties.n NOT IN ('v0') order by timestamp DESC limit 1"
    )
    decoded = text.replace("\\\\\\\\", "\\\\")
    resp = query(url, text)
    assert [r["n"] for r in rows(resp)] == ["v2"]
    assert rows(query(url, decoded)) == []
    assert "hasMore" not in resp.json()
    unlimited = query(url, "SELECT uuid FROM events WHERE event = 'step'").json()
    assert (unlimited["hasMore"], unlimited["limit"], unlimited["offset"]) == (False, 100, 0)


# --------------------------------------------------------------------------- refusals and faults


def test_query_auth_and_project_errors(ph: tuple[PostHogState, str]) -> None:
    state, url = ph
    text = "SELECT uuid FROM events"

    wrong = query(url, text, key="phx_wrong")
    missing = httpx.post(
        f"{url}/api/projects/1/query/", json={"query": {"kind": "HogQLQuery", "query": text}}
    )
    other_project = query(url, text, project="2")

    assert wrong.status_code == 401
    assert wrong.json() == {
        "type": "authentication_error",
        "code": "authentication_failed",
        "detail": "Personal API key found in request Authorization header is invalid.",
        "attr": None,
    }
    assert missing.status_code == 401 and missing.json()["type"] == "authentication_error"
    assert other_project.status_code == 404
    assert state.queries == 3


def test_unknown_project_key_is_accepted_and_dropped_malformed_key_refused(
    ph: tuple[PostHogState, str],
) -> None:
    """PostHog answers 200 to a well-formed key of no project and drops the events: the SDK sees
    success, only the missing event tells. A missing or personal key is a 401."""
    state, url = ph
    errors: list[Exception] = []
    client = sdk(url, key="phc_wrong", sync_mode=False, on_error=lambda exc, _batch: errors.append(exc))
    client.capture("lead_captured", distinct_id="d")
    client.flush()
    client.shutdown()
    raw = httpx.post(f"{url}/i/v0/e/", json={"event": "x", "distinct_id": "d"})  # no token at all
    personal = httpx.post(f"{url}/i/v0/e/", json={"event": "x", "distinct_id": "d", "api_key": "phx_sandbox"})

    assert errors == []
    assert raw.status_code == 401 and raw.json()["code"] == "invalid_api_key"
    assert personal.status_code == 401
    assert state.events() == [] and state.captured == 0 and state.rejected == 2
    assert state.dropped_unknown_key == 1


def test_unsupported_query_is_a_400_with_posthogs_error_body(ph: tuple[PostHogState, str]) -> None:
    _, url = ph
    resp = query(url, "SELECT avg(1) FROM persons")
    other_kind = httpx.post(
        f"{url}/api/projects/1/query/",
        json={"query": {"kind": "EventsQuery", "select": ["*"]}},
        headers={"Authorization": "Bearer phx_sandbox"},
    )

    assert resp.status_code == 400
    body = resp.json()
    assert body["type"] == "validation_error" and body["code"] == "query_error" and body["attr"] is None
    assert "avg" in body["detail"]
    bad_clause = query(url, "SELECT uuid FROM events WHERE event = 'a' GROUP BY event")
    assert bad_clause.status_code == 400 and "GROUP" in bad_clause.json()["detail"]
    assert other_kind.status_code == 400 and "EventsQuery" in other_kind.json()["detail"]


def test_query_fault_429_with_retry_after(ph: tuple[PostHogState, str]) -> None:
    state, url = ph
    state.query_fault, state.retry_after = 429, 3
    w = watch("lead_captured", "canary_trace_id", "equals", "{trace_id}")

    resp = query(url, tracer_query([w]))

    delay, c = collector_poll(url, w)
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "3"
    assert resp.json()["type"] == "throttled_error"
    assert delay is not None and delay >= 3 and c.coverage.blind_now
    assert state.queries == 2

    state.query_fault = None
    assert query(url, tracer_query([w])).status_code == 200


def test_force_cached_is_flagged_and_the_tracer_refuses_it(ph: tuple[PostHogState, str]) -> None:
    state, url = ph
    state.force_cached = True
    w = watch("lead_captured", "canary_trace_id", "equals", "{trace_id}")
    sdk(url).capture("lead_captured", distinct_id="d", properties={"canary_trace_id": w.trace_id})

    resp = query(url, tracer_query([w]))

    _, c = collector_poll(url, w)
    assert resp.json()["is_cached"] is True and len(resp.json()["results"]) == 1
    assert c.cached_results == 1 and w.observations == []


# --------------------------------------------------------------------------- capture wire formats


def test_gzip_batch_from_the_batching_sdk() -> None:
    state = PostHogState()
    app = create_app(state)
    seen: list[tuple[str, bytes]] = []

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append((scope["path"], dict(scope["headers"]).get(b"content-encoding", b"")))
        await app(scope, receive, send)

    with serve(recording) as url:
        client = sdk(url, sync_mode=False, gzip=True, flush_at=10)
        uuids = [client.capture("batched", distinct_id=f"d{i}", properties={"i": i}) for i in range(5)]
        client.flush()
        client.shutdown()
        found = rows(query(url, "SELECT uuid FROM events WHERE event = 'batched'"))

    assert ("/batch/", b"gzip") in seen
    assert sorted(e["uuid"] for e in state.events()) == sorted(uuids)
    assert sorted(r["uuid"] for r in found) == sorted(uuids)


def test_capture_v1_protocol_from_the_sdk(ph: tuple[PostHogState, str]) -> None:
    state, url = ph
    client = sdk(url, capture_mode="v1", capture_compression="gzip")
    sent = client.capture(
        "v1_event", distinct_id="d", properties={"k": "v", "$process_person_profile": False}
    )

    (stored,) = state.events()
    assert stored["uuid"] == sent and stored["properties"]["k"] == "v"
    assert stored["properties"]["$lib"] == "posthog-python"
    assert stored["properties"]["$process_person_profile"] is False


def test_single_event_endpoints_and_the_timestamp_rule(ph: tuple[PostHogState, str]) -> None:
    state, url = ph
    now = time.time()
    skewed = {  # client clock an hour slow; event happened 5 s before sending
        "api_key": "phc_sandbox",
        "event": "skewed",
        "distinct_id": "d",
        "timestamp": "2001-01-01T00:00:00Z",
        "sent_at": "2001-01-01T00:00:05Z",
    }
    epoch = {"token": "phc_sandbox", "event": "epoch", "distinct_id": "d", "timestamp": now - 30}
    body = gzip.compress(json.dumps(epoch).encode())

    r1 = httpx.post(f"{url}/e", json=skewed)
    r2 = httpx.post(f"{url}/capture/", content=body, headers={"Content-Encoding": "gzip"})
    r3 = httpx.post(
        f"{url}/track/", json={"api_key": "phc_sandbox", "batch": [{"event": "now", "distinct_id": "d"}]}
    )

    assert [r.status_code for r in (r1, r2, r3)] == [200, 200, 200]
    assert r1.json() == {"status": "Ok"}
    by_name = {e["event"]: e for e in state.events()}
    assert by_name["skewed"]["timestamp"] == pytest.approx(by_name["skewed"]["received_at"] - 5, abs=0.01)
    assert by_name["epoch"]["timestamp"] == pytest.approx(now - 30, abs=1e-5)
    assert by_name["now"]["timestamp"] == pytest.approx(by_name["now"]["received_at"], abs=0.01)
    uuid.UUID(by_name["now"]["uuid"])  # generated when the client sent none


def test_malformed_bodies_are_400_and_the_server_keeps_serving(ph: tuple[PostHogState, str]) -> None:
    state, url = ph
    bad = [
        httpx.post(f"{url}/batch/", content=b"{not json", headers={"Content-Type": "application/json"}),
        httpx.post(f"{url}/batch/", content=b"\x1f\x8bgarbage", headers={"Content-Encoding": "gzip"}),
        httpx.post(f"{url}/batch/", json={"api_key": "phc_sandbox", "batch": "nope"}),
        httpx.post(f"{url}/i/v0/e/", json={"api_key": "phc_sandbox", "event": "", "distinct_id": "d"}),
        httpx.post(f"{url}/i/v0/e/", json={"api_key": "phc_sandbox", "event": "e"}),
        httpx.post(
            f"{url}/i/v0/e/", json={"api_key": "phc_sandbox", "event": "e", "distinct_id": "d", "uuid": "x"}
        ),
    ]

    for r in bad:
        assert r.status_code == 400, r.text
        assert r.json()["type"] == "validation_error"
    assert httpx.get(f"{url}/_health").json() == {"status": "ok"}
    assert sdk(url).capture("after", distinct_id="d") is not None
    assert [e["event"] for e in state.events()] == ["after"]
    assert state.rejected == len(bad)


# --------------------------------------------------------------------------- destinations


def test_destination_receives_the_default_webhook_body_with_retry(ph: tuple[PostHogState, str]) -> None:
    state, url = ph
    received: list[dict[str, Any]] = []
    attempts: list[int] = []
    arrived = threading.Event()

    async def hook(request: Request) -> JSONResponse:
        attempts.append(1)
        if len(attempts) == 1:
            return JSONResponse({"detail": "flaky"}, status_code=500)  # PostHog retries this
        received.append(await request.json())
        arrived.set()
        return JSONResponse({"ok": True})

    with serve(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as hook_url:
        dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
        state.destinations = [dead, f"{hook_url}/hook"]
        sent = sdk(url).capture(
            "lead_captured", distinct_id="d-42", properties={"email": "a@b.io", "$set": {"email": "a@b.io"}}
        )
        assert arrived.wait(5), "destination never received the event"
        assert httpx.get(f"{url}/_health").status_code == 200  # the dead destination harmed nothing

    (body,) = received
    assert len(attempts) == 2
    assert set(body) == {"event", "person"}
    assert set(body["event"]) == {"uuid", "event", "distinct_id", "properties", "timestamp", "url"}
    assert set(body["person"]) == {"id", "name", "url", "properties"}
    assert body["event"]["uuid"] == sent and body["event"]["event"] == "lead_captured"
    assert body["event"]["properties"]["email"] == "a@b.io"
    assert body["event"]["url"].startswith(f"{url}/project/1/events/{sent}/")
    assert body["person"]["properties"] == {"email": "a@b.io"} and body["person"]["name"] == "a@b.io"
    uuid.UUID(body["person"]["id"])


def test_grouped_aggregates_for_near_misses_and_preflight_counts(ph: tuple[PostHogState, str]) -> None:
    _, url = ph
    client = sdk(url)
    client.capture("a", distinct_id="d1", properties={"p": "x"})
    client.capture("a", distinct_id="d2", properties={"q": 1})
    client.capture("b", distinct_id="d3", properties={"p": "y"})
    grouped = rows(
        query(
            url,
            "SELECT event, count() AS n, countIf(isNull(properties.p)) AS z, "
            "groupUniqArrayIf(5)(toString(properties.p), isNotNull(properties.p)) AS v "
            "FROM events WHERE event IN ('a', 'b') GROUP BY event",
        )
    )
    assert sorted((r["event"], r["n"], r["z"], r["v"]) for r in grouped) == [
        ("a", 2, 1, ["x"]),
        ("b", 1, 0, ["y"]),
    ]
    (total,) = rows(query(url, "SELECT count() AS n FROM events WHERE event = 'none'"))
    assert total["n"] == 0  # an aggregate over nothing is one row
    ungrouped = query(url, "SELECT event, count() FROM events")
    assert ungrouped.status_code == 400 and "GROUP BY" in ungrouped.json()["detail"]
    nested = query(url, "SELECT countIf(count() > 1) FROM events")
    assert nested.status_code == 400
