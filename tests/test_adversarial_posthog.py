"""Issue 10, second round: a PostHog that answers in every way a real one (or a proxy in front
of it) might misbehave, over real sockets. The promise: a look that could not be made or read is
blind (``unknown``), never a false ``late``/``lost``, never a forged ``ok``, never a dead or
stalled poller, never a secret in what the tracer says."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
import zlib
from typing import Any

import httpx
import pytest

from collectors.posthog import PostHogCollector, PostHogConfig
from tests.hostile_http import Hostile, Request, response
from tests.test_posthog_server import watch
from tracer.watch import Watch

pytestmark = pytest.mark.timeout(40)

KEY = "phx_s3cret_personal_key_0123456789"
COLUMNS = ["uuid", "event", "timestamp", "created_at", "m0", "traceparent"]


def config(url: str, **cfg: Any) -> PostHogConfig:
    cfg.setdefault("timeout", 1.0)
    cfg.setdefault("personal_api_key", KEY)
    return PostHogConfig(host=url, project_id="1", **cfg)


def answer(rows: list[list[Any]], columns: list[str] = COLUMNS, **extra: Any) -> dict[str, Any]:
    return {"columns": columns, "results": rows, "is_cached": False, **extra}


_ID = object()  # the watch's own trace id


def row(w: Watch, ts: Any = "2026-01-01T00:00:00.000000Z", value: Any = _ID) -> list[Any]:
    value = w.trace_id if value is _ID else value
    return ["0190-uuid", "lead_captured", ts, ts, value, None]


def lead() -> Watch:
    return watch("lead_captured", "canary_trace_id", "equals", "{trace_id}")


def poll(
    url: str, watches: list[Watch], cycles: int = 1, bound: float = 10.0, **cfg: Any
) -> PostHogCollector:
    """``cycles`` looks, each bounded: a poller that hangs fails the test, it does not hang it."""

    async def run() -> PostHogCollector:
        async with httpx.AsyncClient() as client:
            c = PostHogCollector(config(url, **cfg), client=client)
            for w in watches:
                c.watch(w)
            for _ in range(cycles):
                await asyncio.wait_for(c.poll_once(), bound)
            return c

    return asyncio.run(run())


def blind_whys(c: PostHogCollector) -> list[str]:
    return [str(why) for _, _, why in c.coverage.blind_windows(-1e18, 1e18)]


# -- the body: slow, endless, huge, a bomb ---------------------------------------------------


def trickle(req: Request, conn: socket.socket) -> None:
    """Headers at once, then one byte of a long body every 0.3 s: no read ever times out."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
    for _ in range(200):
        time.sleep(0.3)
        conn.sendall(b" ")


def test_a_body_that_trickles_forever_is_given_up_at_the_timeout() -> None:
    with Hostile(trickle) as srv:
        w = lead()
        started = time.monotonic()
        c = poll(srv.url, [w], timeout=1.0)
        assert time.monotonic() - started < 6
        assert c.coverage.blind_now and "timeout" in (c.last_error or "")
        assert w.first is None


def test_a_body_that_stops_half_way_or_is_reset_is_blind() -> None:
    def stall(req: Request, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b'{"columns": [')
        time.sleep(5)

    def reset(req: Request, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b'{"columns": [')
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close

    for handler in (stall, reset):
        with Hostile(handler) as srv:
            w = lead()
            c = poll(srv.url, [w], timeout=1.0)
            assert c.coverage.blind_now and c.failed_queries == 1 and w.first is None, handler.__name__


def endless(sent: list[int], encoding: str | None = None) -> Any:
    """A 200 that never ends: a JSON object opened, then whitespace for as long as anyone reads.
    With ``encoding='gzip'`` the whitespace is compressed about a thousand to one (a bomb)."""

    def handler(req: Request, conn: socket.socket) -> None:
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        if encoding:
            head += f"Content-Encoding: {encoding}\r\n"
        conn.sendall((head + "\r\n").encode())
        z = zlib.compressobj(9, zlib.DEFLATED, 31) if encoding else None
        block = b" " * (1 << 20)
        for i in range(4096):  # up to 4 GiB of JSON text: more than any client should hold
            text = b"{" + block if i == 0 else block
            chunk = z.compress(text) + z.flush(zlib.Z_SYNC_FLUSH) if z else text
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent[0] += len(text)

    return handler


