"""Runs probes through the pipeline: inject -> await -> verdict -> export.

One ``Engine`` owns the collectors for every sink the spec uses, an HTTP client for injection
and an OTel tracer provider. ``run_probe`` takes one probe end to end; ``check`` runs N probes per
step for the launch gate.

The canary drives the same pipeline in phases, so its ledger can persist a probe between them:
``begin`` (register watches) -> ``inject`` -> ``finish`` (await, judge, export); ``resume``
rebuilds a probe from a ledger record after a restart and ``abandon`` reports one that could not
be awaited to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from opentelemetry.sdk.trace import TracerProvider

from tracer import clock, stats
from tracer.evidence import Evidence, blind_json, sentence, window
from tracer.export import otlp
from tracer.export.spans import emit_probe, get_tracer, make_provider
from tracer.gauges import GaugeError, Reading
from tracer.gauges import read as read_gauge
from tracer.inject import CleanupOutcome, Injection
from tracer.inject import auth as inject_auth
from tracer.plugins import Cleans, Collector, Connects, Explains, InjectContext, Injector, ObservesInjection
from tracer.probe import Probe
from tracer.spec import CLEANUP_PLUGIN, INJECTOR_PLUGINS, SINK_PLUGINS, FunnelSpec, HopSpec
from tracer.verdict import (
    BREACH,
    INJECT_FAILED,
    LATE,
    LOST,
    OK,
    UNKNOWN,
    HopResult,
    judge_absent,
    judge_present,
    sink_lag,
)
from tracer.watch import Watch

log = logging.getLogger(__name__)

STOPPED = "the check was interrupted before this hop resolved"

# The event loop's own pulse: a tick this much later than asked means the tracer was not
# running (CPU starved, a blocking call), so no collector looked and no push was taken in.
STALL_TICK = 0.1
STALL_BLIND = 0.5


class StartError(Exception):
    """A collector could not start (e.g. its port is taken): a setup problem, exit 2, before any probe."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: cannot start: {message}")
        self.path = path


@dataclass
class ProbeResult:
    probe: Probe
    injection: Injection
    hops: list[HopResult]
    resumed: bool = False
    cleanup: list[CleanupOutcome] = field(default_factory=list)  # what was removed after it resolved


@dataclass(eq=False)
class InFlight:
    """One probe between ``begin`` and its verdict: what a canary ledger persists."""

    probe: Probe
    watches: dict[str, Watch]
    registered_at: float  # monotonic: when its watches were registered
    injection: Injection | None = None
    done: dict[str, HopResult] = field(default_factory=dict)  # hops resolved so far
    resumed: bool = False
    injection_unknown: bool = False  # resumed from a record written before the injection returned
    evidence: set[str] = field(default_factory=set)  # hops whose collector judged the injection itself

    @property
    def step(self) -> str:
        return self.probe.step


OnHop = Callable[[InFlight, HopResult], None]


