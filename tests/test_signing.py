"""The injector's webhook signing, checked against independent stdlib implementations written here.

Every signature is recomputed from the exact bytes ``build_request`` returns (the bytes sent), so a
signer that signed a different serialization than it sends would fail these tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from pydantic import ValidationError

from tracer.inject import signing as signing_module
from tracer.inject.http import HttpInject, build_request
from tracer.inject.signing import Signing
from tracer.probe import Probe
from tracer.spec import SpecError, parse_spec

SECRET = "whsec_s3cr3t-VALUE_42"
BODY = {
    "payment_id": "pay_{probe_id}",
    "email": "canary+{trace_id}@example.com",
    "status": "paid",
    "metadata": {"canary_trace_id": "{trace_id}", "note": "héllo, wörld"},
}


def request_for(sign: dict, body: object = BODY) -> tuple[dict[str, str], bytes, Probe]:
    spec = HttpInject.model_validate({"url": "http://127.0.0.1:9/hook", "json": body, "sign": sign})
    probe = Probe("payment")
    _, _, headers, raw = build_request(
        spec, probe, {"traceparent": "00-" + probe.trace_id + "-0000000000000001-01"}
    )
    return headers, raw, probe


@pytest.mark.parametrize(
    ("options", "header", "digest", "encode", "prefix"),
    [
        ({}, "X-Signature", hashlib.sha256, lambda d: d.hex(), ""),
        (
            {"algorithm": "sha1", "encoding": "base64"},
            "X-Signature",
            hashlib.sha1,
            lambda d: base64.b64encode(d).decode(),
            "",
        ),
        (
            {"algorithm": "sha512", "header": "X-Hub-Signature-512", "prefix": "sha512="},
            "X-Hub-Signature-512",
            hashlib.sha512,
            lambda d: d.hex(),
            "sha512=",
        ),
        (
            {"prefix": "sha256=", "header": "X-Hub-Signature-256"},
            "X-Hub-Signature-256",
            hashlib.sha256,
            lambda d: d.hex(),
            "sha256=",
        ),
    ],
)
def test_hmac_signs_the_exact_bytes_sent(options, header, digest, encode, prefix) -> None:
    headers, raw, probe = request_for({"scheme": "hmac", "secret": SECRET, **options})
    expected = prefix + encode(hmac.new(SECRET.encode(), raw, digest).digest())
    assert headers[header] == expected
    assert probe.trace_id.encode() in raw  # the templates were rendered before signing
    # A different serialization of the same object gets a different signature: the bytes matter.
    reserialized = json.dumps(json.loads(raw)).encode()
    assert reserialized != raw
    assert headers[header] != prefix + encode(hmac.new(SECRET.encode(), reserialized, digest).digest())


def test_timestamped_is_stripe_style_over_ts_dot_body() -> None:
    before = int(time.time())
    headers, raw, _ = request_for({"scheme": "timestamped", "secret": SECRET})
    after = int(time.time())
    fields = dict(part.split("=", 1) for part in headers["Stripe-Signature"].split(","))
    assert set(fields) == {"t", "v1"}
    assert before <= int(fields["t"]) <= after
    expected = hmac.new(SECRET.encode(), fields["t"].encode() + b"." + raw, hashlib.sha256).hexdigest()
    assert fields["v1"] == expected


def test_timestamped_custom_header() -> None:
    headers, _, _ = request_for({"scheme": "timestamped", "secret": SECRET, "header": "Webhook-Signature"})
    assert headers["Webhook-Signature"].startswith("t=")
    assert "Stripe-Signature" not in headers


def test_body_token_puts_the_secret_in_the_serialized_body() -> None:
    headers, raw, probe = request_for({"scheme": "body_token", "secret": SECRET})
    sent = json.loads(raw)
    assert sent["secret_token"] == SECRET
    assert sent["metadata"]["canary_trace_id"] == probe.trace_id
    assert not {"X-Signature", "Authorization", "Stripe-Signature"} & set(headers)


def test_body_token_custom_field_and_template_untouched() -> None:
    body = {"id": "{probe_id}", "data": {"id": "pay_1"}}
    _, raw, probe = request_for({"scheme": "body_token", "secret": "{trace_id}", "field": "token"}, body)
    sent = json.loads(raw)
    assert sent["token"] == "{trace_id}"  # the secret is inserted after rendering, never templated
    assert sent["id"] == probe.probe_id


def test_body_token_needs_a_json_object() -> None:
    with pytest.raises(TypeError, match="JSON object"):
        request_for({"scheme": "body_token", "secret": SECRET}, ["a", "list"])


def test_bearer() -> None:
    headers, _, _ = request_for({"scheme": "bearer", "secret": SECRET})
    assert headers["Authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize("scheme", ["hmac", "timestamped"])
def test_tamper_flips_the_signature_keeping_its_shape(scheme: str) -> None:
    good = Signing(scheme=scheme, secret=SECRET)
    bad = Signing(scheme=scheme, secret=SECRET, tamper=True)
    raw = b'{"payment_id":"pay_1"}'
    if scheme == "hmac":
        good_sig, bad_sig = good.headers(raw)["X-Signature"], bad.headers(raw)["X-Signature"]
    else:
        good_sig = good.headers(raw)["Stripe-Signature"].split("v1=")[1]
        bad_sig = bad.headers(raw)["Stripe-Signature"].split("v1=")[1]
    assert len(bad_sig) == len(good_sig)
    assert bytes.fromhex(bad_sig) == bytes(b ^ 0xFF for b in bytes.fromhex(good_sig))


def test_tamper_tokens_share_nothing_with_the_secret() -> None:
    body = Signing(scheme="body_token", secret=SECRET, tamper=True).prepare({"a": 1})
    bearer = Signing(scheme="bearer", secret=SECRET, tamper=True).headers(b"")["Authorization"]
    assert body["secret_token"] and SECRET not in body["secret_token"]
    assert bearer.startswith("Bearer ") and SECRET not in bearer


def test_timestamp_is_real_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signing_module, "_unix_now", lambda: 1_700_000_000)
    value = Signing(scheme="timestamped", secret=SECRET).headers(b"x")["Stripe-Signature"]
    assert value.startswith("t=1700000000,v1=")


@pytest.mark.parametrize(
    ("sign", "field", "message"),
    [
        ({"scheme": "bearer", "algorithm": "sha1"}, "algorithm", "does not apply to scheme 'bearer'"),
        ({"scheme": "body_token", "header": "X-Sig"}, "header", "does not apply to scheme 'body_token'"),
        ({"scheme": "hmac", "field": "token"}, "field", "does not apply to scheme 'hmac'"),
        ({"scheme": "timestamped", "prefix": "v1="}, "prefix", "does not apply"),
        ({"scheme": "hmac", "algorithm": "md5"}, "algorithm", "'sha256', 'sha1' or 'sha512'"),
        ({"scheme": "hmac", "encoding": "base32"}, "encoding", "'hex' or 'base64'"),
        ({"scheme": "jwt"}, "scheme", "'hmac', 'timestamped', 'body_token' or 'bearer'"),
        ({"scheme": "hmac", "secret": ""}, "secret", "must not be empty"),
        ({"scheme": "hmac", "colour": "red"}, "colour", "Extra inputs"),
    ],
)
def test_invalid_combinations_are_clear_errors_without_the_secret(
    sign: dict, field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        Signing.model_validate({"secret": SECRET, **sign})
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [(field,)]
    assert message in errors[0]["msg"]
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


def test_numeric_secret_from_yaml_is_text() -> None:
    sign = Signing.model_validate({"scheme": "bearer", "secret": 123456})
    assert sign.headers(b"")["Authorization"] == "Bearer 123456"


SPEC = """
service: shop
collectors:
  posthog: {host: "http://127.0.0.1:1", project_id: "1", personal_api_key: phx_x}
