"""Payment webhooks over real sockets: the injector signs, the sandbox funnel verifies (with its own
code), and the official PostHog SDK delivers the event to the sandbox's PostHog."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import httpx
import pytest
import redis

from tracer.inject import signing as signing_module
from tracer.inject.http import HttpInject, build_request, send
from tracer.probe import Probe
from tracer.sandbox.payments import PaymentSettings, reprocess
from tracer.sandbox.runner import Sandbox

SECRET = "whsec_funnel-S3CRET"
PATH = "/api/v1/webhooks/payments"

GENERIC = {
    "payment_id": "pay_{probe_id}",
    "email": "canary+{trace_id}@example.com",
    "status": "paid",
    "amount": 4900,
    "currency": "SAR",
    "metadata": {"canary_trace_id": "{trace_id}", "plan": "pro"},
}
MOYASAR = {
    "id": "evt_{probe_id}",
    "type": "payment_paid",
    "created_at": "{now_iso}",
    "account_name": "shop",
    "live": False,
    "data": {
        "id": "pay_{probe_id}",
        "status": "paid",
        "amount": 4900,
        "currency": "SAR",
        "description": "Pro plan",
        "metadata": {"canary_trace_id": "{trace_id}", "email": "canary+{trace_id}@example.com"},
    },
}

# (funnel settings, injector sign section, body) per scheme and variant
SCHEMES = {
    "hmac": (dict(scheme="hmac"), {"scheme": "hmac"}, GENERIC),
    "hmac-sha1-base64": (
        dict(scheme="hmac", algorithm="sha1", encoding="base64"),
        {"scheme": "hmac", "algorithm": "sha1", "encoding": "base64"},
        GENERIC,
    ),
    "hmac-sha512-prefix": (
        dict(scheme="hmac", algorithm="sha512", prefix="sha512=", header="X-Hub-Signature-512"),
        {"scheme": "hmac", "algorithm": "sha512", "prefix": "sha512=", "header": "X-Hub-Signature-512"},
        GENERIC,
    ),
    "timestamped": (dict(scheme="timestamped"), {"scheme": "timestamped"}, GENERIC),
    "body_token": (dict(scheme="body_token"), {"scheme": "body_token"}, MOYASAR),
    "bearer": (dict(scheme="bearer"), {"scheme": "bearer"}, GENERIC),
}


class RecordingDlq:
    """Stands in for ``sandbox.dlq.DlqWorker`` at the ``park`` boundary: keeps what was parked."""

    def __init__(self) -> None:
        self.parked: list[dict[str, Any]] = []

    async def park(self, queue: str, payload: dict[str, Any], error: str) -> dict[str, Any]:
        entry = {
            "id": str(len(self.parked)),
            "queue": queue,
            "payload": payload,
            "error": error,
            "attempt": 1,
        }
        self.parked.append(entry)
        return entry


def configure(sb: Sandbox, **settings: Any) -> PaymentSettings:
    sb.ctx.extra["payments"] = s = PaymentSettings(secret=SECRET, **settings)
    return s


def inject_spec(sb: Sandbox, sign: dict[str, Any] | None, body: Any = GENERIC) -> HttpInject:
    return HttpInject.model_validate({"url": sb.url + PATH, "json": body, "timeout": 5, "sign": sign})


def post(spec: HttpInject, probe: Probe) -> httpx.Response:
    """Exactly the request the injector sends (``build_request``), keeping the response to inspect."""
    method, url, headers, body = build_request(spec, probe, {})
    return httpx.request(method, url, headers=headers, content=body, timeout=5)


def events_for(sb: Sandbox, trace_id: str) -> list[dict[str, Any]]:
    return [e for e in sb.posthog.events() if (e.get("properties") or {}).get("canary_trace_id") == trace_id]


def wait_event(sb: Sandbox, trace_id: str, timeout: float = 5.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = events_for(sb, trace_id)
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no PostHog event for trace {trace_id} within {timeout}s")


def assert_never_arrives(sb: Sandbox, probe: Probe) -> None:
    """Absence is only evidence once a later, valid delivery has arrived: send one and wait for it."""
    control = Probe("control")
    s = sb.ctx.extra["payments"]
    saved = s.accept_unsigned, s.fail_rate
    s.accept_unsigned, s.fail_rate = True, 0.0
    try:
        assert post(inject_spec(sb, None), control).status_code == 200
        wait_event(sb, control.trace_id)
    finally:
        s.accept_unsigned, s.fail_rate = saved
    assert events_for(sb, probe.trace_id) == []


@pytest.mark.parametrize("variant", list(SCHEMES))
def test_right_secret_is_accepted_and_reaches_posthog(sb: Sandbox, variant: str) -> None:
    funnel, sign, body = SCHEMES[variant]
    configure(sb, **funnel)
    probe = Probe("payment")
    parent = f"00-{probe.trace_id}-00f067aa0ba902b7-01"

    async def go():
        async with httpx.AsyncClient() as client:
            return await send(
                client, inject_spec(sb, {**sign, "secret": SECRET}, body), probe, {"traceparent": parent}
            )

    injection = asyncio.run(go())
    assert injection.ok and injection.status == 200, injection.error
    event = wait_event(sb, probe.trace_id)
    assert event["event"] == "payment_succeeded"
    assert event["distinct_id"] == f"canary+{probe.trace_id}@example.com"
    props = event["properties"]
    assert props["payment_id"] == f"pay_{probe.probe_id}"
    assert (props["amount"], props["currency"], props["status"]) == (4900, "SAR", "paid")
    assert props["traceparent"] == parent  # the funnel carries the caller's trace into the event
    assert SECRET not in str(event)  # Moyasar's secret_token is not copied into analytics


def test_moyasar_failed_payment_emits_payment_failed(sb: Sandbox) -> None:
    configure(sb, scheme="body_token")
    body = {**MOYASAR, "type": "payment_failed", "data": {**MOYASAR["data"], "status": "failed"}}
    probe = Probe("payment")
    assert post(inject_spec(sb, {"scheme": "body_token", "secret": SECRET}, body), probe).status_code == 200
    event = wait_event(sb, probe.trace_id)
    assert event["event"] == "payment_failed"
    assert event["properties"]["status"] == "failed"


def test_generic_failed_status_emits_payment_failed(sb: Sandbox) -> None:
    configure(sb)
    probe = Probe("payment")
    spec = inject_spec(sb, {"scheme": "hmac", "secret": SECRET}, {**GENERIC, "status": "failed"})
    assert post(spec, probe).status_code == 200
    assert wait_event(sb, probe.trace_id)["event"] == "payment_failed"


@pytest.mark.parametrize("variant", list(SCHEMES))
@pytest.mark.parametrize("how", ["wrong_secret", "tamper", "missing"])
def test_bad_or_missing_signature_is_401_and_nothing_emitted(sb: Sandbox, variant: str, how: str) -> None:
    funnel, sign, body = SCHEMES[variant]
    configure(sb, **funnel)
    if how == "wrong_secret":
        sign = {**sign, "secret": "whsec_someone-else"}
    elif how == "tamper":
        sign = {**sign, "secret": SECRET, "tamper": True}
    else:
        sign = None
    probe = Probe("payment")
    resp = post(inject_spec(sb, sign, body), probe)
    assert resp.status_code == 401
    expected = "missing signature" if how == "missing" else "signature mismatch"
    assert resp.json()["detail"] == expected
    assert SECRET not in resp.text
    assert_never_arrives(sb, probe)


def test_accept_unsigned_lets_unsigned_and_mis_signed_through(sb: Sandbox) -> None:
    """The misconfigured funnel the negative probe exists to catch."""
    configure(sb, accept_unsigned=True)
    unsigned, forged = Probe("payment"), Probe("payment")
    assert post(inject_spec(sb, None), unsigned).status_code == 200
    assert (
        post(inject_spec(sb, {"scheme": "hmac", "secret": SECRET, "tamper": True}), forged).status_code == 200
    )
    assert wait_event(sb, unsigned.trace_id)["event"] == "payment_succeeded"
    assert wait_event(sb, forged.trace_id)["event"] == "payment_succeeded"


@pytest.mark.parametrize(("skew", "status"), [(-305, 401), (305, 401), (-250, 200), (250, 200)])
def test_timestamp_tolerance(sb: Sandbox, monkeypatch: pytest.MonkeyPatch, skew: int, status: int) -> None:
    configure(sb, scheme="timestamped")
    monkeypatch.setattr(signing_module, "_unix_now", lambda: int(time.time()) + skew)
    probe = Probe("payment")
    resp = post(inject_spec(sb, {"scheme": "timestamped", "secret": SECRET}), probe)
    assert resp.status_code == status
    if status == 401:
        assert resp.json()["detail"] == "timestamp outside tolerance"  # signed right, but a replay
        assert_never_arrives(sb, probe)
    else:
        wait_event(sb, probe.trace_id)


def test_signature_covers_the_exact_bytes(sb: Sandbox) -> None:
    """Same JSON, different bytes (whitespace) under the original signature: rejected."""
    configure(sb)
    probe = Probe("payment")
    method, url, headers, body = build_request(
        inject_spec(sb, {"scheme": "hmac", "secret": SECRET}), probe, {}
    )
    resp = httpx.request(method, url, headers=headers, content=body.replace(b",", b", "), timeout=5)
    assert resp.status_code == 401
    assert_never_arrives(sb, probe)


def test_malformed_and_ignored_webhooks(sb: Sandbox) -> None:
    configure(sb)
    no_id = inject_spec(sb, {"scheme": "hmac", "secret": SECRET}, {"email": "x@example.com"})
    assert post(no_id, Probe("payment")).status_code == 422
    refund = {**MOYASAR, "type": "payment_refunded"}
    probe = Probe("payment")
    resp = post(inject_spec(sb, {"scheme": "hmac", "secret": SECRET}, refund), probe)
    assert (resp.status_code, resp.json()["status"]) == (200, "ignored")
    assert_never_arrives(sb, probe)


def test_fault_without_dlq_is_503_and_nothing_emitted(sb: Sandbox) -> None:
    configure(sb, fail_rate=1.0)
    probe = Probe("payment")
    assert post(inject_spec(sb, {"scheme": "hmac", "secret": SECRET}), probe).status_code == 503
    assert_never_arrives(sb, probe)


def test_fault_parks_without_secret_and_reprocess_emits(sb: Sandbox) -> None:
    settings = configure(sb, scheme="body_token", fail_rate=1.0)
    dlq = sb.ctx.extra["dlq"] = RecordingDlq()
    probe = Probe("payment")
    resp = post(inject_spec(sb, {"scheme": "body_token", "secret": SECRET}, MOYASAR), probe)
    assert (resp.status_code, resp.json()["status"]) == (202, "queued")
    [entry] = dlq.parked
    assert entry["queue"] == "payments" and "secret_token" not in entry["payload"]
    assert SECRET not in str(entry)
    assert events_for(sb, probe.trace_id) == []

    with pytest.raises(RuntimeError, match="injected fault"):  # the fault persists: the retry fails
        asyncio.run(reprocess(sb.ctx, entry))
    settings.fail_rate = 0.0
    asyncio.run(reprocess(sb.ctx, entry))  # fault cleared: the retry emits
    event = wait_event(sb, probe.trace_id, timeout=0.5)  # reprocess returns only once the event was sent
    assert event["event"] == "payment_succeeded"
    assert event["properties"]["payment_id"] == f"pay_{probe.probe_id}"


async def drive_worker(
    worker_kw: dict[str, Any], sb: Sandbox, redis_url: str, until, timeout: float = 8.0
) -> Any:
    """Run a real ``DlqWorker`` (handler: ``reprocess``) in this thread's loop until ``until()`` is truthy.

    The funnel parks through its own ``DlqWorker`` on the same key, created here but first used in the
    sandbox's loop (a redis.asyncio client belongs to the loop that uses it)."""
    from tracer.sandbox.dlq import DlqWorker

    async with DlqWorker(redis_url, handler=functools.partial(reprocess, sb.ctx), **worker_kw) as worker:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            result = await until(worker)
            if result:
                return result
            await asyncio.sleep(0.02)
    raise AssertionError("the DLQ worker did not get there in time")