@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_an_endless_or_bomb_body_is_cut_at_a_size_cap(encoding: str | None) -> None:
    sent = [0]
    with Hostile(endless(sent, encoding)) as srv:
        w = lead()
        c = poll(srv.url, [w], timeout=8.0, bound=15.0)
        assert c.coverage.blind_now and "too large" in (c.last_error or ""), c.last_error
        assert sent[0] < 1 << 30  # stopped reading long before a GiB of JSON text
        assert w.first is None


def test_deeply_nested_json_is_not_json_not_an_internal_error() -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    with Hostile(lambda req, conn: conn.sendall(response(200, body))) as srv:
        c = poll(srv.url, [lead()])
        assert c.coverage.blind_now and c.internal_errors == 0 and c.malformed_answers == 1


# -- the answer: columns, values, order ------------------------------------------------------


def test_an_answer_without_the_matched_column_is_no_look() -> None:
    """The query asked for ``m0``; an answer without it cannot say the probe is absent."""
    w = lead()
    cols = ["uuid", "event", "timestamp", "created_at", "traceparent"]
    with Hostile(lambda req, conn: conn.sendall(response(200, answer([], cols)))) as srv:
        c = poll(srv.url, [w])
        assert c.coverage.blind_now and c.malformed_answers == 1
        assert "m0" in (c.last_error or "")


def test_duplicate_column_names_are_no_look() -> None:
    w = lead()
    cols = [*COLUMNS, "m0"]  # the probe's value under the first m0, null under the second
    with Hostile(lambda req, conn: conn.sendall(response(200, answer([[*row(w), None]], cols)))) as srv:
        c = poll(srv.url, [w])
        assert c.coverage.blind_now and "duplicate" in (c.last_error or "")


def test_columns_in_another_order_still_match() -> None:
    w = lead()
    cols = list(reversed(COLUMNS))
    with Hostile(lambda req, conn: conn.sendall(response(200, answer([row(w)[::-1]], cols)))) as srv:
        c = poll(srv.url, [w])
        assert not c.coverage.blind_now and w.first is not None


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), 10**30, None, {"x": 1}, ["a"], True],
)
def test_odd_values_in_the_matched_column_are_no_sighting_and_no_crash(value: Any) -> None:
    w = lead()
    with Hostile(lambda req, conn: conn.sendall(response(200, answer([row(w, value=value)])))) as srv:
        c = poll(srv.url, [w])
        assert w.first is None and c.internal_errors == 0 and not c.coverage.blind_now


@pytest.mark.parametrize(
    "ts",
    [
        "NaN",
        "",
        "yesterday",
        "1970-01-01T00:00:00Z",
        "2999-01-01T00:00:00+14:00",
        "2026-01-01 00:00:00",
        1e999,
    ],
)
def test_odd_timestamps_never_bend_the_lag(ts: Any) -> None:
    """A row's own timestamps are the emitter's or PostHog's clock: indicative only, never the lag."""
    w = lead()
    with Hostile(lambda req, conn: conn.sendall(response(200, answer([row(w, ts=ts)])))) as srv:
        c = poll(srv.url, [w])
        assert c.internal_errors == 0 and w.first is not None
        assert w.since <= w.first.not_before <= w.first.at


def test_other_probes_ids_upper_case_and_duplicates_are_not_forged_sightings() -> None:
    w, other = lead(), lead()
    rows = [row(other), row(other), row(w, value=w.trace_id.upper()), row(w, value=" " + w.trace_id)]
    rows.append(["u", "lead_capturedX", "2026-01-01T00:00:00Z", None, w.trace_id, None])
    with Hostile(lambda req, conn: conn.sendall(response(200, answer(rows)))) as srv:
        c = poll(srv.url, [w, other])
        assert w.first is None and other.first is not None and len(other.observations) == 1
        assert not c.coverage.blind_now