steps:
  payment:
    inject:
      http:
        url: http://127.0.0.1:1/api/v1/webhooks/payments
        json: {payment_id: "pay_{probe_id}", metadata: {canary_trace_id: "{trace_id}"}}
        sign: {scheme: SCHEME, secret: "${MOYASAR_WEBHOOK_SECRET}"EXTRA}
    hops:
      - {name: event, target: 5s, posthog: {event: payment_succeeded}}
"""


def load(monkeypatch: pytest.MonkeyPatch, scheme: str, extra: str = ""):
    import yaml

    monkeypatch.setenv("MOYASAR_WEBHOOK_SECRET", SECRET)
    return parse_spec(yaml.safe_load(SPEC.replace("SCHEME", scheme).replace("EXTRA", extra)), "shop.yaml")


@pytest.mark.parametrize("scheme", ["hmac", "timestamped", "body_token", "bearer"])
def test_secret_from_env_is_used_but_never_shown(monkeypatch: pytest.MonkeyPatch, scheme: str) -> None:
    spec = load(monkeypatch, scheme)
    sign = spec.steps["payment"].inject.http.sign
    assert sign.secret.get_secret_value() == SECRET
    for text in (
        repr(spec),
        str(spec),
        repr(sign),
        str(sign),
        spec.model_dump_json(),
        str(spec.model_dump()),
    ):
        assert SECRET not in text


def test_spec_errors_name_the_yaml_path_and_hide_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SpecError) as info:
        load(monkeypatch, "bearer", ", encoding: hex, tamper: maybe")
    problems = dict(info.value.problems)
    assert "does not apply to scheme 'bearer'" in problems["steps.payment.inject.http.sign.encoding"]
    assert "steps.payment.inject.http.sign.tamper" in problems
    assert SECRET not in str(info.value)


def test_spec_unknown_scheme_hides_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SpecError) as info:
        load(monkeypatch, "hmac-sha256")
    assert "steps.payment.inject.http.sign.scheme" in dict(info.value.problems)
    assert SECRET not in str(info.value)
