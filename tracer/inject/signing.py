"""Webhook signing schemes for the HTTP injector.

A payment probe is only realistic if it is signed the way the provider signs: a funnel that
verifies signatures drops anything else, and the probe would measure nothing. Configured per step
under ``inject.http.sign``::

    sign:
      scheme: hmac            # hmac | timestamped | body_token | bearer
      secret: ${MOYASAR_WEBHOOK_SECRET}
      algorithm: sha256       # hmac only: sha256 | sha1 | sha512
      encoding: hex           # hmac only: hex | base64
      prefix: "sha256="       # hmac only
      header: X-Signature     # hmac, timestamped, bearer
      field: secret_token     # body_token only
      tamper: false           # true: deliberately mis-sign (security canary)

An option that does not apply to the chosen scheme is an error naming it, not a silent no-op.
The secret is a ``SecretStr``: repr, str, dumps and validation errors of this model never show it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from typing import Any, Literal

from pydantic import ConfigDict, ValidationInfo, field_validator

from tracer.schema import Model, Secret

Scheme = Literal["hmac", "timestamped", "body_token", "bearer"]

# Options each scheme takes, with the default used when YAML leaves them out.
_OPTIONS: dict[str, dict[str, str]] = {
    "hmac": {"header": "X-Signature", "algorithm": "sha256", "encoding": "hex", "prefix": ""},
    "timestamped": {"header": "Stripe-Signature"},
    "body_token": {"field": "secret_token"},
    "bearer": {"header": "Authorization"},
}


def _unix_now() -> int:
    """Wall-clock seconds for Stripe-style ``t=``: the receiver compares it to *its* wall clock,
    so this must be real time, not the tracer's monotonic-anchored clock. (Tests patch it.)"""
    return int(time.time())


class Signing(Model):
    """How to sign the exact bytes sent (or, for ``body_token``, the JSON body before it is serialized)."""

    # Hide raw input in errors raised while validating this model on its own: the input holds the secret.
    model_config = ConfigDict(validate_default=True, hide_input_in_errors=True)

    scheme: Scheme
    secret: Secret
    header: str | None = None
    algorithm: Literal["sha256", "sha1", "sha512"] | None = None
    encoding: Literal["hex", "base64"] | None = None
    prefix: str | None = None
    field: str | None = None
    tamper: bool = False

    @field_validator("secret", mode="before")
    @classmethod
    def _secret_text(cls, value: Any) -> Any:
        """YAML reads an unquoted numeric secret as an int; take it as text rather than failing
        with an error that would print the value."""
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("secret")
    @classmethod
    def _secret_not_empty(cls, value: Secret) -> Secret:
        # An empty key still "signs" (HMAC accepts it): catch the unset-env-var case up front.
        if not value.get_secret_value():
            raise ValueError("must not be empty (is its environment variable set?)")
        return value

    @field_validator("header", "algorithm", "encoding", "prefix", "field")
    @classmethod
    def _option_for_scheme(cls, value: str | None, info: ValidationInfo) -> str | None:
        scheme = info.data.get("scheme")
        if scheme is None:  # the scheme itself is invalid and reported on its own
            return value
        options = _OPTIONS[scheme]
        name = info.field_name or ""
        if value is None:
            return options.get(name)
        if name not in options:
            takes = ", ".join(options) or "no options"
            raise ValueError(f"does not apply to scheme '{scheme}' (it takes: {takes}, secret, tamper)")
        if name in ("header", "field") and not value.strip():
            raise ValueError("must not be empty")
        return value

    def prepare(self, body: Any) -> Any:
        """Give the scheme a chance to change the JSON body before it is serialized: ``body_token``
        puts its secret there (Moyasar's ``secret_token``). Other schemes leave it unchanged."""
        if self.scheme != "body_token":
            return body
        if not isinstance(body, dict):
            raise TypeError("sign scheme 'body_token' needs a JSON object body (inject.http.json)")
        return {**body, str(self.field): self._token()}

    def headers(self, raw_body: bytes) -> dict[str, str]:
        """Signature headers for the exact bytes about to be sent."""
        if self.scheme == "body_token":
            return {}
        return {str(self.header): self._header_value(raw_body)}

    def _header_value(self, raw_body: bytes) -> str:
        if self.scheme == "timestamped":
            ts = _unix_now()
            return f"t={ts},v1={self._mac(hashlib.sha256, f'{ts}.'.encode() + raw_body).hex()}"
        if self.scheme == "bearer":
            return f"Bearer {self._token()}"
        mac = self._mac(getattr(hashlib, str(self.algorithm)), raw_body)
        encoded = base64.b64encode(mac).decode() if self.encoding == "base64" else mac.hex()
        return f"{self.prefix}{encoded}"

    def _mac(self, digestmod: Any, message: bytes) -> bytes:
        """HMAC of ``message``; with ``tamper`` every bit is flipped, so the signature keeps its
        format and length (it reaches the funnel's compare, not its parser) but never verifies."""
        digest = hmac.new(self.secret.get_secret_value().encode(), message, digestmod).digest()
        return bytes(b ^ 0xFF for b in digest) if self.tamper else digest

    def _token(self) -> str:
        """The shared secret, or with ``tamper`` a random stand-in that shares nothing with it."""
        return f"tampered-{secrets.token_hex(16)}" if self.tamper else self.secret.get_secret_value()
