"""The k-of-n alert rule, posting to a real HTTP receiver (Slack-compatible and generic JSON)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.canary_helpers import AlertSink
from tracer import clock
from tracer.alerts import AlertManager, slack_message
from tracer.probe import new_trace_id
from tracer.spec import AlertsSpec
from tracer.verdict import HopResult

pytestmark = pytest.mark.timeout(30)


def hop(verdict: str, lag: float | None = None, hop_name: str = "posthog_event") -> HopResult:
    return HopResult(
        step="lead",
        hop=hop_name,
        sink="posthog",
        target=5.0,
        deadline=20.0,
        verdict=verdict,
        start=0.0,
        end=0.0,
        lag=lag,
        reason="the collector could not look" if verdict == "unknown" else None,
    )


def feed(
    manager: AlertManager, verdicts: list[str], t0: float = 0.0, hop_name: str = "posthog_event"
) -> list[str]:
    ids = []
    for i, v in enumerate(verdicts):
        tid = new_trace_id()
        ids.append(tid)
        manager.observe_hop(hop(v, 1.2 if v == "ok" else 9.0 if v == "late" else None, hop_name), tid, t0 + i)
    return ids


def run(spec: AlertsSpec, scenario) -> AlertManager:  # noqa: ANN001
    async def main() -> AlertManager:
        m = AlertManager(spec, "sandbox-funnel", location="eu-1", instance="eu-1")
        await m.start()
        scenario(m)
        await m.close()
        return m

    return asyncio.run(main())


def test_k_of_n_once_per_incident_then_recovery_slack(caplog: pytest.LogCaptureFixture) -> None:
    with AlertSink() as sink:
        spec = AlertsSpec(
            webhook_url=sink.url,
            format="slack",
            k=3,
            n=5,
            trace_url="{jaeger_url}/trace/{trace_id}",
            jaeger_url="http://jaeger:16686/",
        )
        ids: list[str] = []

        def scenario(m: AlertManager) -> None:
            ids.extend(feed(m, ["ok", "lost", "ok", "late"]))  # 2 of 5: nothing yet
            assert not m.open
            ids.extend(feed(m, ["lost", "lost", "lost", "late"], t0=4))  # 3 of 5 at the first: ONE incident
            ids.extend(feed(m, ["ok", "ok"], t0=8))  # still 3 of the last 5 failing
            ids.extend(feed(m, ["ok"], t0=10))  # 2 of 5: recovered
            # A lost verdict of an OLD probe (injected before the three oks) resolves late: it is
            # not one of the last 5 by injection time, so it does not reopen the incident.
            feed(m, ["lost"], t0=3.5)

        with caplog.at_level(logging.DEBUG, logger="tracer"):
            run(spec, scenario)

    texts = [p["text"] for p in sink.posts]
    assert len(texts) == 2, texts
    incident, recovery = texts
    assert incident.startswith(":red_circle: *Funnel freshness breach*")
    assert "*lead* → *posthog_event* (posthog) on `sandbox-funnel` from eu-1" in incident
    assert "3 of the last 5 probes late or lost (target 5s, deadline 20s)" in incident
    assert "lags: 1.20s, lost, 1.20s, 9.00s, lost" in incident
    assert f"<http://jaeger:16686/trace/{ids[4]}|trace {ids[4]}>" in incident  # the latest failing probe
    assert recovery.startswith(":large_green_circle: *Freshness recovered*")
    assert "now 2 of the last 5" in recovery
    assert "s3cr3t-token" not in caplog.text  # a Slack webhook URL is a credential


def test_unknown_is_canary_blind_not_a_breach_json_format() -> None:
    with AlertSink() as sink:
        spec = AlertsSpec(webhook_url=sink.url, format="json", k=3, n=5, blind_k=2, blind_n=3)
        run(spec, lambda m: feed(m, ["ok", "unknown", "unknown", "ok", "ok", "ok"]))
    assert [(p["type"], p["kind"]) for p in sink.posts] == [("incident", "blind"), ("recovery", "blind")]
    incident = sink.posts[0]
    assert incident["rule"] == {"k": 2, "n": 3, "matching": 2}
    assert incident["verdicts"] == ["ok", "unknown", "unknown"] and incident["lags_s"] == [1.2, None, None]
    assert incident["reason"] == "the collector could not look" and incident["trace_url"] is None
    assert {"step", "hop", "sink", "target_s", "deadline_s", "trace_id", "opened_at", "location"} <= set(
        incident
    )
    assert sink.posts[1]["duration_s"] >= 0 and "resolved_at" in sink.posts[1]


def test_hops_have_independent_windows() -> None:
    with AlertSink() as sink:
        spec = AlertsSpec(webhook_url=sink.url, format="json", k=2, n=2)

        def scenario(m: AlertManager) -> None:
            feed(m, ["lost"], 0, "a")
            feed(m, ["lost"], 1, "b")
            feed(m, ["ok"], 2, "a")
            feed(m, ["lost"], 3, "b")

        run(spec, scenario)
    assert [(p["hop"], p["type"]) for p in sink.posts] == [("b", "incident")]


def test_failing_alert_webhook_is_retried_counted_and_never_logs_its_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with AlertSink(status=503) as sink:
        spec = AlertsSpec(webhook_url=sink.url, format="slack", k=1, n=1, retries=2)
        sent: list[tuple[str, str, bool]] = []

        async def main() -> AlertManager:
            m = AlertManager(spec, "svc", on_sent=lambda *a: sent.append(a))
            await m.start()
            m.observe_hop(hop("lost"), new_trace_id(), clock.now())
            await m.close(timeout=10)
            return m

        with caplog.at_level(logging.DEBUG, logger="tracer"):
            m = asyncio.run(main())
    assert sink.attempts == 3 and m.failures == 1 and sent == [("breach", "incident", False)]
    assert "alert webhook failed (HTTP 503)" in caplog.text
    assert "s3cr3t-token" not in caplog.text and "127.0.0.1" not in caplog.text


def test_slack_message_names_every_part() -> None:
    body = {
        "type": "incident",
        "kind": "breach",
        "service": "svc",
        "step": "lead",
        "hop": "h",
        "sink": "posthog",
        "target_s": 5.0,
        "deadline_s": 20.0,
        "rule": {"k": 3, "n": 5, "matching": 3},
        "verdicts": ["lost"] * 3,
        "lags_s": [None] * 3,
        "trace_id": "ab" * 16,
        "trace_url": None,
        "location": None,
    }
    text = slack_message(body)["text"]
    assert "lags: lost, lost, lost" in text and f"trace `{'ab' * 16}`" in text


def test_canary_logging_silences_url_logging_libraries_even_at_debug() -> None:
    """httpx logs every request URL at INFO, and an alert webhook URL is a credential."""
    from tracer.canary import setup_logging

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        setup_logging("json", verbose=2)
        assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
        assert logging.getLogger("httpcore").getEffectiveLevel() >= logging.WARNING
        assert logging.getLogger("tracer.canary").getEffectiveLevel() <= logging.INFO
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