def test_rows_as_objects_or_short_rows_are_no_look() -> None:
    w = lead()
    for rows in ([dict(zip(COLUMNS, row(w), strict=True))], [row(w)[:3]]):
        with Hostile(lambda req, conn, rows=rows: conn.sendall(response(200, answer(rows)))) as srv:
            c = poll(srv.url, [w])
            assert c.coverage.blind_now and w.first is None and c.internal_errors == 0


def test_a_truncated_answer_out_of_timestamp_order_does_not_skip_rows() -> None:
    """Keyset paging trusts ORDER BY timestamp: a cut answer whose last row is not its latest
    would move the window past rows never shown, and a later empty page would certify them."""
    w = lead()
    filler = [["u", "lead_captured", "2026-01-01T00:00:00Z", None, "x", None] for _ in range(99)]
    filler.append(["u", "lead_captured", "2099-01-01T00:00:00Z", None, "x", None])
    pages = [answer(filler), answer([])]
    with Hostile(lambda req, conn: conn.sendall(response(200, pages.pop(0) if pages else answer([])))) as srv:
        c = poll(srv.url, [w], max_rows=100)
        assert c.coverage.blind_now, "a window skipped by a forged keyset was certified"


# -- secrets: whatever the server echoes -------------------------------------------------------


def echo_key(status: int, field: str) -> Any:
    """A server that puts the Authorization header it received into its error text."""

    def handler(req: Request, conn: socket.socket) -> None:
        said = f"invalid token {req.headers.get('authorization', '')!r}, try again"
        conn.sendall(response(status, {field: said}))

    return handler