def test_parked_in_redis_then_retried_by_the_real_worker(sb: Sandbox, redis_url: str) -> None:
    from tracer.sandbox.dlq import DlqWorker

    settings = configure(sb, scheme="body_token", fail_rate=1.0)
    sb.ctx.extra["dlq"] = DlqWorker(redis_url)
    probe = Probe("payment")
    resp = post(inject_spec(sb, {"scheme": "body_token", "secret": SECRET}, MOYASAR), probe)
    assert resp.status_code == 202
    raw = redis.Redis.from_url(redis_url).lrange("dlq:webhooks", 0, -1)
    assert len(raw) == 1 and SECRET.encode() not in raw[0] and probe.trace_id.encode() in raw[0]
    settings.fail_rate = 0.0  # the fault clears: the first retry succeeds

    async def retried(worker):
        return [r for r in worker.history if r.ok]

    [record] = asyncio.run(drive_worker({"retry_interval": 0.05}, sb, redis_url, retried))
    assert record.attempt == 1
    assert wait_event(sb, probe.trace_id, timeout=0.5)["event"] == "payment_succeeded"
    assert redis.Redis.from_url(redis_url).llen("dlq:webhooks") == 0


def test_persistent_fault_ends_dead_lettered_and_never_emitted(sb: Sandbox, redis_url: str) -> None:
    from tracer.sandbox.dlq import DlqWorker

    configure(sb, fail_rate=1.0)
    sb.ctx.extra["dlq"] = DlqWorker(redis_url, max_attempts=2)
    probe = Probe("payment")
    assert post(inject_spec(sb, {"scheme": "hmac", "secret": SECRET}), probe).status_code == 202

    async def dead(worker):
        return await worker.dead()

    [entry] = asyncio.run(drive_worker({"retry_interval": 0.05, "max_attempts": 2}, sb, redis_url, dead))
    assert (
        "injected fault" in entry["error"]
        and entry["payload"]["metadata"]["canary_trace_id"] == probe.trace_id
    )
    assert_never_arrives(sb, probe)
