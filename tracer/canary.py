"""The continuous synthetic canary: ``funnel-tracer canary -c FILE``.

Each step injects one probe per ``interval`` (from the spec). Slots are fixed-rate, so the long-run
rate is exact; each probe lands at a random point within ``jitter`` x interval around its slot, and
the first slot is at a random phase, so steps and instances spread across the interval instead
of firing together.

Concurrency caps: a step never has more than its cap of probes in flight (default: twice what
its interval and deadlines need in steady state), and the canary never more than
``canary.max_in_flight``. A slot that finds the cap reached is *skipped and counted*
(``funnel_probes_skipped_total``), so a slow sink cannot pile up unbounded probes. No slot is
ever dropped silently: slots that passed while the event loop was stalled (a blocking call, a
starved process) are not burst to catch up but counted as skipped with reason ``stalled``.

SIGTERM/SIGINT: stop injecting, wait for probes in flight up to ``canary.grace``, flush spans and
metrics, exit 0. Probes still unresolved then are left in a durable ledger (the next start
resumes them) or, with the in-memory ledger, reported as ``unknown`` ("the canary stopped").

Every resolved probe is one log line at INFO (``--log-format json`` for one JSON object per
line), one trace (``tracer.export.spans``), metric updates (``tracer.export.metrics``) and an
input to the k-of-n alert rule (``tracer.alerts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import random
import socket
import sys
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from tracer import clock
from tracer.alerts import AlertManager
from tracer.engine import Engine, InFlight, ProbeResult, StartError
from tracer.export import otlp
from tracer.export.metrics import CanaryMetrics
from tracer.export.otlp import TelemetryConfigError
from tracer.export.report import rounded
from tracer.export.spans import make_provider
from tracer.ledger import MemoryLedger, Sighting, restore
from tracer.ledger import build as build_ledger
from tracer.payload import strings_in, value_at
from tracer.probe import TRACE_ID
from tracer.spec import FunnelSpec
from tracer.status import StatusServer
from tracer.verdict import HopResult
from tracer.watch import Observation

log = logging.getLogger(__name__)

PUBLISH_MARGIN = 0.5  # seconds another instance may take to publish a sighting it received
MAX_IDS_PER_PUSH = 64  # trace ids taken from one pushed body for other instances (flood bound)
_ORDER = ["breach", "lost", "late", "unknown", "inject_failed", "ok"]


def worst(hops: list[HopResult]) -> str:
    return min((h.verdict for h in hops), key=_ORDER.index) if hops else "ok"


class Canary:
    def __init__(
        self,
        spec: FunnelSpec,
        *,
        location: str | None = None,
        instance: str | None = None,
        http_host: str = "127.0.0.1",
        http_port: int | None = 9464,
        provider: TracerProvider | None = None,
        metric_exporter: Any | None = None,
        ledger: MemoryLedger | None = None,
        on_result: Callable[[ProbeResult], None] | None = None,
        preflight: bool = True,
    ) -> None:
        self.preflight = preflight
        self.spec = spec
        extra = {"canary.location": location} if location else {}
        self.provider = provider or make_provider(extra_resource=extra)
        resource = self.provider.resource
        # OTEL_RESOURCE_ATTRIBUTES may set the location too; the resource is the one truth.
        self.location = str(resource.attributes.get("canary.location") or location or "") or None
        self.instance = instance or spec.canary.ledger.instance or self.location or socket.gethostname()
        self.engine = Engine(spec, self.provider)
        self.metrics = CanaryMetrics(spec, resource, metric_exporter)
        self.ledger = ledger or build_ledger(spec.canary.ledger, self.instance)
        self.alerts = AlertManager(
            spec.canary.alerts, spec.service, self.location, self.instance, on_sent=self.metrics.alert_sent
        )
        self.status = (
            StatusServer(http_host, http_port, self.health, self.metrics.prometheus)
            if http_port is not None
            else None
        )
        self.on_result = on_result
        self.local: dict[str, InFlight] = {}  # by trace id: probes this instance owns
        self._running: dict[str, set[asyncio.Task[None]]] = {name: set() for name in spec.steps}
        self._resumed_tasks: set[asyncio.Task[None]] = set()
        self.counts = {
            "started": 0,
            "resolved": 0,
            "skipped": 0,
            "resumed": 0,
            "abandoned": 0,
            "left_for_resume": 0,
        }
        self.skipped_by_reason: dict[str, int] = {}  # /healthz: why slots were not kept
        self._stopping = False
        self._skip_log: dict[str, tuple[float, int]] = {}

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down gracefully."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.shutdown()

    async def start(self) -> None:
        if self.status is not None:  # first: a port in use fails before anything is injected
            await self.status.start()
        await self.engine.start()
        if self.preflight:
            await self._preflight()
        self.ledger.on_pending = self._resume_records
        self.ledger.on_sighting = self._apply_sighting
        self.ledger.on_state = self._ledger_state
        self.ledger.on_blind = self._remote_blind
        self.ledger.on_alive = self._ledger_alive
        await self.ledger.start()
        if self.ledger.durable:
            # Resume the previous run's probes before injecting new ones (if Redis is down now,
            # they are resumed when it comes back).
            # (A predecessor killed without closing holds the instance id for one lock_ttl.)
            await self.ledger.wait_connected(3.0 + self.ledger.lock_ttl)  # type: ignore[attr-defined]
            conflict = getattr(self.ledger, "conflict", None)
            if conflict:
                raise StartError("canary.ledger.instance", conflict)
        self._route_receivers()
        await self.alerts.start()
        self.metrics.zero_series()
        self.metrics.refresh(self.engine.collectors, self.ledger)
        if self.status is not None:
            log.info(
                "status endpoint on http://%s:%d (/healthz, /metrics)",
                self.status.host,
                self.status.port,
                extra={"fields": {"event": "listening", "port": self.status.port}},
            )
        self._sampler = asyncio.create_task(self._sample(), name="canary-sampler")
        self._schedulers = [
            asyncio.create_task(self._schedule(name), name=f"canary-{name}") for name in self.spec.steps
        ] + [asyncio.create_task(self._gauge(name), name=f"canary-gauge-{name}") for name in self.spec.gauges]
        log.info(
            "canary started: %d step(s), instance %s",
            len(self.spec.steps),
            self.instance,
            extra={
                "fields": {
                    "event": "started",
                    "instance": self.instance,
                    "location": self.location,
                    "ledger": self.ledger.kind,
                }
            },
        )

    async def shutdown(self) -> None:
        self._stopping = True
        for t in getattr(self, "_schedulers", []):
            t.cancel()
        await asyncio.gather(*getattr(self, "_schedulers", []), return_exceptions=True)
        tasks = self._all_tasks()
        grace = self.spec.canary.grace
        if tasks:
            log.info(
                "stopping: %d probe(s) in flight, waiting up to %gs",
                len(tasks),
                grace,
                extra={"fields": {"event": "stopping", "in_flight": len(tasks), "grace_s": grace}},
            )
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        if hasattr(self, "_sampler"):
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        await self.alerts.close()
        if self.status is not None:
            await self.status.close()
        self.metrics.refresh(self.engine.collectors, self.ledger)
        await self.engine.close(flush=False)  # collectors; spans are flushed below
        await self.ledger.close()
        # Final OTLP exports, both within one budget: a black-holing endpoint must not hold the
        # exit past a supervisor's kill deadline (the ledger is closed already).
        end = clock.now() + otlp.FLUSH_BUDGET
        otlp.bounded(self.metrics.shutdown, max(0.5, end - clock.now()))
        otlp.bounded(self.provider.shutdown, max(0.5, end - clock.now()))
        log.info("canary stopped", extra={"fields": {"event": "stopped", **self.counts}})

    def _all_tasks(self) -> set[asyncio.Task[None]]:
        out = set(self._resumed_tasks)
        for s in self._running.values():
            out |= s
        return out

    # -- scheduling ---------------------------------------------------------------------------
    async def _schedule(self, step_name: str) -> None:
        step = self.spec.steps[step_name]
        interval, jitter = step.interval, self.spec.canary.jitter
        cap, global_cap = self.spec.step_cap(step_name), self.spec.canary.max_in_flight
        slot = clock.now() + random.uniform(0, interval)
        while True:
            at = slot + random.uniform(-0.5, 0.5) * jitter * interval
            await asyncio.sleep(max(0.0, at - clock.now()))
            slot += interval
            now = clock.now()
            if now > slot + interval:
                # The loop stalled past whole slots: keep this one and the latest, count the rest
                # (never a burst to catch up, never a silent gap).
                missed = int((now - slot) // interval)
                self._skip(step_name, "stalled", missed, n=missed, stalled=now - at)
                slot += missed * interval
            running = self._running[step_name]
            if len(running) >= cap:
                self._skip(step_name, "step_cap", cap)
                continue
            if global_cap is not None and self.in_flight >= global_cap:
                self._skip(step_name, "global_cap", global_cap)
                continue
            task = asyncio.create_task(self._probe(step_name))
            running.add(task)
            task.add_done_callback(running.discard)

    @property
    async def _gauge(self, name: str) -> None:
        """Read one gauge every ``interval``: metric ``funnel.gauge.value`` and one log line."""
        gauge = self.spec.gauges[name]
        while True:
            reading = await self.engine.read_gauge(name)
            state = gauge.state(reading.value)
            if reading.value is not None:
                self.metrics.gauge(name, reading.value)
            log.info(
                "gauge %s %s: %s",
                name,
                state,
                reading.error
                if reading.value is None
                else f"{reading.value:g} (ok below {gauge.ok_below:g})",
                extra={"fields": {"event": "gauge", "gauge": name, "state": state, "value": reading.value}},
            )
            await asyncio.sleep(gauge.interval)

    @property
    def in_flight(self) -> int:
        return len(self.local)

    def _skip(self, step: str, reason: str, cap: int, n: int = 1, stalled: float | None = None) -> None:
        """Count ``n`` skipped slots; log the first of a streak, then at most once a minute per step.
        ``cap`` is the cap reached, or for ``stalled`` the number of slots missed."""
        self.counts["skipped"] += n
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + n
        self.metrics.skipped(step, reason, n)
        now = clock.now()
        last, pending = self._skip_log.get(step, (-math.inf, 0))
        if now - last < 60.0:
            self._skip_log[step] = (last, pending + n)
            return
        self._skip_log[step] = (now, 0)
        fields = {"event": "skipped", "step": step, "reason": reason, "cap": cap, "more": pending}
        if stalled is not None:
            fields["stalled_s"] = rounded(stalled)
            log.warning(
                "%d probe slot(s) of %s skipped: the event loop stalled %.1fs (%d more skipped since the last warning)",
                n,
                step,
                stalled,
                pending,
                extra={"fields": fields},
            )
            return
        log.warning(
            "probe skipped: %s cap of %d in flight reached (%d more skipped since the last warning)",
            reason.replace("_", " "),
            cap,
            pending,
            extra={"fields": fields},
        )

    async def _probe(self, step_name: str) -> None:
        inflight = self.engine.begin(step_name)
        self.local[inflight.probe.trace_id] = inflight
        self.counts["started"] += 1
        self.metrics.started(step_name)
        self.ledger.put(inflight)  # before injecting: a crash mid-injection is still resumed
        try:
            await self.engine.inject(inflight)
        except asyncio.CancelledError:
            self._report(self.engine.abandon(inflight, "the canary stopped while injecting"))
            return
        except Exception as exc:  # an injector bug: report, never crash the canary
            log.exception("injection failed unexpectedly")
            self._report(
                self.engine.abandon(inflight, f"internal error while injecting: {type(exc).__name__}")
            )
            return
        self.ledger.put(inflight)
        # (finish awaited here, not through _finish: one coroutine frame less per probe in flight)
        try:
            result: ProbeResult | None = await self.engine.finish(inflight, on_hop=self._on_hop)
        except BaseException as exc:  # noqa: BLE001 - cancellation at shutdown included
            result = self._not_finished(inflight, exc)
        if result is not None:
            self._report(result)

    async def _finish(self, inflight: InFlight) -> None:
        try:
            result: ProbeResult | None = await self.engine.finish(inflight, on_hop=self._on_hop)
        except BaseException as exc:  # noqa: BLE001
            result = self._not_finished(inflight, exc)
        if result is not None:
            self._report(result)

    def _not_finished(self, inflight: InFlight, exc: BaseException) -> ProbeResult | None:
        """A probe whose await was cut short: by the end of the grace period (cancelled) or an
        internal error. Returns what to report, or None when the ledger keeps it for a restart."""
        if isinstance(exc, asyncio.CancelledError):
            if self.ledger.durable:
                # Left in the ledger: the next start resumes and reports it.
                self.engine.release(inflight)
                self.local.pop(inflight.probe.trace_id, None)
                self.metrics.in_flight(inflight.step, -1)
                self.counts["left_for_resume"] += 1
                return None
            self.counts["abandoned"] += 1
            return self.engine.abandon(inflight, "the canary stopped before the deadline")
        if not isinstance(exc, Exception):
            raise exc
        log.error("awaiting a probe failed unexpectedly", exc_info=exc)
        return self.engine.abandon(inflight, f"internal error: {type(exc).__name__}")

    def _on_hop(self, inflight: InFlight, _result: HopResult) -> None:
        if len(inflight.done) < len(self.spec.steps[inflight.step].hops):
            self.ledger.put(inflight)  # a restart keeps the hops resolved so far

    def _report(self, result: ProbeResult) -> None:
        tid = result.probe.trace_id
        self.local.pop(tid, None)
        self.ledger.done(tid)
        self.counts["resolved"] += 1
        self.metrics.resolved(result)
        self.alerts.observe(result)
        verdict = worst(result.hops)
        fields = {
            "event": "probe",
            "step": result.probe.step,
            "verdict": verdict,
            "trace_id": tid,
            "probe_id": result.probe.probe_id,
            "resumed": result.resumed,
            "location": self.location,
            "instance": self.instance,
            "injected_at": clock.iso(clock.wall(result.injection.sent_at)),
            "inject_status": result.injection.status,
            "inject_error": result.injection.error,
            "hops": [
                {
                    "hop": h.hop,
                    "sink": h.sink,
                    "verdict": h.verdict,
                    "lag_s": rounded(h.lag),
                    "error_bar_s": rounded(h.error_bar),
                    "sink_lag_s": rounded(h.sink_lag),
                    "target_s": h.target,
                    "reason": h.reason,
                }
                for h in result.hops
            ],
        }
        hops_text = " ".join(
            f"{h.hop}={h.verdict}" + (f"/{h.lag:.3f}s" if h.lag is not None else "") for h in result.hops
        )
        log.info("probe %s %s %s %s", result.probe.step, verdict, tid, hops_text, extra={"fields": fields})
        if self.on_result is not None:
            self.on_result(result)

    # -- restart: resume the previous run's probes ------------------------------------------
    def _resume_records(self, records: list[dict[str, Any]], last_alive: float | None) -> None:
        now = clock.now()
        usable = []
        for rec in records:
            step = rec.get("step")
            if not isinstance(step, str) or step not in self.spec.steps:
                log.warning("ledger record for unknown step %r dropped (spec changed?)", str(step)[:64])
                self.ledger.done(str(rec.get("trace_id")))
                continue
            try:
                usable.append(restore(rec))
            except Exception:  # any shape: truncated, hand-edited, from another version
                log.warning("unreadable ledger record dropped: trace %s", str(rec.get("trace_id"))[:64])
                self.ledger.done(str(rec.get("trace_id")))
        if not usable:
            return
        # Nobody looked between the previous process's last heartbeat and now.
        since = last_alive if last_alive is not None else min(p.created_at for p, _, _ in usable)
        self.engine.mark_blind(min(since, now), now)
        log.info(
            "resuming %d probe(s) of the previous run (blind for %.1fs)",
            len(usable),
            max(0.0, now - since),
            extra={
                "fields": {
                    "event": "resuming",
                    "probes": len(usable),
                    "blind_s": rounded(max(0.0, now - since)),
                }
            },
        )
        for probe, injection, done in usable:
            inflight = self.engine.resume(probe, injection, done)
            self.local[probe.trace_id] = inflight
            self.ledger.put(inflight)
            self.counts["resumed"] += 1
            self.metrics.in_flight(probe.step, +1)
            task = asyncio.create_task(self._finish(inflight))
            self._resumed_tasks.add(task)
            task.add_done_callback(self._resumed_tasks.discard)

    async def _preflight(self) -> None:
        """The doctor's checks at start: each problem is logged with its fix; a sink that cannot
        measure at all is broken from the start, so /healthz names the cause at once."""
        from tracer import preflight

        findings = await preflight.run(self.spec)
        for f in preflight.problems(findings):
            log.warning(
                "preflight: %s (%s)%s",
                f.check,
                f.detail,
                f"; fix: {f.fix}" if f.fix else "",
                extra={"fields": {"event": "preflight", "check": f.check, "detail": f.detail, "fix": f.fix}},
            )
        self.engine.block(preflight.blocked_sinks(findings))

    # -- several instances sharing receivers ---------------------------------------------------
    def _route_receivers(self) -> None:
        """Push receivers hand every body to us too: trace ids we do not own go to the ledger,
        which queues them for the instance that does."""
        self.routed: set[str] = set()
        if not (self.ledger.shared and self.spec.canary.ledger.shared_receivers):
            return
        for sink, collector in self.engine.collectors.items():
            route = getattr(collector, "route", None)
            if route is None:
                continue
            json_paths: dict[str, set[str]] = {}
            for step in self.spec.steps.values():
                for hop in step.hops:
                    path = getattr(hop.sink_spec, "path", None)
                    if hop.sink == sink and path is not None:
                        jp = json_paths.setdefault(path, set())
                        if getattr(hop.sink_spec, "json_path", None):
                            jp.add(hop.sink_spec.json_path)
            for path, jps in json_paths.items():
                route(path, functools.partial(self._on_push, sink, path, sorted(jps)))
                self.routed.add(sink)
        now = clock.now()
        for sink in self.routed:  # nothing is in flight yet: nothing to have missed before now
            self.engine.collectors[sink].coverage.cap("shared-ledger", now)
        if not self.ledger.up:  # not connected yet: sightings of other instances cannot reach us
            self._ledger_state(False, now)

    def _ledger_alive(self, at: float) -> None:
        """Sightings other instances made before ``at - PUBLISH_MARGIN`` have reached us: our
        routed push sinks may certify "not seen" that far, no further."""
        for sink in getattr(self, "routed", ()):
            self.engine.collectors[sink].coverage.cap("shared-ledger", at - PUBLISH_MARGIN)

    def _ledger_state(self, up: bool, at: float) -> None:
        """While the shared ledger is down, sightings other instances make of our probes cannot
        reach us: routed push collectors are blind (held) until it is back."""
        for sink in getattr(self, "routed", ()):
            cov = self.engine.collectors[sink].coverage
            if up:
                cov.release("shared-ledger", at)
            else:
                cov.hold("shared-ledger", at)

    def _remote_blind(self, sink: str, start: float, end: float) -> None:
        collector = self.engine.collectors.get(sink)
        if collector is not None and sink in getattr(self, "routed", ()):
            collector.coverage.mark_blind(start, end)

    def _on_push(self, sink: str, path: str, json_paths: list[str], body: Any, received: float) -> None:
        ids: list[str] = []
        for tid in TRACE_ID.findall("\n".join(strings_in(body)).lower()):
            if tid not in self.local and tid not in ids:
                ids.append(tid)
                if len(ids) >= MAX_IDS_PER_PUSH:
                    break
        for tid in ids:
            found = [jp for jp in json_paths if tid in "\n".join(strings_in(value_at(body, jp))).lower()]
            self.ledger.offer(Sighting(tid, sink, path, clock.stamp(received), self.instance, found))

    def _apply_sighting(self, s: Sighting) -> bool:
        inflight = self.local.get(s.trace_id)
        if inflight is None:
            return False
        matched = False
        for w in inflight.watches.values():
            hop = w.sink_spec
            if w.sink != s.sink or getattr(hop, "path", None) != s.path:
                continue
            if getattr(hop, "json_path", None) and hop.json_path not in s.json_paths:
                continue
            at = clock.from_stamp(s.at)
            w.observe(Observation(at=at, not_before=at, source="push", detail={"path": s.path, "via": s.via}))
            self.engine.collectors[w.sink].unwatch(w)
            matched = True
        return matched

    # -- health and metrics ---------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        if not hasattr(self, "_schedulers"):
            return False, {"status": "starting" if not self._stopping else "stopped"}
        cols: dict[str, Any] = {}
        for sink, c in self.engine.collectors.items():
            try:
                cols[sink] = c.health()
            except Exception as exc:
                cols[sink] = {"up": False, "error": type(exc).__name__}
            if c.coverage.broken:  # a permanent error: say why, whatever the collector reports
                cols[sink] = {**cols[sink], "up": False, "broken": c.coverage.broken}
        ok = all(bool(h.get("up")) for h in cols.values())
        return ok, {
            "status": "ok" if ok else "unhealthy",
            "collectors": cols,
            "ledger": self.ledger.health(),
            "in_flight": self.in_flight,
            "instance": self.instance,
            "location": self.location,
            "open_incidents": [f"{k[0]}/{k[1]}:{k[2]}" for k in self.alerts.open],
            "counts": self.counts,
            "skipped": dict(self.skipped_by_reason),
        }

    async def _sample(self) -> None:
        while True:
            self.metrics.refresh(self.engine.collectors, self.ledger)
            await asyncio.sleep(1.0)


# -- logging ------------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (from the canary's monotonic-anchored clock), level, logger,
    msg, and the record's structured ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": clock.iso(clock.wall(clock.now())),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def setup_logging(fmt: str, verbose: int = 0) -> None:
    """Canary logging: INFO for funnel-tracer's own loggers (one line per resolved probe),
    WARNING for libraries; ``json`` or ``text`` on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    level = logging.DEBUG if verbose >= 1 else logging.INFO
    for name in ("tracer", "collectors"):
        logging.getLogger(name).setLevel(level)
    for noisy in ("httpx", "httpcore", "posthog", "uvicorn.error", "mail.log", "opentelemetry"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_canary(spec: FunnelSpec, **kwargs: Any) -> int:
    """Run until SIGTERM/SIGINT; exit code 0 after a graceful stop."""
    import signal

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            canary = Canary(spec, **kwargs)
        except TelemetryConfigError as exc:
            log.error("cannot start the canary: %s", exc, extra={"fields": {"event": "start_failed"}})
            return 2
        try:
            await canary.start()
        except (OSError, StartError) as exc:  # a port in use, an unreachable bind address
            log.error("cannot start the canary: %s", exc, extra={"fields": {"event": "start_failed"}})
            await canary.shutdown()
            return 2
        try:
            await stop.wait()
        finally:
            await canary.shutdown()
        return 0

    return asyncio.run(main())
