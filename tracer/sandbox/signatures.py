"""The funnel's side of webhook signatures: verify what a payment provider sent.

Written separately from ``tracer.inject.signing`` on purpose, as a real funnel's code would be:
if the tracer's signer and this verifier shared code, a bug in one would be invisible to the other.

Every check works on the exact bytes received (never a re-serialized body), compares in constant
time, and returns ``None`` when the delivery is authentic or a short reason when it is not. Reasons
never contain the secret or the received signature.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

DEFAULT_HEADERS = {"hmac": "X-Signature", "timestamped": "Stripe-Signature", "bearer": "Authorization"}

MISSING = "missing signature"
MALFORMED = "malformed signature"
MISMATCH = "signature mismatch"
STALE = "timestamp outside tolerance"


def _same(a: str | bytes, b: str | bytes) -> bool:
    """Constant-time equality that also accepts non-ASCII text (``compare_digest`` on str does not)."""
    return hmac.compare_digest(
        a.encode() if isinstance(a, str) else a, b.encode() if isinstance(b, str) else b
    )


def verify_hmac(
    raw_body: bytes,
    received: str | None,
    *,
    secret: str,
    algorithm: str = "sha256",
    encoding: str = "hex",
    prefix: str = "",
) -> str | None:
    """``<prefix><hex|base64 HMAC(secret, raw_body)>``, e.g. GitHub's ``sha256=<hex>``."""
    if not received:
        return MISSING
    if not received.startswith(prefix):
        return MALFORMED
    text = received[len(prefix) :].strip()
    try:
        got = base64.b64decode(text, validate=True) if encoding == "base64" else bytes.fromhex(text)
    except (ValueError, binascii.Error):
        return MALFORMED
    expected = hmac.new(secret.encode(), raw_body, algorithm).digest()
    return None if _same(expected, got) else MISMATCH


def verify_timestamped(
    raw_body: bytes, received: str | None, *, secret: str, tolerance: float, now: float
) -> str | None:
    """Stripe-style ``t=<ts>,v1=<hex HMAC-SHA256(secret, "<ts>.<body>")>``. Any ``v1`` may match
    (providers send several while rotating secrets). The timestamp is checked after the signature,
    so ``STALE`` means an authentic but old delivery: a replay."""
    if not received:
        return MISSING
    pairs = [part.strip().partition("=") for part in received.split(",")]
    stamps = [value for key, _, value in pairs if key == "t"]
    candidates = [value for key, _, value in pairs if key == "v1"]
    if len(stamps) != 1 or not stamps[0].isdigit() or not candidates:
        return MALFORMED
    signed = stamps[0].encode() + b"." + raw_body
    expected = hmac.new(secret.encode(), signed, "sha256").hexdigest()
    if not any(_same(expected, c.lower()) for c in candidates):
        return MISMATCH
    return STALE if abs(now - int(stamps[0])) > tolerance else None


def verify_body_token(body: Any, *, field: str, secret: str) -> str | None:
    """Moyasar: the JSON body carries the shared webhook secret (``secret_token``)."""
    token = body.get(field) if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        return MISSING
    return None if _same(secret, token) else MISMATCH


def verify_bearer(authorization: str | None, *, secret: str) -> str | None:
    """``Authorization: Bearer <secret>`` on the webhook route."""
    if not authorization:
        return MISSING
    kind, _, token = authorization.strip().partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return MALFORMED
    return None if _same(secret, token.strip()) else MISMATCH