@pytest.mark.parametrize(
    ("status", "field"), [(200, "error"), (200, "detail"), (202, "detail"), (401, "detail")]
)
def test_a_server_echoing_the_key_never_gets_it_into_errors_or_logs(
    status: int, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with Hostile(echo_key(status, field)) as srv:
        c = poll(srv.url, [lead()], cycles=2)
        said = " ".join([c.last_error or "", *blind_whys(c), str(c.health()), caplog.text])
        assert "invalid token" in said  # the server's words are kept...
        assert KEY not in said  # ...its copy of the key is not


# -- backoff and redirects -------------------------------------------------------------------


@pytest.mark.parametrize(
    "retry_after",
    ["-5", "0", "1e9", "nan", "inf", "-inf", "Wed, 21 Oct 2015 07:28:00 GMT", "soon", "", "1" * 400],
)
def test_odd_retry_after_gives_a_finite_bounded_backoff(retry_after: str) -> None:
    with Hostile(
        lambda req, conn: conn.sendall(response(429, "slow down", {"Retry-After": retry_after}))
    ) as srv:

        async def run() -> float | None:
            async with httpx.AsyncClient() as client:
                c = PostHogCollector(config(srv.url, max_backoff=2.0), client=client)
                c.watch(lead())
                return await c.poll_once()

        delay = asyncio.run(run())
        assert delay is not None and 0 < delay <= 10.0, delay  # 5 x max_backoff at most


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_followed_and_the_key_stays_home(status: int) -> None:
    with Hostile(lambda req, conn: conn.sendall(response(200, answer([])))) as other:
        target = f"{other.url}/api/projects/1/query/"
        with Hostile(lambda req, conn: conn.sendall(response(status, "", {"Location": target}))) as srv:
            c = poll(srv.url, [lead()])
            assert c.coverage.blind_now and f"HTTP {status}" in (c.last_error or "")
            assert not other.requests  # the key never went to another host
            # a setup error (wrong host or scheme): waits end at once, naming where it points
            assert c.coverage.broken and other.url in c.coverage.broken, c.coverage.broken
            from collectors.posthog import _preflight

            found = asyncio.run(_preflight(config(srv.url), []))[0]
            assert not found.ok and found.blocks and "redirects to" in (found.fix or ""), found


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_5xx_html_page_is_blind_and_retried(status: int) -> None:
    page = "<html><body><h1>Bad Gateway</h1>" + "x" * 10_000 + "</body></html>"
    with Hostile(
        lambda req, conn: conn.sendall(response(status, page, {"Content-Type": "text/html"}))
    ) as srv:
        c = poll(srv.url, [lead()], cycles=2)
        assert c.coverage.blind_now and c.failed_queries == 2 and c.last_error == f"HTTP {status}"


def test_json_sent_as_text_html_is_still_read() -> None:
    w = lead()
    body = json.dumps(answer([row(w)]))
    with Hostile(lambda req, conn: conn.sendall(response(200, body, {"Content-Type": "text/html"}))) as srv:
        c = poll(srv.url, [w])
        assert w.first is not None and not c.coverage.blind_now


# -- near misses and the preflight: the same answers, other code -------------------------------


def near_miss_server(n: Any, v: Any = None) -> Any:
    """Poll answers are empty; the near-miss lookup's counts are ``n`` (and values ``v``)."""

    def handler(req: Request, conn: socket.socket) -> None:
        text = req.json()["query"]["query"]
        if "countIf" not in text:
            conn.sendall(response(200, answer([])))
            return
        cols = ["event", "n0", "z0", "h0", "v0"]
        conn.sendall(response(200, answer([["lead_captured", n, 0, 0, v if v is not None else []]], cols)))

    return handler


@pytest.mark.parametrize(
    ("n", "v"),
    [(float("nan"), None), (float("inf"), None), ("many", None), ({"a": 1}, None), (3, 7), (3, "abc")],
)
def test_a_garbled_near_miss_answer_costs_evidence_not_coverage(n: Any, v: Any) -> None:
    from tracer import clock
    from tracer.evidence import Evidence

    w = lead()
    with Hostile(near_miss_server(n, v)) as srv:

        async def run() -> tuple[Evidence, PostHogCollector, float]:
            async with httpx.AsyncClient() as client:
                fast = {"queries_per_minute": 6000, "queries_per_hour": 360000, "budget_share": 1.0}
                c = PostHogCollector(
                    config(srv.url, min_interval=0.1, max_backoff=0.2, **fast), client=client
                )
                await c.start()
                c.watch(w)
                await asyncio.sleep(0.3)
                started = time.monotonic()
                ev = await c.explain(w, w.since, clock.now(), Evidence(searched={}))
                took = time.monotonic() - started
                await c.close()
                return ev, c, took

        ev, c, took = asyncio.run(run())
        assert c.internal_errors == 0 and not c.coverage.blind_now
        assert took < 5  # answered in the next cycle, not after the 12 s wait
        assert "near-miss" in (ev.summary or "") or ev.found, ev.summary


def test_preflight_reads_columns_by_name_and_survives_odd_counts() -> None:
    from collectors.posthog import PostHogHop, _preflight

    def handler(req: Request, conn: socket.socket) -> None:
        text = req.json()["query"]["query"]
        if text == "SELECT 1":
            conn.sendall(response(200, answer([[1]], ["1"])))
        else:  # event last, and a count that is no number
            conn.sendall(response(200, answer([[5, float("nan"), "lead_captured"]], ["n", "f0", "event"])))

    with Hostile(handler) as srv:
        hop = PostHogHop(event="lead_captured")
        findings = asyncio.run(_preflight(config(srv.url), [hop]))
        by = {f.check.split(": ", 1)[1]: f for f in findings}
        seen = by["event 'lead_captured' seen in the last 7 days"]
        assert seen.ok and seen.detail == "5 events", findings


# -- whole probes: a hostile funnel and PostHog in one server, judged by the engine -------------

SPEC = """
service: hostile-posthog
collectors:
  posthog:
    host: {url}
    project_id: "1"
    personal_api_key: {key}
    queries_per_minute: 6000
    queries_per_hour: 360000
    budget_share: 1.0
    min_interval: 200ms
    max_backoff: 400ms
    timeout: {timeout}
steps:
  lead:
    inject:
      http:
        url: {url}/lead
        json: {{trace: "{{trace_id}}"}}
        timeout: 2s
    hops:
      - name: posthog_event
        target: {target}
        deadline: {deadline}
        late_grace: {grace}
        posthog: {{event: lead_captured, property: canary_trace_id}}
"""


class Funnel:
    """Takes leads on POST /lead and makes each queryable ``ingest`` seconds later; answers each
    query as of when it arrived, ``slow`` seconds later, or with ``fault(t)`` (t since the first
    lead) when that says a status."""

    def __init__(self, ingest: float = 0.2, slow: float = 0.0, fault: Any = None) -> None:
        self.ingest, self.slow, self.fault = ingest, slow, fault
        self.visible: dict[str, float] = {}
        self.first: float | None = None
        self.server = Hostile(self.handle)

    def handle(self, req: Request, conn: socket.socket) -> None:
        if req.path == "/lead":
            self.first = self.first or req.at
            self.visible[req.json()["trace"]] = req.at + self.ingest
            conn.sendall(response(200, {"ok": True}))
            return
        rows = [
            ["u", "lead_captured", "2026-01-01T00:00:00Z", None, tid, None]
            for tid, at in list(self.visible.items())
            if at <= req.at
        ]
        time.sleep(self.slow)
        status = self.fault(req.at - self.first) if self.fault and self.first else None
        conn.sendall(response(status, "down") if status else response(200, answer(rows)))

    def run(self, target: float, deadline: float, grace: float = 0.0, timeout: float = 5.0) -> Any:
        from tests.test_check import load
        from tracer.engine import Engine

        text = SPEC.format(
            url=self.server.url, key=KEY, target=target, deadline=deadline, grace=grace, timeout=timeout
        )

        async def go() -> Any:
            async with Engine(load(text)) as engine:
                return (await engine.check(1, early_stop=False))[0].hops[0]

        try:
            return asyncio.run(go())
        finally:
            self.server.close()


def test_a_slow_posthog_does_not_make_a_prompt_event_late() -> None:
    """The event is queryable 0.2 s after injection (target 2 s), but each answer takes 2.5 s:
    the look that saw it returned long after it arrived. That straddle is the tracer's slowness,
    not the funnel's: unknown (with the blind window), never late."""
    hop = Funnel(ingest=0.2, slow=2.5).run(target=2, deadline=12)
    assert hop.verdict in ("ok", "unknown"), (hop.verdict, hop.reason)
    if hop.verdict == "unknown":
        assert hop.evidence["blind"] and "slow" in json.dumps(hop.evidence["blind"]), hop.evidence


def test_a_slow_posthog_still_sees_a_really_late_event_as_late() -> None:
    hop = Funnel(ingest=3.5, slow=1.0).run(target=2, deadline=12)
    assert hop.verdict == "late" and hop.lag is not None and hop.lag >= 3.5, (hop.verdict, hop.reason)


def test_posthog_failing_from_before_the_deadline_on_is_unknown_not_lost() -> None:
    """Looks succeed for 1 s after injection, then every look is a 500 past the deadline: the
    event (queryable only at 2 s) was never looked for, and the blind window says so."""
    hop = Funnel(ingest=2.0, fault=lambda t: 500 if t > 1.0 else None).run(target=1, deadline=3)
    assert hop.verdict == "unknown", (hop.verdict, hop.reason)
    assert any("HTTP 500" in str(b) for b in hop.evidence["blind"]), hop.evidence


def test_posthog_back_after_an_outage_sees_the_event_with_an_honest_lag() -> None:
    """500s from injection until 2.5 s, the event queryable at 0.3 s (target 1 s): seen at the
    first good look, but its lag straddles the target only because of the outage: unknown."""
    hop = Funnel(ingest=0.3, fault=lambda t: 500 if t < 2.5 else None).run(target=1, deadline=6)
    assert hop.verdict == "unknown" and hop.lag is not None, (hop.verdict, hop.reason)


def test_an_event_queryable_after_the_deadline_is_late_within_grace_with_its_lag() -> None:
    hop = Funnel(ingest=3.0).run(target=1, deadline=2, grace=5)
    assert hop.verdict == "late" and hop.lag is not None and 3.0 <= hop.lag < 6, (hop.verdict, hop.lag)
    assert hop.error_bar is not None and hop.lag - hop.error_bar <= 3.0 + 0.5


def test_an_event_queryable_past_deadline_and_grace_is_lost_saying_when_it_was_seen_or_not() -> None:
    """Lost is the truth here (not seen by the deadline): the reason says so, with no blind window."""
    hop = Funnel(ingest=4.0).run(target=1, deadline=2)
    assert hop.verdict == "lost" and not hop.evidence["blind"], (hop.verdict, hop.reason, hop.evidence)


# -- configuration: what a secret file, an env var or a copied URL may hold -----------------------


@pytest.mark.parametrize("key", [KEY + "\n", f"  {KEY}\r\n", f"\t{KEY} "])
def test_a_key_with_surrounding_whitespace_from_a_file_or_env_var_just_works(key: str) -> None:
    w = lead()
    with Hostile(lambda req, conn: conn.sendall(response(200, answer([row(w)])))) as srv:

        async def run() -> PostHogCollector:
            async with httpx.AsyncClient() as client:
                cfg = PostHogConfig(host=srv.url, project_id="1", personal_api_key=key, timeout=2.0)
                c = PostHogCollector(cfg, client=client)
                c.watch(w)
                await c.poll_once()
                return c

        c = asyncio.run(run())
        assert not c.coverage.blind_now and w.first is not None, c.last_error
        assert srv.requests[0].headers["authorization"] == f"Bearer {KEY}"


BAD_VALUES = [
    ("personal_api_key", "phx_s3cré7"),
    ("personal_api_key", "phx_s3cr\x007"),
    ("personal_api_key", "phx_s3cr\r\nX-Evil: 1"),
    ("personal_api_key", "phx_s3 cr7"),
    ("personal_api_key", "  \n"),
    ("project_id", "1/../../2"),
    ("project_id", "1?personal_api_key=x"),
    ("host", "http://admin:hunter2hunter2@127.0.0.1:1"),
    ("host", "https://us.posthog.com/?x=1"),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_a_value_that_cannot_go_on_the_wire_is_a_config_error(field: str, value: str) -> None:
    """Refused when the spec loads: not a failed look on every poll (LocalProtocolError), nor an
    internal error (a non-ASCII key raised out of httpx), nor a URL that asks another endpoint."""
    from pydantic import ValidationError

    cfg = {"host": "http://127.0.0.1:1", "project_id": "1", "personal_api_key": KEY, field: value}
    with pytest.raises(ValidationError) as err:
        PostHogConfig(**cfg)
    assert [e["loc"] for e in err.value.errors()] == [(field,)]
    secret = value.strip() if field == "personal_api_key" else "hunter2hunter2"
    assert len(secret) < 3 or secret not in str(err.value)


def test_a_bad_key_from_an_env_var_exits_2_naming_its_path_never_echoing_it() -> None:
    import os
    import subprocess
    import sys

    from tests.support import tmp_yaml

    text = SPEC.format(url="http://127.0.0.1:1", key="${PH_KEY}", target=1, deadline=2, grace=0, timeout=1)
    cmd = [sys.executable, "-m", "tracer.cli", "doctor", "-c", str(tmp_yaml(text))]
    env = {**os.environ, "PH_KEY": "phx_s3cré7_secret"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "collectors.posthog.personal_api_key" in out, out
    assert "Traceback" not in out and "s3cr" not in out, out


def test_a_server_error_text_with_markup_brackets_is_printed_not_a_traceback() -> None:
    """The preflight prints PostHog's own words (``HTTP 400: ...``); text that looks like console
    markup (``[/docs]``) must come out as text, not crash ``check`` with a MarkupError."""
    import subprocess
    import sys

    from tests.support import tmp_yaml

    said = {"type": "validation_error", "detail": "see [/docs] and [bold]the [red]manual[/red]"}
    with Hostile(lambda req, conn: conn.sendall(response(400, said))) as srv:
        text = SPEC.format(url=srv.url, key=KEY, target=1, deadline=1, grace=0, timeout=1)
        cmd = [sys.executable, "-m", "tracer.cli", "check", "-c", str(tmp_yaml(text)), "-n", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1, 2, 3) and "Traceback" not in out, out
    assert "see [/docs]" in out, out


# -- the sandbox stand-in: it must refuse what PostHog refuses -----------------------------------


def test_the_sandbox_refuses_a_batch_that_is_no_json_as_posthog_does() -> None:
    """PostHog's capture parses with serde_json: NaN, Infinity and out-of-range numbers make the
    whole request a 400 (the events are lost). A sandbox that took them would pass a funnel
    that loses events in production."""
    from tests.test_posthog_server import serve
    from tracer.sandbox.posthog import PostHogState, create_app

    state = PostHogState()
    with serve(create_app(state)) as url:
        for prop in ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]:
            w = lead()
            props = f'{{"canary_trace_id": "{w.trace_id}", "score": {prop}}}'
            event = f'{{"event": "lead_captured", "distinct_id": "d", "properties": {props}}}'
            body = f'{{"api_key": "phc_sandbox", "batch": [{event}]}}'
            resp = httpx.post(f"{url}/batch/", content=body, headers={"Content-Type": "application/json"})
            assert resp.status_code == 400 and resp.json()["type"] == "validation_error", (prop, resp.text)
        assert state.captured == 0


def test_long_hex_runs_in_a_contains_answer_do_not_stall_the_event_loop() -> None:
    """2 rows of 1 MB of hex (what a LIMIT 100 answer may hold), each with the trace id in it:
    a window per character is 2 million lookups, seconds of the event loop. The sighting is
    found and the loop keeps ticking (other collectors' timing depends on it)."""
    import secrets

    w = watch("lead_captured", "note", "contains", "x{trace_id}")
    blob = secrets.token_hex(250_000) + "x" + w.trace_id + secrets.token_hex(250_000)
    rows = [row(w, value=json.dumps(blob)[1:-1]) for _ in range(2)]
    body = json.dumps(answer(rows)).encode()

    async def run() -> tuple[PostHogCollector, float]:
        async with httpx.AsyncClient() as client:
            c = PostHogCollector(config(srv.url, timeout=10.0), client=client)
            c.watch(w)
            worst, last, done = 0.0, time.monotonic(), False

            async def tick() -> None:
                nonlocal worst, last
                while not done:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    worst, last = max(worst, now - last), now

            ticker = asyncio.create_task(tick())
            await asyncio.wait_for(c.poll_once(), 60)
            done = True
            await ticker
            return c, worst

    with Hostile(lambda req, conn: conn.sendall(response(200, body))) as srv:
        c, worst = asyncio.run(run())
    assert w.first is not None and not c.coverage.blind_now
    assert worst < 2.0, f"event loop held for {worst:.1f}s"  # generous: the windows took ~5 s


def test_an_answer_refreshed_long_before_the_request_is_no_look() -> None:
    """``is_cached: false`` but ``last_refresh`` an hour old: a replayed or proxied copy that
    cannot show what arrived since, so it must not certify the window (a false lost)."""
    from tracer import clock

    old = clock.iso(time.time() - 3600)
    with Hostile(lambda req, conn: conn.sendall(response(200, answer([], last_refresh=old)))) as srv:
        c = poll(srv.url, [lead()])
        assert c.coverage.blind_now and "stale" in (c.last_error or ""), c.last_error
    fresh = clock.iso(time.time() - 5)  # seconds of clock difference are no staleness
    with Hostile(lambda req, conn: conn.sendall(response(200, answer([], last_refresh=fresh)))) as srv:
        c = poll(srv.url, [lead()])
        assert not c.coverage.blind_now, c.last_error


def test_a_second_answer_smuggled_after_the_first_is_never_read_as_the_next() -> None:
    """One write holds two responses on a keep-alive connection: the second (with the probe's
    row) answers no request, so the next look must not take it as its own."""
    w = lead()

    def first(body: Any) -> bytes:
        return response(200, body).replace(b"Connection: close", b"Connection: keep-alive")

    calls = [0]

    def handler(req: Request, conn: socket.socket) -> None:
        calls[0] += 1
        if calls[0] == 1:
            conn.sendall(first(answer([])) + first(answer([row(w)])))
            time.sleep(1.0)  # keep the connection open while the next look goes out
        else:
            conn.sendall(response(200, answer([])))

    with Hostile(handler) as srv:

        async def run() -> PostHogCollector:
            fast = {"queries_per_minute": 6000, "queries_per_hour": 360000, "budget_share": 1.0}
            c = PostHogCollector(config(srv.url, min_interval=0.2, max_backoff=0.2, **fast))  # own client
            await c.start()
            c.watch(w)
            await asyncio.sleep(1.5)
            await c.close()
            return c

        c = asyncio.run(run())
        assert w.first is None, "a smuggled answer was taken as a sighting"
        assert c.queries >= 3 and calls[0] == c.queries  # every look reached the server itself


def test_an_event_timestamped_before_the_injection_within_clock_skew_is_seen_with_a_sane_lag() -> None:
    """The official SDK with an explicit timestamp a minute before the injection (an emitter's
    clock behind): found (the window has clock_skew of slack), and the lag is measured on our
    clock, never negative; the sink's own time says the skew."""
    from datetime import datetime, timedelta, timezone

    from tests.test_posthog_server import sdk, serve
    from tracer.sandbox.posthog import PostHogState, create_app

    with serve(create_app(PostHogState())) as url:
        w = lead()
        past = datetime.now(timezone.utc) - timedelta(seconds=60)
        sdk(url).capture(
            "lead_captured", distinct_id="d", properties={"canary_trace_id": w.trace_id}, timestamp=past
        )
        c = poll(url, [w], personal_api_key="phx_sandbox")
    assert w.first is not None and not c.coverage.blind_now, c.last_error
    assert w.since <= w.first.not_before <= w.first.at
    assert w.first.detail["timestamp"] < w.first.detail["created_at"]  # skew visible, not hidden


def test_an_answer_far_past_its_limit_is_refused_unparsed_and_the_loop_keeps_ticking() -> None:
    """A server that ignores LIMIT 100 and sends a million rows (65 MB): parsing and matching
    them held the event loop for seconds (and with it every receiver's arrival stamps, on any
    sink), four times over as the cut answer was asked again. Refused whole, once."""
    rows = [["u", "lead_captured", "2026-01-01T00:00:00Z", None, "x", None] for _ in range(1_000_000)]
    body = json.dumps(answer(rows)).encode()
    del rows

    async def run() -> tuple[PostHogCollector, float]:
        async with httpx.AsyncClient() as client:
            c = PostHogCollector(config(srv.url, timeout=15.0), client=client)
            c.watch(lead())
            worst, last, done = 0.0, time.monotonic(), False

            async def tick() -> None:
                nonlocal worst, last
                while not done:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    worst, last = max(worst, now - last), now

            ticker = asyncio.create_task(tick())
            await asyncio.wait_for(c.poll_once(), 30)
            done = True
            await ticker
            return c, worst

    with Hostile(lambda req, conn: conn.sendall(response(200, body))) as srv:
        c, worst = asyncio.run(run())
    assert c.coverage.blind_now and "too large" in (c.last_error or ""), c.last_error
    assert c.queries == 1 and c.truncated_answers == 0  # not asked again four times
    assert worst < 1.5, f"event loop held for {worst:.1f}s"  # generous: it was ~3 s per look


def test_rows_past_the_limit_in_a_small_answer_are_refused_too() -> None:
    rows = [["u", "lead_captured", "2026-01-01T00:00:00Z", None, "x", None] for _ in range(101)]
    with Hostile(lambda req, conn: conn.sendall(response(200, answer(rows)))) as srv:
        c = poll(srv.url, [lead()])
    assert c.coverage.blind_now and "more than its LIMIT" in (c.last_error or ""), c.last_error


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 4\r\n\r\n\x0b\x01\x80{",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nnope",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{}",  # then the connection closes
        b'HTTP/1.0 200 OK\r\n\r\n{"results": [], "columns": []}',  # no length, ends at close
        b"garbage\r\n\r\n",
        b"",
    ],
)
def test_broken_http_framing_is_blind_never_a_look_or_a_crash(raw: bytes) -> None:
    def handler(req: Request, conn: socket.socket) -> None:
        conn.sendall(raw)

    w = lead()
    with Hostile(handler) as srv:
        c = poll(srv.url, [w])
    assert c.coverage.blind_now and c.internal_errors == 0 and w.first is None, c.last_error
