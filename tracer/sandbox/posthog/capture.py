"""The capture side of the sandbox PostHog: the endpoints the SDKs post to, and realtime destinations.

PostHog's rules that shape a funnel's failures are kept: a well-formed project key that names no
project is answered 200 and its events are silently dropped (only a missing or malformed key is a
401); ``created_at`` is stamped at capture while the row becomes queryable ``ingest_delay`` later;
the event time follows the clock-skew rule ``now + (timestamp - sent_at)``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse

from tracer.sandbox.posthog.state import PostHogState, StoredEvent, iso, number, parse_time

try:  # capture v1 may send zstd bodies, only when this optional package is installed
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None

log = logging.getLogger(__name__)

MAX_BODY = 20 * 1024 * 1024  # PostHog's batch size limit, applied after decompression
DESTINATION_RETRIES = 3  # PostHog retries a failing webhook up to 3 times
DESTINATION_BACKOFF = 0.2  # seconds before the first retry, doubled each time

_INVALID_KEY = "Project API key invalid. You can find your project API key in PostHog project settings."


class _Refused(Exception):
    """A capture or query request PostHog would refuse; carries the status and error body."""

    def __init__(self, status: int, error_type: str, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.body = {"type": error_type, "code": code, "detail": detail, "attr": None}


def _invalid(detail: str) -> _Refused:
    return _Refused(400, "validation_error", "invalid_payload", detail)


def _inflate(raw: bytes) -> bytes:
    """gzip or zlib (auto-detected), then raw deflate; bounded so a zip bomb is a 413."""
    for wbits in (47, -15):
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(raw, MAX_BODY + 1)
        except zlib.error:
            continue
        if len(out) > MAX_BODY or d.unconsumed_tail:
            raise _Refused(413, "validation_error", "payload_too_large", "payload exceeds 20 MB")
        return out
    raise _invalid("body could not be decompressed")


def _decode_body(raw: bytes, encoding: str, compression: str) -> Any:
    encoding = encoding.strip().lower()
    if encoding == "zstd":
        if zstandard is None:
            raise _Refused(415, "validation_error", "unsupported_encoding", "zstd is not supported here")
        try:
            raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=MAX_BODY)
        except zstandard.ZstdError:
            raise _invalid("body could not be decompressed") from None
    elif (
        encoding in ("gzip", "x-gzip", "deflate")
        or compression in ("gzip", "gzip-js")
        or raw[:2] == b"\x1f\x8b"
    ):
        raw = _inflate(raw)
    elif encoding not in ("", "identity"):
        raise _Refused(
            415, "validation_error", "unsupported_encoding", f"unsupported Content-Encoding {encoding!r}"
        )
    if len(raw) > MAX_BODY:
        raise _Refused(413, "validation_error", "payload_too_large", "payload exceeds 20 MB")
    try:
        return json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"body is not valid JSON: {exc}") from None


def _not_json(token: str) -> Any:
    """``NaN``/``Infinity``: Python's json reads them (and the Python SDK writes them for a float
    property), but they are no JSON: PostHog's capture (serde_json) refuses the whole request."""
    raise ValueError(f"{token} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _token_of(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    for key in ("api_key", "token", "$token"):
        if isinstance(obj.get(key), str):
            return obj[key]
    props = obj.get("properties")
    return props.get("token") if isinstance(props, dict) and isinstance(props.get("token"), str) else None


def _legacy_events(body: Any, batch_only: bool) -> tuple[list[Any], str | None, Any]:
    """(events, token, sent_at) of a legacy capture body: a batch envelope, one event, or a list."""
    if isinstance(body, list):  # posthog-js posts a bare array to /e/
        return body, _token_of(body[0]) if body else None, None
    if not isinstance(body, dict):
        raise _invalid("body must be a JSON object")
    if "batch" in body:
        events = body["batch"]
        if not isinstance(events, list):
            raise _invalid("'batch' must be a list of events")
    elif batch_only:
        raise _invalid("'batch' is required")
    else:
        events = [body]
    token = _token_of(body) or (_token_of(events[0]) if events else None)
    return events, token, body.get("sent_at")


@dataclass
class _Incoming:
    """One event as validated from the wire, before the timestamp rule and storage."""

    event: str
    distinct_id: str
    properties: dict[str, Any]
    uuid: str
    timestamp: Any
    offset_ms: float
    ignore_sent_at: bool
    person_set: dict[str, Any]
    person_set_once: dict[str, Any]


def _validate(raw: Any, index: int) -> _Incoming:
    where = f"event {index}"
    if not isinstance(raw, dict):
        raise _invalid(f"{where}: must be a JSON object")
    name = raw.get("event")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{where}: 'event' must be a non-empty string")
    props = raw.get("properties") or {}
    if not isinstance(props, dict):
        raise _invalid(f"{where}: 'properties' must be an object")
    distinct = raw.get("distinct_id", props.get("distinct_id", props.get("$distinct_id")))
    if distinct is None or isinstance(distinct, (dict, list)) or str(distinct).strip() == "":
        raise _invalid(f"{where}: 'distinct_id' is required")
    event_uuid = raw.get("uuid")
    if event_uuid is None:
        event_uuid = str(uuid.uuid4())
    else:
        try:
            event_uuid = str(uuid.UUID(str(event_uuid)))
        except ValueError:
            raise _invalid(f"{where}: 'uuid' is not a valid UUID") from None
    person_set = {**_dict(raw.get("$set")), **_dict(props.get("$set"))}
    person_set_once = {**_dict(raw.get("$set_once")), **_dict(props.get("$set_once"))}
    return _Incoming(
        event=name,
        distinct_id=str(distinct),
        properties=props,
        uuid=event_uuid,
        timestamp=raw.get("timestamp"),
        offset_ms=number(raw.get("offset")) or 0.0,
        ignore_sent_at=props.get("$ignore_sent_at") is True,
        person_set=person_set,
        person_set_once=person_set_once,
    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _v1_to_legacy(raw: Any, sdk_info: str) -> Any:
    """Capture v1 moves a few properties to typed fields; fold them back so storage is uniform."""
    if not isinstance(raw, dict):
        return raw
    props = dict(_dict(raw.get("properties")))
    options = _dict(raw.get("options"))
    if options.get("disable_skew_correction") is True:
        props["$ignore_sent_at"] = True
    if isinstance(options.get("process_person_profile"), bool):
        props["$process_person_profile"] = options["process_person_profile"]
    for wire, prop in (("session_id", "$session_id"), ("window_id", "$window_id")):
        if isinstance(raw.get(wire), str):
            props[prop] = raw[wire]
    lib, _, version = sdk_info.partition("/")
    if lib:  # PostHog injects $lib from the PostHog-Sdk-Info header on v1
        props.setdefault("$lib", lib)
        props.setdefault("$lib_version", version)
    return {**raw, "properties": props}


def _event_time(inc: _Incoming, now: float, sent_at: float | None) -> float:
    """PostHog's rule: correct client clock skew by ``sent_at``; no timestamp means now."""
    ts = parse_time(inc.timestamp)
    if ts is None:
        return now - inc.offset_ms / 1000.0  # "offset": ms before receipt, when no timestamp
    if sent_at is not None and not inc.ignore_sent_at:
        return now + (ts - sent_at)
    return ts


class Capture:
    """Capture handlers plus the background work (destinations) bound to one ``PostHogState``."""

    def __init__(self, state: PostHogState) -> None:
        self.state = state
        self.persons = state.persons  # distinct_id -> person properties (queries read them too)
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    # -- capture
    async def capture_legacy(self, request: Request) -> JSONResponse:
        batch_only = request.url.path.rstrip("/").endswith("/batch")
        try:
            body = _decode_body(
                await request.body(),
                request.headers.get("content-encoding", ""),
                request.query_params.get("compression", ""),
            )
            events, token, sent_at = _legacy_events(body, batch_only)
            known = self._check_token(token)
            if sent_at is None and request.query_params.get("_", "").isdigit():
                sent_at = int(request.query_params["_"]) / 1000.0  # posthog-js sends sent_at as ?_=ms
            incoming = [_validate(e, i) for i, e in enumerate(events)]
            self._accept(incoming, parse_time(sent_at), request, known)
        except _Refused as exc:
            return self._refuse(exc)
        return JSONResponse({"status": "Ok"})

    async def capture_v1(self, request: Request) -> JSONResponse:
        """Capture v1: Bearer token, ``{"created_at", "batch"}``, per-event results in the answer."""
        try:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            known = self._check_token(token.strip() if scheme.lower() == "bearer" else None)
            body = _decode_body(await request.body(), request.headers.get("content-encoding", ""), "")
            if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
                raise _invalid("body must be an object with a 'batch' list")
            sdk_info = request.headers.get("posthog-sdk-info", "")
            events = [_validate(_v1_to_legacy(e, sdk_info), i) for i, e in enumerate(body["batch"])]
            # The per-attempt request timestamp is v1's sent_at; the batch created_at is the fallback.
            sent_at = parse_time(request.headers.get("posthog-request-timestamp")) or parse_time(
                body.get("created_at")
            )
            self._accept(events, sent_at, request, known)
        except _Refused as exc:
            return self._refuse(exc)
        return JSONResponse({"results": {e.uuid: {"result": "ok"} for e in events}})

    def _check_token(self, token: str | None) -> bool:
        """Whether the key names this project. Like PostHog's capture service, only a missing or
        malformed key (empty, whitespace, a personal ``phx_`` key) is refused; a well-formed key
        of no project is accepted and its events dropped later, out of the sender's sight."""
        if not token or token != token.strip() or any(c.isspace() for c in token) or token.startswith("phx_"):
            raise _Refused(401, "authentication_error", "invalid_api_key", _INVALID_KEY)
        return token == self.state.project_api_key

    def _refuse(self, exc: _Refused) -> JSONResponse:
        self.state.rejected += 1
        return JSONResponse(exc.body, status_code=exc.status)

    def _accept(self, events: list[_Incoming], sent_at: float | None, request: Request, known: bool) -> None:
        """Store a validated request's events. All-or-nothing: validation happened before."""
        if not events:
            raise _invalid("no events in the request")
        if not known:  # answered 200 like PostHog; counted so the sandbox can report it
            self.state.dropped_unknown_key += len(events)
            return
        now = time.time()
        delay = max(0.0, float(self.state.ingest_delay))
        site = str(request.base_url).rstrip("/")
        for inc in events:
            stored = StoredEvent(
                uuid=inc.uuid,
                event=inc.event,
                distinct_id=inc.distinct_id,
                properties=inc.properties,
                timestamp=round(_event_time(inc, now, sent_at), 6),  # DateTime64(6)
                created_at=round(now, 6),
                received_at=now,
                visible_at=round(now + delay, 6),
            )
            person = self.persons.setdefault(inc.distinct_id, {})
            person.update({k: v for k, v in inc.person_set_once.items() if k not in person})
            person.update(inc.person_set)
            self.state._store.add(stored)
            self.state.captured += 1
            if self.state.destinations:  # no idle task per event when nothing listens
                self._spawn(self._deliver(stored, site))

    # -- destinations
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, ev: StoredEvent, site: str) -> None:
        """Once the event is ingested (queryable), POST it to every destination configured then."""
        wait = ev.visible_at - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        urls = list(self.state.destinations)
        if not urls:
            return
        body = self._webhook_body(ev, site)
        await asyncio.gather(*(self._post(url, body) for url in urls))

    def _webhook_body(self, ev: StoredEvent, site: str) -> dict[str, Any]:
        """PostHog's default webhook destination body: ``{"event": {event}, "person": {person}}``."""
        pid = self.state.project_id
        ts = iso(ev.timestamp)
        props = self.persons.get(ev.distinct_id, {})
        name = props.get("email") or props.get("name") or ev.distinct_id
        return {
            "event": {
                "uuid": ev.uuid,
                "event": ev.event,
                "distinct_id": ev.distinct_id,
                "properties": ev.properties,
                "timestamp": ts,
                "url": f"{site}/project/{pid}/events/{quote(ev.uuid)}/{quote(ts)}",
            },
            "person": {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"posthog-sandbox/{pid}/{ev.distinct_id}")),
                "name": str(name),
                "url": f"{site}/project/{pid}/person/{quote(ev.distinct_id, safe='')}",
                "properties": dict(props),
            },
        }

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=5.0, headers={"User-Agent": "posthog-sandbox-webhook"})
        for attempt in range(DESTINATION_RETRIES + 1):
            try:
                resp = await self._client.post(url, json=body)
                if resp.is_success:
                    return
                problem = f"HTTP {resp.status_code}"
            except Exception as exc:  # a bad URL or dead receiver must never take the server down
                problem = f"{type(exc).__name__}: {exc}"
            if attempt == DESTINATION_RETRIES:
                log.warning("destination %s gave up after %d attempts: %s", url, attempt + 1, problem)
                return
            log.info("destination %s failed (%s); retrying", url, problem)
            await asyncio.sleep(DESTINATION_BACKOFF * 2**attempt)
