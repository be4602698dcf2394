"""Alerts: a k-of-n rule per hop, posted to a webhook once per incident, with a recovery message.

For each step and hop the canary keeps the verdicts of the last n probes *by injection time*
(a ``lost`` verdict resolves only at its deadline, after younger probes may have resolved ``ok``;
ordering by completion would flap). An incident opens when k of them are *failing* (default
``late``, ``lost``, ``breach``) and clears when fewer than k are. ``unknown``
(and ``inject_failed``) are not evidence of a slow funnel: they count towards a separate
"canary blind" incident with its own k of n, so a broken collector pages as what it is.

Formats: ``slack`` posts ``{"text": ...}`` (Slack incoming webhooks, and the many tools that
accept their shape); ``json`` posts a structured object (see ``payload``). Every message has the
step, hop, sink, target, the lags of the window, and a link to a trace of the latest failing
probe built from ``trace_url`` (placeholders ``{trace_id}``, ``{step}``, ``{hop}``,
``{service}``, ``{location}``, ``{jaeger_url}``).

Posts go out from a queue in order (an incident always before its recovery), with retries; a
failing alert webhook is logged without its URL (Slack's URLs are credentials) and counted.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from tracer import clock, net

if TYPE_CHECKING:
    from tracer.engine import ProbeResult
    from tracer.spec import AlertsSpec
    from tracer.verdict import HopResult

log = logging.getLogger(__name__)

BREACH, BLIND = "breach", "blind"
_PLACEHOLDER = re.compile(r"\{(trace_id|step|hop|service|location|jaeger_url)\}")


@dataclass(frozen=True, order=True)
class Sample:
    injected_at: float
    seq: int
    verdict: str
    lag: float | None
    trace_id: str
    reason: str | None


@dataclass
class Incident:
    kind: str
    step: str
    hop: str
    opened_wall: float
    trace_id: str


class AlertManager:
    def __init__(
        self,
        spec: AlertsSpec,
        service: str,
        location: str | None = None,
        instance: str | None = None,
        on_sent: Callable[[str, str, bool], None] | None = None,
    ) -> None:
        self.spec = spec
        self.service, self.location, self.instance = service, location, instance
        self.on_sent = on_sent
        self._n = max(spec.n, spec.blind_n or spec.n)
        self._history: dict[tuple[str, str], list[Sample]] = {}
        self._seq = 0
        self.open: dict[tuple[str, str, str], Incident] = {}
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self.sent: list[dict[str, Any]] = []  # payloads posted (for health and tests); bounded below
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self.spec.webhook_url is not None

    async def start(self) -> None:
        if self.enabled:
            self._client = httpx.AsyncClient(headers={"User-Agent": "funnel-tracer"}, follow_redirects=False)
            self._task = asyncio.create_task(self._sender(), name="alert-sender")

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (an incident's recovery included), up to ``timeout``."""
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    # -- the rule -----------------------------------------------------------------------------
    def observe(self, result: ProbeResult) -> None:
        for h in result.hops:
            self.observe_hop(h, result.probe.trace_id, result.injection.sent_at)

    def observe_hop(self, h: HopResult, trace_id: str, injected_at: float) -> None:
        hist = self._history.setdefault((h.step, h.hop), [])
        self._seq += 1
        sample = Sample(injected_at, self._seq, h.verdict, h.lag, trace_id, h.reason)
        if len(hist) >= self._n and sample < hist[0]:
            return  # older than the whole window: no longer one of the last n probes
        bisect.insort(hist, sample)
        del hist[: -self._n]
        rules = (
            (BREACH, set(self.spec.failing), self.spec.k, self.spec.n),
            (BLIND, set(self.spec.blind), self.spec.blind_k or self.spec.k, self.spec.blind_n or self.spec.n),
        )
        for kind, bad_verdicts, k, n in rules:
            window = list(hist)[-n:]
            bad = [s for s in window if s.verdict in bad_verdicts]
            key = (h.step, h.hop, kind)
            if key not in self.open and len(bad) >= k:
                inc = Incident(kind, h.step, h.hop, clock.wall(clock.now()), bad[-1].trace_id)
                self.open[key] = inc
                self._post(self.payload("incident", inc, h, window, len(bad), k, n))
            elif key in self.open and len(bad) < k:
                inc = self.open.pop(key)
                self._post(self.payload("recovery", inc, h, window, len(bad), k, n))

    def payload(
        self, type_: str, inc: Incident, h: HopResult, window: list[Sample], bad: int, k: int, n: int
    ) -> dict[str, Any]:
        trace_id = inc.trace_id if type_ == "incident" else window[-1].trace_id
        now = clock.wall(clock.now())
        body: dict[str, Any] = {
            "type": type_,
            "kind": inc.kind,
            "service": self.service,
            "step": h.step,
            "hop": h.hop,
            "sink": h.sink,
            "target_s": h.target,
            "deadline_s": h.deadline,
            "rule": {"k": k, "n": n, "matching": bad},
            "verdicts": [s.verdict for s in window],
            "lags_s": [None if s.lag is None else round(s.lag, 3) for s in window],
            "trace_id": trace_id,
            "trace_url": self.trace_url(trace_id, h.step, h.hop),
            "location": self.location,
            "instance": self.instance,
            "opened_at": clock.iso(inc.opened_wall),
        }
        if type_ == "recovery":
            body["resolved_at"] = clock.iso(now)
            body["duration_s"] = round(now - inc.opened_wall, 1)
        if inc.kind == BLIND:
            body["reason"] = next((s.reason for s in reversed(window) if s.reason), None)
        return body

    def trace_url(self, trace_id: str, step: str, hop: str) -> str | None:
        if not self.spec.trace_url:
            return None
        values = {
            "trace_id": trace_id,
            "step": step,
            "hop": hop,
            "service": self.service,
            "location": self.location or "",
            "jaeger_url": (self.spec.jaeger_url or "").rstrip("/"),
        }
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.spec.trace_url)

    # -- delivery -----------------------------------------------------------------------------
    def _post(self, body: dict[str, Any]) -> None:
        log.warning(
            "alert %s: %s %s/%s (%d of last %d)",
            body["type"],
            body["kind"],
            body["step"],
            body["hop"],
            body["rule"]["matching"],
            body["rule"]["n"],
        )
        if self.enabled:
            self._queue.put_nowait(body)

    async def _sender(self) -> None:
        assert self._client is not None and self.spec.webhook_url is not None
        while True:
            body = await self._queue.get()
            try:
                ok = await self._deliver(body)
                self.sent.append(body)
                del self.sent[:-100]
                if self.on_sent is not None:
                    self.on_sent(body["kind"], body["type"], ok)
            finally:
                self._queue.task_done()

    async def _deliver(self, body: dict[str, Any]) -> bool:
        assert self._client is not None and self.spec.webhook_url is not None
        data = slack_message(body) if self.spec.format == "slack" else body
        url = self.spec.webhook_url.get_secret_value()
        error = ""
        for attempt in range(self.spec.retries + 1):
            if attempt:
                await asyncio.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)))
            try:
                resp = await net.request(self._client, "POST", url, json=data, timeout=self.spec.timeout)
            except httpx.HTTPError as exc:
                error = type(exc).__name__
                continue
            if 200 <= resp.status_code < 300:
                return True
            error = f"HTTP {resp.status_code}"
            if resp.status_code < 500 and resp.status_code != 429:
                break  # a 4xx will not get better by retrying
        self.failures += 1
        log.error(
            "alert webhook failed (%s); %s %s for %s/%s not delivered",
            error,
            body["kind"],
            body["type"],
            body["step"],
            body["hop"],
        )
        return False