class Engine:
    def __init__(self, spec: FunnelSpec, provider: TracerProvider | None = None) -> None:
        self.spec = spec
        self._own_provider = provider is None
        self.provider = provider or make_provider()
        self.tracer = get_tracer(self.provider)
        self.collectors: dict[str, Collector] = {}
        self.injectors: dict[str, Injector] = {}  # one per step
        self.http: httpx.AsyncClient | None = None
        self.auth: dict[str, inject_auth.Authenticator] = {}  # the spec's auth map, one token cache each
        self.ctx = InjectContext(http=None, synthetic=spec.canary.synthetic)
        # ``stop``: no new probe starts; probes awaiting their hops end at once as ``unknown``.
        self.stopping = asyncio.Event()
        self._awaiting: set[asyncio.Task[Any]] = set()  # tasks inside a probe's await stage
        self._stopped: set[asyncio.Task[Any]] = set()  # ... of those, the ones stop() cancelled
        self._wakers: set[asyncio.Event] = set()  # check loops sleeping until their next start
        self._pulse = clock.now()  # the stall watch's last tick (see _stall_check)
        self._pulse_task: asyncio.Task[None] | None = None
        self.stalls = 0  # stalls longer than STALL_BLIND, each a blind window on every collector
        self._stall_logged = -math.inf

    def stop(self) -> None:
        """End the run early (the check was interrupted): no probe starts after this; probes
        awaiting their hops stop waiting, their open hops ``unknown`` (``STOPPED``), and are
        still cleaned up and exported. Injections under way finish first (bounded by their
        timeout), since whether they were delivered is only known from their answer."""
        self.stopping.set()
        for event in self._wakers:
            event.set()
        for task in self._awaiting:
            self._stopped.add(task)
            task.cancel()

    def sinks(self) -> list[str]:
        """The sinks the steps use, plus those their configs need (PostHog push: the webhook receiver)."""
        used = {hop.sink for step in self.spec.steps.values() for hop in step.hops}
        for sink in list(used):
            used.update(n.sink for n in SINK_PLUGINS[sink].needs(self.spec.collector_config(sink)))
        return sorted(used)

    async def start(self) -> None:
        self.http = httpx.AsyncClient(headers={"User-Agent": "funnel-tracer"}, follow_redirects=False)
        self.auth = inject_auth.build(dict(self.spec.auth), self.http)
        ctx = self.ctx = InjectContext(
            http=self.http,
            synthetic=self.spec.canary.synthetic,
            auth=self.auth,
            redact=self.spec._env_values,
        )
        for name, step in self.spec.steps.items():
            self.injectors[name] = INJECTOR_PLUGINS[step.inject.kind].factory(step.inject.config, ctx)
        for sink in self.sinks():
            collector = SINK_PLUGINS[sink].factory(self.spec.collector_config(sink))
            try:
                await collector.start()
            except OSError as exc:  # a receiver's port taken, a socket path not writable...
                await self.close()
                raise StartError(f"collectors.{sink}", exc.strerror or type(exc).__name__) from None
            self.collectors[sink] = collector
        for collector in self.collectors.values():
            if isinstance(collector, Connects):
                collector.connect(self.collectors)
        self._pulse = clock.now()
        self._pulse_task = asyncio.create_task(self._watch_pulse(), name="engine-stall-watch")

    async def _watch_pulse(self) -> None:
        while True:
            await asyncio.sleep(STALL_TICK)
            self._stall_check()

    def _stall_check(self) -> None:
        """If the loop stalled since the last tick, every collector was blind meanwhile: a look
        or a push handled after the stall is stamped late by the stall, so a lag straddling the
        target across it is ``unknown``, not ``late``. Called by the pulse task and, so that
        the order of callbacks after a stall cannot matter, right before every judgement."""
        now = clock.now()
        gap = now - self._pulse - STALL_TICK
        if gap > STALL_BLIND:
            why = f"the tracer's event loop stalled {gap:.1f}s (CPU starved or a blocking call)"
            for c in self.collectors.values():
                c.coverage.mark_blind(self._pulse, now, why)
            self.stalls += 1
            if now - self._stall_logged > 60.0:
                self._stall_logged = now
                log.warning("%s: hops across it are unknown, not late (%d stall(s) so far)", why, self.stalls)
        self._pulse = now

    async def close(self, flush: bool = True) -> None:
        """Stop collectors and injectors; export pending spans (``flush``: a caller that shuts
        the shared provider down itself, like the canary, passes False)."""
        if self._pulse_task is not None:
            self._pulse_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pulse_task
        for c in self.collectors.values():
            await c.close()
        for i in self.injectors.values():
            await i.close()
        if self.http is not None:
            await self.http.aclose()
        if self._own_provider:
            otlp.bounded(self.provider.shutdown)  # flushes pending spans, a few seconds at most
        elif flush:
            otlp.bounded(lambda: self.provider.force_flush(5000))

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- one probe ----------------------------------------------------------
    async def run_probe(
        self, step_name: str, on_injected: Callable[[InFlight], None] | None = None
    ) -> ProbeResult:
        """Inject one probe, await every hop, judge, and export its trace."""
        inflight = self.begin(step_name)
        try:
            await self.inject(inflight)
        except BaseException:
            self.release(inflight)
            raise
        if on_injected is not None:
            on_injected(inflight)
        return await self.finish(inflight)

    def begin(self, step_name: str, probe: Probe | None = None) -> InFlight:
        """Create a probe and register its watches (before injection: nothing can be missed)."""
        step = self.spec.steps[step_name]
        probe = probe or Probe(step=step_name)
        watches = {hop.name: Watch(probe=probe, hop=hop, since=probe.created_at) for hop in step.hops}
        for w in watches.values():
            self.collectors[w.sink].watch(w)
        return InFlight(probe, watches, registered_at=clock.now())

    async def inject(self, inflight: InFlight) -> Injection:
        try:
            injection = await self.injectors[inflight.step].send(inflight.probe)
        except Exception as exc:  # an injector bug is this probe's inject_failed, never the run's end
            log.warning("step %s: the injector raised %s", inflight.step, type(exc).__name__)
            log.debug("injector error", exc_info=True)
            now = clock.now()
            injection = Injection(
                inflight.probe.created_at,
                now,
                ok=False,
                error=f"internal error in the injector: {type(exc).__name__}",
                attributes={"error.type": type(exc).__name__},
            )
        inflight.injection = injection
        for name, w in inflight.watches.items():
            collector = self.collectors[w.sink]
            if isinstance(collector, ObservesInjection) and collector.observe_injection(w, injection):
                inflight.evidence.add(name)
        return injection

    async def finish(self, inflight: InFlight, on_hop: OnHop | None = None) -> ProbeResult:
        """Await every hop not resolved yet, judge, export the trace. Each hop's result is kept
        on ``inflight.done`` (and handed to ``on_hop``) as soon as it resolves."""
        step = self.spec.steps[inflight.step]
        injection = inflight.injection
        assert injection is not None, "inject() first"
        task = asyncio.current_task()
        assert task is not None
        self._awaiting.add(task)
        try:
            if self.stopping.is_set():
                hops = self._open_hops(inflight, injection, STOPPED)
            elif injection.ok:
                hops = await self._await_hops(
                    inflight.step, step.hops, inflight.watches, injection, inflight, on_hop
                )
            else:
                # A failed injection is still evidence for hops that judge the response itself
                # (a 5xx, a timeout); for the others it is inject_failed.
                judged = [h for h in step.hops if h.name in inflight.evidence]
                found = (
                    await self._await_hops(
                        inflight.step, judged, inflight.watches, injection, inflight, on_hop
                    )
                    if judged
                    else []
                )
                by_name = {r.hop: r for r in found}
                hops = [
                    by_name.get(hop.name) or self._inject_failed(inflight.step, hop, injection)
                    for hop in step.hops
                ]
        except asyncio.CancelledError:
            if task not in self._stopped:
                raise  # cancelled by someone else (a canary's shutdown): theirs to handle
            task.uncancel()
            hops = self._open_hops(inflight, injection, STOPPED)
        finally:
            self._awaiting.discard(task)
            self._stopped.discard(task)
            self.release(inflight)
        if inflight.injection_unknown:
            for h in hops:
                if h.verdict == LOST:  # we cannot tell whether the probe ever reached the funnel
                    h.verdict, h.undecided = UNKNOWN, False
                    h.reason = "not seen, and the canary restarted while injecting: the probe may never have been sent"
        cleanup = await self.cleanup(inflight.probe)
        emit_probe(self.tracer, inflight.probe, injection, hops, self.spec.service)
        return ProbeResult(inflight.probe, injection, hops, resumed=inflight.resumed, cleanup=cleanup)

    async def cleanup(self, probe: Probe) -> list[CleanupOutcome]:
        """Remove what the probe left behind, once it resolved: the step's ``cleanup:`` requests,
        then the injector's own (``Cleans``). Reported, logged, and never part of a verdict."""
        step = self.spec.steps[probe.step]
        injector = self.injectors[probe.step]
        out: list[CleanupOutcome] = []
        try:
            if step.cleanup and CLEANUP_PLUGIN.run_requests is not None:
                out += await CLEANUP_PLUGIN.run_requests(list(step.cleanup), probe, self.ctx)
            if isinstance(injector, Cleans):
                out += await injector.cleanup(probe)
        except Exception as exc:  # a cleanup bug must not lose the probe's verdict
            out.append(CleanupOutcome("cleanup", ok=False, error=f"internal error: {type(exc).__name__}"))
        for o in out:
            if not o.ok:
                log.warning("cleanup of probe %s (%s): %s: %s", probe.probe_id, probe.step, o.what, o.error)
        return out

    def block(self, sinks: dict[str, str]) -> None:
        """Preflight found these sinks unable to measure at all (``{sink: why}``): their hops are
        ``unknown`` with the cause at once, rather than ``lost`` after the deadline. A look that
        succeeds later (the key was fixed) clears it."""
        for sink, why in sinks.items():
            if sink in self.collectors:
                self.collectors[sink].coverage.broke(clock.now(), why)

    def release(self, inflight: InFlight) -> None:
        for w in inflight.watches.values():
            self.collectors[w.sink].unwatch(w)

    def resume(
        self, probe: Probe, injection: Injection | None, done: dict[str, HopResult] | None = None
    ) -> InFlight:
        """Rebuild a probe injected by an earlier process (from a ledger record): watch its
        unresolved hops again; ``finish`` then awaits them. ``injection`` None: the record was
        written before the injection returned, so whether it was sent is unknown."""
        step = self.spec.steps[probe.step]
        done = dict(done or {})
        watches = {
            hop.name: Watch(probe=probe, hop=hop, since=probe.created_at)
            for hop in step.hops
            if hop.name not in done
        }
        for w in watches.values():
            self.collectors[w.sink].watch(w)
        unknown = injection is None
        if injection is None:
            injection = Injection(
                sent_at=probe.created_at,
                done_at=probe.created_at,
                ok=True,
                attributes={"funnel.injection.outcome": "unknown"},
            )
        return InFlight(
            probe,
            watches,
            registered_at=clock.now(),
            injection=injection,
            done=done,
            resumed=True,
            injection_unknown=unknown,
        )

    def abandon(self, inflight: InFlight, reason: str) -> ProbeResult:
        """Report a probe that could not be awaited to its end (the canary is stopping): hops
        not resolved yet are ``unknown`` with ``reason``. Exports its trace."""
        self.release(inflight)
        injection = inflight.injection or Injection(
            inflight.probe.created_at, clock.now(), ok=False, error="canary stopped before injecting"
        )
        hops = self._open_hops(inflight, injection, reason)
        emit_probe(self.tracer, inflight.probe, injection, hops, self.spec.service)
        return ProbeResult(inflight.probe, injection, hops, resumed=inflight.resumed)

    def _open_hops(self, inflight: InFlight, injection: Injection, reason: str) -> list[HopResult]:
        """The probe's hops as they stand: those resolved kept, the others ``unknown`` with
        ``reason`` (``inject_failed`` if the injection failed): nobody looked to their end."""
        step = self.spec.steps[inflight.step]
        now = clock.now()
        hops = []
        for hop in step.hops:
            r = inflight.done.get(hop.name)
            if r is None:
                if not injection.ok:
                    r = self._inject_failed(inflight.step, hop, injection)
                else:
                    r = HopResult(
                        step=inflight.step,
                        hop=hop.name,
                        sink=hop.sink,
                        target=hop.target,
                        deadline=self.spec.deadline(hop),
                        verdict=UNKNOWN,
                        start=injection.sent_at,
                        end=max(now, injection.sent_at),
                        reason=reason,
                        after=hop.after,
                    )
            hops.append(r)
        return hops

    def mark_blind(self, start: float, end: float) -> None:
        """Every collector was blind in ``[start, end]`` (e.g. the canary process was down)."""
        for c in self.collectors.values():
            c.coverage.mark_blind(start, end)

    def _inject_failed(self, step_name: str, hop: HopSpec, injection: Injection) -> HopResult:
        return HopResult(
            step=step_name,
            hop=hop.name,
            sink=hop.sink,
            target=hop.target,
            deadline=self.spec.deadline(hop),
            verdict=INJECT_FAILED,
            start=injection.sent_at,
            end=injection.done_at,
            reason=f"{injection.error}: {injection.response}" if injection.response else injection.error,
            after=hop.after,
            evidence={
                "searched": {"sink": hop.sink},
                "near_misses": 0,
                "blind": [],
                "injection": {
                    "status": injection.status,
                    "error": injection.error,
                    "response": injection.response,
                },
            },
        )

    async def _await_hops(
        self,
        step_name: str,
        hops: list[HopSpec],
        watches: dict[str, Watch],
        injection: Injection,
        inflight: InFlight | None = None,
        on_hop: OnHop | None = None,
    ) -> list[HopResult]:
        prior = inflight.done if inflight is not None else {}
        registered = inflight.registered_at if inflight is not None else -math.inf
        if len(hops) == 1 and not prior:  # the common case: no futures, no gather, no closure
            result = await self._await_hop(
                step_name, hops[0], watches[hops[0].name], injection, {}, registered
            )
            if inflight is not None:
                inflight.done[hops[0].name] = result
                if on_hop is not None:
                    on_hop(inflight, result)
            return [result]
        loop = asyncio.get_running_loop()
        needed = {h.after for h in hops if h.after}  # futures only for hops another one starts from
        done: dict[str, asyncio.Future[HopResult]] = {
            h.name: loop.create_future() for h in hops if h.name in needed
        }
        for name, result in prior.items():
            if name in done:
                done[name].set_result(result)

        async def one(hop: HopSpec) -> HopResult:
            if hop.name in prior:
                return prior[hop.name]
            result = await self._await_hop(step_name, hop, watches[hop.name], injection, done, registered)
            if hop.name in done:
                done[hop.name].set_result(result)
            if inflight is not None:
                inflight.done[hop.name] = result
                if on_hop is not None:
                    on_hop(inflight, result)
            return result

        return list(await asyncio.gather(*(one(h) for h in hops)))

    async def _await_hop(
        self,
        step_name: str,
        hop: HopSpec,
        watch: Watch,
        injection: Injection,
        done: dict[str, asyncio.Future[HopResult]],
        registered_at: float = -math.inf,
    ) -> HopResult:
        collector = self.collectors[hop.sink]
        deadline = self.spec.deadline(hop)
        start, inherited_error = injection.sent_at, 0.0
        result = HopResult(
            step=step_name,
            hop=hop.name,
            sink=hop.sink,
            target=hop.target,
            deadline=deadline,
            verdict=UNKNOWN,
            start=start,
            end=start,
            after=hop.after,
        )
        if hop.after:
            ref = await done[hop.after]
            if ref.lag is None:
                result.start = result.end = ref.end
                result.reason = f"no start point: hop '{hop.after}' was {ref.verdict}"
                return result
            start, inherited_error = ref.end, ref.error_bar or 0.0
            result.start = start
        deadline_at = start + deadline
        # A probe seen within late_grace after its deadline is late (with its lag), not lost.
        await watch.wait_seen(deadline_at + hop.late_grace - clock.now(), collector.coverage)
        if watch.first is not None and watch.missing_sources():
            # Push and poll both configured: let the slower one report too, for the comparison.
            await watch.wait_other_sources(min(deadline_at - clock.now(), max(2.0, 3 * collector.error_bar)))
        self._stall_check()
        certified = True
        if watch.first is None and not watch.settled:
            # Give the collector a chance to look past the deadline before calling it lost.
            grace = max(5.0, 3 * collector.error_bar)
            # A resumed probe's deadline may be past already: only a look made after its watch
            # was registered again can certify it.
            certify_at = max(deadline_at, registered_at)
            certified = await collector.coverage.wait_certified(certify_at, grace)
        obs = watch.first
        if hop.expect == "absent":
            result.verdict, result.reason = judge_absent(obs, start, deadline, collector.coverage, certified)
        else:
            result.verdict, result.reason = judge_present(
                obs, start, hop.target, deadline, collector.coverage, certified
            )
            result.undecided = result.verdict == UNKNOWN and obs is not None
            if result.verdict == LOST and obs is not None and obs.at - start <= deadline + hop.late_grace:
                result.verdict = LATE
                result.reason = (
                    f"arrived {obs.at - start - deadline:.2f}s after the {deadline:g}s deadline, "
                    f"within its {hop.late_grace:g}s late_grace"
                )
        if obs is None and watch.settled_reason and result.verdict == LOST:
            result.reason = watch.settled_reason
        if obs is not None:
            result.end = max(obs.at, start)
            result.lag = result.end - start
            result.error_bar = obs.error_bar + inherited_error
            result.sink_lag = sink_lag(obs, start)
            result.sources = {o.source: round(o.at - start, 6) for o in watch.observations}
            result.detail = dict(obs.detail)
        else:
            result.end = deadline_at
            result.error_bar = collector.error_bar
        if result.verdict != OK:
            evidence = await self._evidence(collector, watch, hop, start, min(result.end, clock.now()))
            result.evidence = evidence.to_json()
            result.reason = sentence(result.verdict, evidence, result.reason)
        return result

    async def _evidence(
        self, collector: Collector, watch: Watch, hop: HopSpec, start: float, end: float
    ) -> Evidence:
        """What was searched for and when the collector was blind; the collector adds what it
        held instead (``Explains``). Never raises: evidence must not cost a verdict."""
        wanted = hop.sink_spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        base = Evidence(
            searched={"sink": hop.sink, **watch.probe.render(wanted), "window": window(start, end)},
            blind=blind_json(collector.coverage.blind_windows(start, end)),
        )
        if collector.coverage.broken and not base.blind:
            base.blind = blind_json([(start, end, collector.coverage.broken)])
        if not isinstance(collector, Explains):
            return base
        try:
            return await asyncio.wait_for(collector.explain(watch, start, end, base), timeout=15.0)
        except Exception as exc:  # a broken explanation is logged, the verdict stands
            log.warning("%s: no evidence for %s (%s)", hop.sink, watch.trace_id, type(exc).__name__)
            return base

    # -- the launch gate ------------------------------------------------------
    def plan(
        self, samples: int | None = None, quantile: float | None = None, confidence: float | None = None
    ) -> dict[str, int]:
        """Probes per step: ``samples`` if given, else what the hops' objectives need."""
        return {
            name: samples or max(h.objective_for(quantile, confidence).needed() for h in step.hops)
            for name, step in self.spec.steps.items()
        }

    async def check(
        self,
        samples: int | None = None,
        on_result: Callable[[ProbeResult], None] | None = None,
        *,
        quantile: float | None = None,
        confidence: float | None = None,
        early_stop: bool = True,
    ) -> list[ProbeResult]:
        """Probes per step as ``plan`` says. Within a step, at most ``check_concurrency``
        probes are in flight and starts are ``check_interval`` apart (a launch gate is no load
        test). With ``early_stop`` a step stops injecting as soon as its outcome cannot change
        (see ``_StepTally``).

        Steps judged only by the injection's own response (API latency) run first, one at a
        time: the tracer's other probes, and the work they cause in the funnel, would otherwise
        be in the latencies they measure. The other steps then run side by side."""
        plan = self.plan(samples, quantile, confidence)

        def run(name: str) -> Any:
            return self._check_step(name, plan[name], on_result, quantile, confidence, early_stop)

        latency = [n for n in self.spec.steps if self._response_only(n)]
        out: list[ProbeResult] = []
        for name in latency:
            out += await run(name)
        per_step = await asyncio.gather(*(run(n) for n in self.spec.steps if n not in latency))
        return out + [r for results in per_step for r in results]

    def _response_only(self, step_name: str) -> bool:
        return all(
            isinstance(self.collectors[h.sink], ObservesInjection) for h in self.spec.steps[step_name].hops
        )

    async def _check_step(
        self,
        name: str,
        n: int,
        on_result: Callable[[ProbeResult], None] | None,
        quantile: float | None,
        confidence: float | None,
        early_stop: bool,
    ) -> list[ProbeResult]:
        step = self.spec.steps[name]
        tally = _StepTally({h.name: h.objective_for(quantile, confidence) for h in step.hops}, n)
        slots = asyncio.Semaphore(self.spec.check_concurrency(name))
        interval = self.spec.check_interval(name)
        decided = asyncio.Event()
        loop = asyncio.get_running_loop()
        timers: list[asyncio.TimerHandle] = []

        def recheck() -> None:
            if early_stop and tally.decided():
                decided.set()

        def arm(inflight: InFlight) -> None:
            """A hop measured from injection, not seen by a good look made after its target, with
            no blind moment since injection, will be late or lost: count it as exceeded already,
            so a clearly late funnel fails after a few probes rather than after their deadlines.
            (Not seen *yet* at the target is not enough: the next look may find it arrived in
            time, which is unknown, not late.)"""
            assert inflight.injection is not None
            sent = inflight.injection.sent_at
            for hop in step.hops:
                if hop.after or hop.expect != "present" or not inflight.injection.ok:
                    continue
                w = inflight.watches[hop.name]

                def due(w: Watch = w, hop_name: str = hop.name, moment: float = sent + hop.target) -> None:
                    self._stall_check()
                    if w.first is not None or w.settled:
                        return
                    coverage = self.collectors[w.sink].coverage
                    if coverage.blind_start(sent, clock.now()) is not None or coverage.blind_now:
                        return  # whatever comes of it, it will not be a certain late
                    if coverage.certified < moment:
                        timers.append(loop.call_later(0.1, due))  # the look past the target is to come
                        return
                    tally.provisional(hop_name, inflight)
                    recheck()

                timers.append(loop.call_later(max(0.0, sent + hop.target - clock.now()), due))

        async def one() -> ProbeResult:
            try:
                res = await self.run_probe(name, on_injected=arm)
            finally:
                slots.release()
            tally.resolved(res)
            recheck()
            if on_result:
                on_result(res)
            return res

        tasks: list[asyncio.Task[ProbeResult]] = []
        next_at = clock.now()
        self._wakers.add(decided)  # stop() wakes the loop, which then starts nothing more
        for _ in range(n):
            if self.stopping.is_set():
                break
            await slots.acquire()
            if not decided.is_set() and next_at > clock.now():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(decided.wait(), next_at - clock.now())
            if decided.is_set() or self.stopping.is_set():
                slots.release()
                break
            next_at = max(next_at, clock.now()) + interval
            tally.started += 1
            tasks.append(asyncio.create_task(one()))
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            self._wakers.discard(decided)
            for t in timers:
                t.cancel()

    async def read_gauges(self) -> dict[str, list[Reading]]:
        """Every gauge, ``readings`` times ``spacing`` apart, side by side."""
        assert self.http is not None, "start() first"

        async def one(name: str) -> tuple[str, list[Reading]]:
            g = self.spec.gauges[name]
            out = []
            for i in range(g.readings):
                if i:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), g.spacing)
                if self.stopping.is_set():
                    break
                out.append(await self.read_gauge(name))
            return name, out

        return dict(await asyncio.gather(*(one(n) for n in self.spec.gauges)))

    async def read_gauge(self, name: str) -> Reading:
        assert self.http is not None, "start() first"
        try:
            return Reading(await read_gauge(self.spec.gauges[name], self.http), clock.wall(clock.now()))
        except GaugeError as exc:
            return Reading(None, clock.wall(clock.now()), str(exc))

    def expected_duration(self, samples: int | None = None) -> float:
        """Rough upper bound of a check's wall time, for progress displays."""
        plan = self.plan(samples)

        def one(name: str) -> float:
            s = self.spec.steps[name]
            return max(0, plan[name] - 1) * self.spec.check_interval(name) + sum(
                self.spec.deadline(h) + h.late_grace for h in s.hops
            )

        first = sum(one(n) for n in self.spec.steps if self._response_only(n))
        return first + max((one(n) for n in self.spec.steps if not self._response_only(n)), default=0.0)


