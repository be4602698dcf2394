"""The launch gate over real sockets: claims, early stop, late_grace, response hops and gauges."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.test_check import cli_check, load, run_engine, spec_text
from tracer.export.report import summarize
from tracer.sandbox.runner import Sandbox
from tracer.spec import FunnelSpec


def claims(spec: FunnelSpec, results: list) -> dict[tuple[str, str], dict]:
    report = summarize(spec, results)
    return {(s["step"], h["hop"]): h for s in report["steps"] for h in s["hops"]}


def test_a_clearly_late_funnel_fails_within_ten_probes(sb: Sandbox) -> None:
    sb.knobs.lead_delay = 7.0  # above the 5 s target, inside the 20 s deadline
    spec = load(spec_text(sb, target="5s", deadline="20s"))
    results, _ = run_engine(spec, samples=None)  # type: ignore[arg-type]
    assert len(results) <= 10
    hop = claims(spec, results)[("lead", "posthog_event")]
    assert hop["claim"]["outcome"] == "fail" and hop["claim"]["planned"] is None
    assert hop["claim"]["exceeded"] == len(results) and hop["verdicts"]["late"] == len(results)
    assert "disproven" in hop["claim"]["statement"]


def test_five_samples_are_inconclusive_and_exit_3(sb: Sandbox) -> None:
    proc = cli_check(spec_text(sb), "--samples", "5", "--format", "json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    hop = json.loads(proc.stdout)["steps"][0]["hops"][0]
    assert hop["verdicts"]["ok"] == 5
    claim = hop["claim"]
    assert claim["outcome"] == "inconclusive" and claim["needed"] == 59 and claim["n"] == 5
    assert abs(claim["exceed_upper"] - (1 - 0.05 ** (1 / 5))) < 1e-5
    assert "not shown at 95 % confidence: 5/5 within target, 59 needed" in claim["statement"]


def test_default_samples_come_from_the_objective_and_pass(sb: Sandbox) -> None:
    proc = cli_check(spec_text(sb).replace("spacing: 100ms", "spacing: 50ms"), "--format", "json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    hop = json.loads(proc.stdout)["steps"][0]["hops"][0]
    assert hop["samples"] == 59 and hop["claim"]["outcome"] == "pass"
    assert hop["claim"]["statement"].startswith("p95 ≤ 5.00s with 95 % confidence: 59/59 within target")
    # --quantile / --confidence override the objective (p50 at 95 %: 5 probes).
    proc = cli_check(spec_text(sb), "--quantile", "0.5", "--format", "json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert json.loads(proc.stdout)["steps"][0]["hops"][0]["samples"] == 5


def test_late_grace_turns_lost_into_late_with_its_lag(sb: Sandbox) -> None:
    # Well past the 1 s deadline: a sighting whose poll window straddles the deadline is honestly
    # "late" (it may have arrived in time), so leave no straddle for a slow poll cycle.
    sb.knobs.lead_delay = 2.5
    text = spec_text(sb, target="500ms", deadline="1s")
    graced = load(text.replace("deadline: 1s", "deadline: 1s\n        late_grace: 3s"))
    results, _ = run_engine(graced, samples=2)
    for r in results:
        (h,) = r.hops
        assert h.verdict == "late", h
        assert h.lag is not None and 1.5 <= h.lag < 4.0
        assert "late_grace" in (h.reason or "")
    results, _ = run_engine(load(text), samples=2)
    assert [r.hops[0].verdict for r in results] == ["lost", "lost"]


RESPONSE_SPEC = """
service: api
steps:
  health:
    rate: 100
    concurrency: 2
    inject:
      http: {{method: GET, url: "{url}/api/v1/health", timeout: 5s}}
    hops:
      - {{name: p95, target: 200ms, deadline: 5s, response: {{}}}}
      - name: no_5xx
        target: 5s
        objective: {{max_loss: 0.05}}
        response: {{status: [1xx, 2xx, 3xx, 4xx]}}
  pricing:
    rate: 100
    concurrency: 4
    inject:
      http: {{method: GET, url: "{url}/api/v1/pricing", timeout: 5s}}
    hops:
      - {{name: p95, target: 300ms, deadline: 5s, response: {{}}}}