def _lag_text(verdict: str, lag: float | None) -> str:
    return f"{lag:.2f}s" if lag is not None and verdict not in ("lost", "unknown") else verdict


def slack_message(body: dict[str, Any]) -> dict[str, Any]:
    """Slack incoming-webhook text (mrkdwn)."""
    where = f"*{body['step']}* → *{body['hop']}* ({body['sink']}) on `{body['service']}`"
    if body.get("location"):
        where += f" from {body['location']}"
    lags = ", ".join(_lag_text(v, lag) for v, lag in zip(body["verdicts"], body["lags_s"], strict=False))
    rule = body["rule"]
    link = (
        f"\n<{body['trace_url']}|trace {body['trace_id']}>"
        if body.get("trace_url")
        else f"\ntrace `{body['trace_id']}`"
    )
    if body["type"] == "incident" and body["kind"] == BREACH:
        head = f":red_circle: *Funnel freshness breach*: {where}"
        what = f"{rule['matching']} of the last {rule['n']} probes late or lost (target {body['target_s']:g}s, deadline {body['deadline_s']:g}s)"
    elif body["type"] == "incident":
        head = f":warning: *Canary blind*: {where}"
        what = f"{rule['matching']} of the last {rule['n']} probes could not be measured"
        if body.get("reason"):
            what += f": {body['reason']}"
    else:
        label = "Freshness recovered" if body["kind"] == BREACH else "Canary sees again"
        head = f":large_green_circle: *{label}*: {where}"
        what = f"after {body.get('duration_s', 0):g}s; now {rule['matching']} of the last {rule['n']} (target {body['target_s']:g}s)"
    return {"text": f"{head}\n{what}\nlags: {lags}{link}"}
