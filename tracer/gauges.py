"""Gauges: levels, not lags. A DLQ's depth, a number from an admin endpoint, a HogQL count.

Why a separate kind: the SLO's "DLQ depth < 10, alert above 50" and "webhook failures < 2 %"
rows are about how much is piled up, not how long a probe took, so there is nothing to inject.
A gauge is read a few times and its largest reading compared with ``ok_below`` and
``alert_above``. A reading that failed is ``unknown``, never ok (the honest-measurement rule).

Three readers, chosen by one section, kept in this one module (a registry for three small
functions would be more code than the readers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from pydantic import Field, field_validator, model_validator

from tracer import net
from tracer.net import check_redis_url, redact_url, short_redis_error
from tracer.payload import value_at
from tracer.schema import Duration, HttpUrl, Model, Secret

OK, WARN, ALERT, UNKNOWN = "ok", "warn", "alert", "unknown"


class RedisGauge(Model):
    url: Secret = Field(description="redis:// URL; may carry a password (never logged)")
    key: str = Field(min_length=1)
    type: Literal["auto", "list", "zset", "stream"] = Field(
        "auto", description="LLEN, ZCARD or XLEN; auto asks Redis the key's TYPE"
    )

    _url = field_validator("url")(check_redis_url)


class HttpJsonGauge(Model):
    url: HttpUrl
    path: str = Field(
        min_length=1, description="where the number is in the JSON answer, e.g. queues.payments.depth"
    )
    headers: dict[str, Secret] = Field(default_factory=dict, description="e.g. Authorization (never logged)")
    timeout: Duration = Field(5.0, gt=0)


class HogQLGauge(Model):
    host: HttpUrl
    project_id: str = Field(min_length=1)
    personal_api_key: Secret
    query: str = Field(
        min_length=1, description="HogQL returning one number, e.g. SELECT count() FROM events WHERE ..."
    )
    timeout: Duration = Field(10.0, gt=0)


class GaugeSpec(Model):
    """One level and its thresholds: ``ok`` below ``ok_below``, ``alert`` above ``alert_above``,
    ``warn`` between (the launch gate fails on anything but ok)."""

    redis: RedisGauge | None = None
    http_json: HttpJsonGauge | None = None
    hogql: HogQLGauge | None = None
    ok_below: float = Field(description="SLO target: the level must stay under this")
    alert_above: float | None = Field(None, description="alert threshold (default: ok_below)")
    readings: int = Field(3, gt=0, le=100, description="check: read this many times, judge the largest")
    spacing: Duration = Field(1.0, ge=0, description="check: pause between readings")
    interval: Duration = Field(60.0, gt=0, description="canary: one reading every interval")

    @model_validator(mode="after")
    def _one(self) -> GaugeSpec:
        if sum(x is not None for x in (self.redis, self.http_json, self.hogql)) != 1:
            raise ValueError("a gauge needs exactly one of: redis, http_json, hogql")
        if self.alert_above is not None and self.alert_above < self.ok_below:
            raise ValueError("alert_above must be at least ok_below")
        return self

    @property
    def kind(self) -> str:
        return "redis" if self.redis else "http_json" if self.http_json else "hogql"

    def state(self, value: float | None) -> str:
        if value is None or math.isnan(value):
            return UNKNOWN
        if value < self.ok_below:
            return OK
        return (
            ALERT if value > (self.alert_above if self.alert_above is not None else self.ok_below) else WARN
        )


@dataclass
class Reading:
    value: float | None
    at: float  # epoch seconds
    error: str | None = None  # short and secret-free

    @property
    def ok(self) -> bool:
        return self.value is not None


class GaugeError(Exception):
    """A reading could not be made; the message names no secret."""


async def read(spec: GaugeSpec, http: httpx.AsyncClient) -> float:
    if spec.redis is not None:
        return await _read_redis(spec.redis)
    if spec.http_json is not None:
        return await _read_http_json(spec.http_json, http)
    assert spec.hogql is not None
    return await _read_hogql(spec.hogql, http)


async def _read_redis(cfg: RedisGauge) -> float:
    import redis.asyncio as aredis

    url = cfg.url.get_secret_value()
    client = aredis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        kind = cfg.type
        if kind == "auto":
            raw = await client.type(cfg.key)
            kind = {b"list": "list", b"zset": "zset", b"stream": "stream", b"none": "none"}.get(raw, "?")
            if kind == "none":
                return 0.0  # a missing key is an empty queue in Redis
            if kind == "?":
                raise GaugeError(
                    f"key {cfg.key} is a {raw.decode(errors='replace')}, not a list, zset or stream"
                )
        cmd = {"list": client.llen, "zset": client.zcard, "stream": client.xlen}[kind]
        return float(await cmd(cfg.key))
    except GaugeError:
        raise
    except Exception as exc:  # redis errors may quote the URL: keep only a short, scrubbed text
        raise GaugeError(f"redis {redact_url(url)}: {short_redis_error(exc, url)}") from None
    finally:
        await client.aclose()


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GaugeError(f"{where} is not a number: {str(value)[:60]!r}")
    return float(value)


async def _get_json(http: httpx.AsyncClient, method: str, url: str, timeout: float, **kw: Any) -> Any:
    try:
        resp = await net.request(http, method, url, timeout=timeout, **kw)
    except httpx.TimeoutException:
        raise GaugeError(f"timeout after {timeout:g}s from {redact_url(url)}") from None
    except httpx.HTTPError as exc:
        raise GaugeError(f"{type(exc).__name__} from {redact_url(url)}") from None
    if resp.status_code != 200:
        raise GaugeError(f"HTTP {resp.status_code} from {redact_url(url)}")
    try:
        return resp.json()
    except ValueError:
        raise GaugeError(f"not JSON from {redact_url(url)}") from None


async def _read_http_json(cfg: HttpJsonGauge, http: httpx.AsyncClient) -> float:
    headers = {k: v.get_secret_value() for k, v in cfg.headers.items()}
    data = await _get_json(http, "GET", cfg.url, cfg.timeout, headers=headers)
    return _number(value_at(data, cfg.path), cfg.path)


async def _read_hogql(cfg: HogQLGauge, http: httpx.AsyncClient) -> float:
    url = f"{cfg.host.rstrip('/')}/api/projects/{cfg.project_id}/query/"
    headers = {"Authorization": f"Bearer {cfg.personal_api_key.get_secret_value()}"}
    body = {"query": {"kind": "HogQLQuery", "query": cfg.query}, "refresh": "force_blocking"}
    data = await _get_json(http, "POST", url, cfg.timeout, headers=headers, json=body)
    if isinstance(data, dict) and data.get("error"):
        raise GaugeError(f"query error: {str(data['error'])[:200]}")
    return _number(value_at(data, "results[0][0]"), "results[0][0]")