"""


def test_response_hops_find_an_endpoint_category_delay_and_5xx(sb: Sandbox) -> None:
    sb.knobs.api_delay["pricing"] = 0.4  # over pricing's 300 ms p95 target
    spec = load(RESPONSE_SPEC.format(url=sb.url))  # no collectors section: response is implicit
    results, _ = run_engine(spec, samples=None)  # type: ignore[arg-type]
    hops = claims(spec, results)
    assert hops[("health", "p95")]["claim"]["outcome"] == "pass"
    assert hops[("health", "p95")]["samples"] == 59
    pricing = hops[("pricing", "p95")]
    assert pricing["claim"]["outcome"] == "fail"
    assert pricing["samples"] <= 10  # early stop
    assert pricing["lag_s"]["p50"] >= 0.4
    sb.knobs.api_delay.clear()
    sb.knobs.error_rate["health"] = 1.0
    results, _ = run_engine(spec.model_copy(update={"steps": {"health": spec.steps["health"]}}), samples=3)
    no_5xx = results[0].hops[1]
    assert no_5xx.verdict == "lost" and no_5xx.reason == "lost: HTTP 503 (5xx)"
    assert results[0].hops[0].verdict == "ok"  # a fast 503 is still a fast answer


GAUGE_SPEC = """
service: gauges
gauges:
  dlq_depth:
    redis: {{url: "{redis}", key: dlq:webhooks}}
    ok_below: 10
    alert_above: 50
    readings: 1
  dlq_admin:
    http_json: {{url: "{url}/api/v1/admin/dlq", path: queues.webhooks.depth}}
    ok_below: 10
    readings: 1
steps:
  health:
    inject:
      http: {{method: GET, url: "{url}/api/v1/health"}}
    hops:
      - {{name: up, target: 1s, response: {{}}}}
"""


def test_a_gauge_trips_at_its_threshold(redis_url: str) -> None:
    async def read(spec: FunnelSpec) -> dict:
        from tracer.engine import Engine

        async with Engine(spec) as engine:
            return await engine.read_gauges()

    with Sandbox(redis_url=redis_url, dlq_retry_interval=1.0) as sb:
        spec = load(GAUGE_SPEC.format(redis=redis_url, url=sb.url))
        httpx.post(f"{sb.url}/api/v1/admin/dlq/fill", json={"n": 9}).raise_for_status()
        rows = {g["gauge"]: g for g in summarize(spec, [], gauges=asyncio.run(read(spec)))["gauges"]}
        assert rows["dlq_depth"]["max"] == 9 and rows["dlq_depth"]["outcome"] == "pass"
        assert rows["dlq_admin"]["max"] == 9 and rows["dlq_admin"]["state"] == "ok"
        httpx.post(f"{sb.url}/api/v1/admin/dlq/fill", json={"n": 1}).raise_for_status()
        rows = {g["gauge"]: g for g in summarize(spec, [], gauges=asyncio.run(read(spec)))["gauges"]}
        assert rows["dlq_depth"]["max"] == 10 and rows["dlq_depth"]["outcome"] == "fail"
        assert rows["dlq_depth"]["state"] == "warn"  # at the target, under the alert threshold
        httpx.post(f"{sb.url}/api/v1/admin/dlq/fill", json={"n": 41}).raise_for_status()
        rows = {g["gauge"]: g for g in summarize(spec, [], gauges=asyncio.run(read(spec)))["gauges"]}
        assert rows["dlq_depth"]["state"] == "alert" and rows["dlq_admin"]["max"] == 51


def test_an_unreadable_gauge_is_inconclusive_and_names_no_secret(sb: Sandbox) -> None:
    text = GAUGE_SPEC.format(redis="redis://:hunter2@127.0.0.1:1/0", url=sb.url)
    proc = cli_check(text, "--samples", "1", "--quantile", "0.5", "--confidence", "0.5", "--format", "json")
    assert "hunter2" not in proc.stdout + proc.stderr
    rows = {g["gauge"]: g for g in json.loads(proc.stdout)["gauges"]}
    assert rows["dlq_depth"]["outcome"] == "inconclusive" and rows["dlq_depth"]["errors"]
    assert rows["dlq_admin"]["outcome"] == "inconclusive"  # the sandbox has no DLQ: HTTP 404
    assert proc.returncode == 3, proc.stdout + proc.stderr