class _StepTally:
    """What a step's probes showed so far, per hop, to tell when its outcome is fixed.

    ``decided``: some hop's claim fails however the rest turns out (the step fails). In-flight
    probes count as their best case, except those already past their target unseen
    (``provisional``), which count as exceeded.
    """

    def __init__(self, objectives: dict[str, stats.Objective], planned: int) -> None:
        self.objectives = objectives
        self.planned = planned
        self.started = 0
        self.done = 0
        self.valid = dict.fromkeys(objectives, 0)
        self.exceeded = dict.fromkeys(objectives, 0)
        self.lost = dict.fromkeys(objectives, 0)
        self.undecided = dict.fromkeys(objectives, 0)
        self._early: dict[str, set[int]] = {h: set() for h in objectives}

    def provisional(self, hop: str, inflight: InFlight) -> None:
        self._early[hop].add(id(inflight.probe))

    def resolved(self, res: ProbeResult) -> None:
        self.done += 1
        for h in res.hops:
            self._early[h.hop].discard(id(res.probe))
            if h.undecided:
                self.valid[h.hop] += 1
                self.undecided[h.hop] += 1
                continue
            if h.verdict in (UNKNOWN, INJECT_FAILED):
                continue
            self.valid[h.hop] += 1
            if h.verdict in (LATE, LOST, BREACH):
                self.exceeded[h.hop] += 1
            if h.verdict == LOST:
                self.lost[h.hop] += 1

    def decided(self) -> bool:
        """True when some hop's claim fails however the remaining probes turn out. A claim bound
        to stay inconclusive does not stop the step: the samples asked for still describe the
        funnel (percentiles, evidence) even when they cannot prove the objective."""
        pending = self.planned - self.done
        for hop, obj in self.objectives.items():
            early = len(self._early[hop])
            outcome = stats.fixed_outcome(
                obj,
                self.valid[hop] + early,
                self.exceeded[hop] + early,
                self.lost[hop],
                pending - early,
                self.undecided[hop],
            )
            if outcome == stats.FAIL:
                return True
        return False
