"""Payment webhooks for the reference funnel: verify, then turn a paid/failed payment into a PostHog event.

``POST /api/v1/webhooks/payments`` takes a Moyasar event (``{"type": "payment_paid", "data": {...}}``)
or a simple generic JSON (``{"payment_id", "email", "status", "metadata"}``) and emits
``payment_succeeded`` or ``payment_failed`` with the payment's metadata as properties (that is where
a probe's trace id rides).

Knobs live on ``PaymentSettings`` at ``ctx.extra["payments"]`` and may be changed while the app runs.
With ``fail_rate`` a delivery "fails": like real funnels, it is acknowledged (202) and parked in the
Redis DLQ, whose worker retries it through ``reprocess``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tracer.sandbox import signatures

if TYPE_CHECKING:  # funnel.py imports this module to build its app; avoid the import cycle at run time
    from tracer.sandbox.funnel import FunnelContext

log = logging.getLogger(__name__)

PATH = "/api/v1/webhooks/payments"
FAULT = "payment processing failed (injected fault)"


@dataclass
class PaymentSettings:
    """How the funnel verifies payment webhooks, plus fault knobs. Mutable at run time."""

    scheme: Literal["hmac", "timestamped", "body_token", "bearer"] = "hmac"
    secret: str = field(default="sandbox-webhook-secret", repr=False)
    header: str | None = (
        None  # None: the scheme's usual header (X-Signature, Stripe-Signature, Authorization)
    )
    algorithm: Literal["sha256", "sha1", "sha512"] = "sha256"  # hmac
    encoding: Literal["hex", "base64"] = "hex"  # hmac
    prefix: str = ""  # hmac, e.g. "sha256="
    token_field: str = "secret_token"  # body_token
    tolerance: float = 300.0  # timestamped: seconds either side of now
    accept_unsigned: bool = (
        False  # misconfigured funnel: verification off, unsigned and mis-signed get through
    )
    fail_rate: float = 0.0  # fraction of verified deliveries whose processing fails (parked in the DLQ)
    delay: float = 0.0  # seconds between accepting a payment and emitting its event
    queue: str = "payments"  # DLQ queue name for parked deliveries


def settings(ctx: FunnelContext) -> PaymentSettings:
    """The live settings; created with defaults on first use so tests can mutate one shared object."""
    current = ctx.extra.get("payments")
    if not isinstance(current, PaymentSettings):
        current = ctx.extra["payments"] = PaymentSettings()
    return current


@dataclass(frozen=True)
class Payment:
    payment_id: str
    status: str
    failed: bool
    email: str | None = None
    amount: Any = None
    currency: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def event(self) -> str:
        return "payment_failed" if self.failed else "payment_succeeded"

    @property
    def distinct_id(self) -> str:
        return self.email or self.payment_id

    @property
    def properties(self) -> dict[str, Any]:
        base = {
            "payment_id": self.payment_id,
            "email": self.email,
            "amount": self.amount,
            "currency": self.currency,
            "status": self.status,
        }
        return {**base, **self.metadata}


MOYASAR_TYPES = {"payment_paid": False, "payment_failed": True}  # type -> failed


def read_payment(body: dict[str, Any]) -> Payment | None:
    """The payment a webhook reports; ``None`` for event types this funnel does not act on
    (acknowledged, not an error, so the provider stops retrying). Raises ``ValueError`` if malformed."""
    if isinstance(body.get("data"), dict) and "type" in body:
        if body["type"] not in MOYASAR_TYPES:
            return None
        data = body["data"]
        status = str(data.get("status") or ("failed" if MOYASAR_TYPES[body["type"]] else "paid"))
        failed = MOYASAR_TYPES[body["type"]] or status == "failed"
        metadata = _metadata(data)
        email = data.get("email") or metadata.get("email")
        return Payment(
            payment_id=_id(data.get("id")),
            status=status,
            failed=failed,
            email=_email(email),
            amount=data.get("amount"),
            currency=data.get("currency"),
            metadata=metadata,
        )
    status = str(body.get("status") or "paid")
    return Payment(
        payment_id=_id(body.get("payment_id")),
        status=status,
        failed=status == "failed",
        email=_email(body.get("email")),
        amount=body.get("amount"),
        currency=body.get("currency"),
        metadata=_metadata(body),
    )


def _id(value: Any) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
        raise ValueError("a payment id is required (data.id or payment_id)")
    return str(value)


def _email(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _metadata(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be a JSON object")
    return metadata


def verify(s: PaymentSettings, request: Request, raw_body: bytes, body: Any) -> str | None:
    """``None`` if the delivery is authentic under the configured scheme, else why not."""
    header = request.headers.get(s.header or signatures.DEFAULT_HEADERS.get(s.scheme, ""))
    if s.scheme == "hmac":
        return signatures.verify_hmac(
            raw_body, header, secret=s.secret, algorithm=s.algorithm, encoding=s.encoding, prefix=s.prefix
        )
    if s.scheme == "timestamped":
        return signatures.verify_timestamped(
            raw_body, header, secret=s.secret, tolerance=s.tolerance, now=time.time()
        )
    if s.scheme == "body_token":
        return signatures.verify_body_token(body, field=s.token_field, secret=s.secret)
    if s.scheme == "bearer":
        return signatures.verify_bearer(header, secret=s.secret)
    return f"unknown scheme {s.scheme!r}"


def _decode(raw_body: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw_body)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _faulted(s: PaymentSettings) -> bool:
    return s.fail_rate > 0 and random.random() < s.fail_rate


def payment_routes(ctx: FunnelContext) -> list[Route]:
    async def payment_webhook(request: Request) -> JSONResponse:
        s = settings(ctx)
        raw_body = await request.body()  # the exact bytes: signatures cover these, not a re-serialization
        body = _decode(raw_body)
        if not s.accept_unsigned:
            reason = verify(s, request, raw_body, body)
            if reason is not None:
                log.info("payment webhook rejected: %s", reason)
                return JSONResponse({"detail": reason}, status_code=401)
        if body is None:
            return JSONResponse({"detail": "a JSON object body is required"}, status_code=422)
        try:
            payment = read_payment(body)
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        if payment is None:
            return JSONResponse({"status": "ignored"})
        properties = payment.properties
        if "traceparent" in request.headers:  # like leads: carry the caller's trace into the event
            properties["traceparent"] = request.headers["traceparent"]
        if _faulted(s):
            return await _park(ctx, s, body)
        ctx.emit_later(s.delay, payment.event, payment.distinct_id, properties)
        return JSONResponse({"status": "accepted", "event": payment.event})

    return [Route(PATH, payment_webhook, methods=["POST"])]


async def _park(ctx: FunnelContext, s: PaymentSettings, body: dict[str, Any]) -> JSONResponse:
    """Acknowledge and park a delivery whose processing failed. Without a DLQ the funnel cannot keep
    it, so it answers 503 and lets the provider retry. The body token is dropped: a secret has no
    business sitting in Redis, where collectors and reports read entries."""
    worker = ctx.extra.get("dlq")
    if worker is None:
        return JSONResponse(
            {"detail": "processing failed and no dead-letter queue is configured"}, status_code=503
        )
    payload = {k: v for k, v in body.items() if k != s.token_field}
    try:
        await worker.park(s.queue, payload, FAULT)
    except Exception as exc:  # Redis down: same as having no DLQ
        log.warning("could not park payment webhook: %s", type(exc).__name__)
        return JSONResponse(
            {"detail": "processing failed and the dead-letter queue is unavailable"}, status_code=503
        )
    return JSONResponse({"status": "queued"}, status_code=202)


async def reprocess(ctx: FunnelContext, entry: dict[str, Any]) -> None:
    """DLQ retry handler for parked payment webhooks: bind with ``functools.partial(reprocess, ctx)``.

    The payload was verified when it arrived, so it is not verified again (the token is gone anyway).
    The fault knob applies to retries too, so tests can drive retry-then-succeed (lower ``fail_rate``)
    or exhausted retries (leave it at 1.0). Raising tells the worker the retry failed. The event is
    captured before returning, so "handler returned" means "event sent".
    """
    payload = entry.get("payload", entry)
    if isinstance(payload, (str, bytes)):
        payload = json.loads(payload)
    if not isinstance(payload, dict):
        raise ValueError("a parked payment webhook must be a JSON object")
    payment = read_payment(payload)
    if payment is None:
        return
    s = settings(ctx)
    if _faulted(s):
        raise RuntimeError(FAULT)
    await asyncio.to_thread(
        ctx.posthog.capture, payment.event, distinct_id=payment.distinct_id, properties=payment.properties
    )
