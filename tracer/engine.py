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
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from opentelemetry.sdk.trace import TracerProvider

from tracer import clock
from tracer.export.spans import emit_probe, get_tracer, make_provider
from tracer.inject import CleanupOutcome, Injection
from tracer.inject import auth as inject_auth
from tracer.plugins import Cleans, Collector, Connects, InjectContext, Injector
from tracer.probe import Probe
from tracer.spec import CLEANUP_PLUGIN, INJECTOR_PLUGINS, SINK_PLUGINS, FunnelSpec, HopSpec
from tracer.verdict import INJECT_FAILED, LOST, UNKNOWN, HopResult, judge_absent, judge_present, sink_lag
from tracer.watch import Watch

log = logging.getLogger(__name__)


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

    def sinks(self) -> list[str]:
        """The sinks the steps use, plus those their configs need (PostHog push: the webhook receiver)."""
        used = {hop.sink for step in self.spec.steps.values() for hop in step.hops}
        for sink in list(used):
            used.update(n.sink for n in SINK_PLUGINS[sink].needs(getattr(self.spec.collectors, sink)))
        return sorted(used)

    async def start(self) -> None:
        self.http = httpx.AsyncClient(headers={"User-Agent": "funnel-tracer"}, follow_redirects=False)
        self.auth = inject_auth.build(dict(self.spec.auth), self.http)
        ctx = self.ctx = InjectContext(http=self.http, synthetic=self.spec.canary.synthetic, auth=self.auth)
        for name, step in self.spec.steps.items():
            self.injectors[name] = INJECTOR_PLUGINS[step.inject.kind].factory(step.inject.config, ctx)
        for sink in self.sinks():
            collector = SINK_PLUGINS[sink].factory(getattr(self.spec.collectors, sink))
            await collector.start()
            self.collectors[sink] = collector
        for collector in self.collectors.values():
            if isinstance(collector, Connects):
                collector.connect(self.collectors)

    async def close(self) -> None:
        for c in self.collectors.values():
            await c.close()
        for i in self.injectors.values():
            await i.close()
        if self.http is not None:
            await self.http.aclose()
        if self._own_provider:
            self.provider.shutdown()  # flushes pending spans
        else:
            self.provider.force_flush(5000)

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
        inflight.injection = await self.injectors[inflight.step].send(inflight.probe)
        return inflight.injection

    async def finish(self, inflight: InFlight, on_hop: OnHop | None = None) -> ProbeResult:
        """Await every hop not resolved yet, judge, export the trace. Each hop's result is kept
        on ``inflight.done`` (and handed to ``on_hop``) as soon as it resolves."""
        step = self.spec.steps[inflight.step]
        injection = inflight.injection
        assert injection is not None, "inject() first"
        try:
            if injection.ok:
                hops = await self._await_hops(
                    inflight.step, step.hops, inflight.watches, injection, inflight, on_hop
                )
            else:
                hops = [self._inject_failed(inflight.step, hop, injection) for hop in step.hops]
        finally:
            self.release(inflight)
        if inflight.injection_unknown:
            for h in hops:
                if h.verdict == LOST:  # we cannot tell whether the probe ever reached the funnel
                    h.verdict = UNKNOWN
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
        step = self.spec.steps[inflight.step]
        injection = inflight.injection or Injection(
            inflight.probe.created_at, clock.now(), ok=False, error="canary stopped before injecting"
        )
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
        emit_probe(self.tracer, inflight.probe, injection, hops, self.spec.service)
        return ProbeResult(inflight.probe, injection, hops, resumed=inflight.resumed)

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
            reason=injection.error,
            after=hop.after,
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
        await watch.wait_seen(deadline_at - clock.now())
        if watch.first is not None and watch.missing_sources():
            # Push and poll both configured: let the slower one report too, for the comparison.
            await watch.wait_other_sources(min(deadline_at - clock.now(), max(2.0, 3 * collector.error_bar)))
        certified = True
        if watch.first is None:
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
        return result

    # -- the launch gate ------------------------------------------------------
    async def check(
        self, samples: int, on_result: Callable[[ProbeResult], None] | None = None
    ) -> list[ProbeResult]:
        """``samples`` probes per step, spaced by each step's ``spacing``; steps run side by side."""

        async def step_run(name: str) -> list[ProbeResult]:
            tasks = []
            for i in range(samples):
                if i:
                    await asyncio.sleep(self.spec.steps[name].spacing)
                tasks.append(asyncio.create_task(self.run_probe(name)))
                if on_result:
                    tasks[-1].add_done_callback(
                        lambda t: t.cancelled() or t.exception() or on_result(t.result())
                    )
            return list(await asyncio.gather(*tasks))

        per_step = await asyncio.gather(*(step_run(n) for n in self.spec.steps))
        return [r for results in per_step for r in results]

    def expected_duration(self, samples: int) -> float:
        """Rough upper bound of a check's wall time, for progress displays."""
        return max(
            (samples - 1) * s.spacing + sum(self.spec.deadline(h) for h in s.hops)
            for s in self.spec.steps.values()
        )
