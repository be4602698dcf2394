"""Runs probes through the pipeline: inject -> await -> verdict -> export.

One ``Engine`` owns the collectors for every sink the spec uses, an HTTP client for injection
and an OTel tracer provider. ``run_probe`` takes one probe end to end; ``check`` runs N probes per
step for the launch gate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from opentelemetry.sdk.trace import TracerProvider

import collectors
from tracer import clock
from tracer.export.spans import emit_probe, get_tracer, make_provider
from tracer.inject import Injection
from tracer.inject import http as http_injector
from tracer.probe import Probe
from tracer.spec import FunnelSpec, HopSpec, InjectSpec
from tracer.verdict import INJECT_FAILED, UNKNOWN, HopResult, judge_absent, judge_present, sink_lag
from tracer.watch import Watch

log = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    probe: Probe
    injection: Injection
    hops: list[HopResult]


class Engine:
    def __init__(self, spec: FunnelSpec, provider: TracerProvider | None = None) -> None:
        self.spec = spec
        self._own_provider = provider is None
        self.provider = provider or make_provider()
        self.tracer = get_tracer(self.provider)
        self.collectors: dict[str, collectors.Collector] = {}
        self.http: httpx.AsyncClient | None = None

    def sinks(self) -> list[str]:
        used = {hop.sink for step in self.spec.steps.values() for hop in step.hops}
        return sorted(used)

    async def start(self) -> None:
        self.http = httpx.AsyncClient(headers={"User-Agent": "funnel-tracer"}, follow_redirects=False)
        for sink in self.sinks():
            collector = collectors.build(sink, getattr(self.spec.collectors, sink))
            await collector.start()
            self.collectors[sink] = collector

    async def close(self) -> None:
        for c in self.collectors.values():
            await c.close()
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
    async def run_probe(self, step_name: str) -> ProbeResult:
        """Inject one probe, await every hop, judge, and export its trace."""
        step = self.spec.steps[step_name]
        probe = Probe(step=step_name)
        watches = {hop.name: Watch(probe=probe, hop=hop, since=probe.created_at) for hop in step.hops}
        for w in watches.values():
            self.collectors[w.sink].watch(w)
        try:
            injection = await self._inject(step.inject, probe)
            if injection.ok:
                hops = await self._await_hops(step_name, step.hops, watches, injection)
            else:
                hops = [self._inject_failed(step_name, hop, injection) for hop in step.hops]
        finally:
            for w in watches.values():
                self.collectors[w.sink].unwatch(w)
        emit_probe(self.tracer, probe, injection, hops, self.spec.service)
        return ProbeResult(probe, injection, hops)

    async def _inject(self, spec: InjectSpec, probe: Probe) -> Injection:
        if spec.http is not None:
            assert self.http is not None
            return await http_injector.send(self.http, spec.http, probe, {"traceparent": probe.traceparent})
        from tracer.inject import redis_dlq

        assert spec.redis_dlq is not None
        return await redis_dlq.send(spec.redis_dlq, probe)

    def _inject_failed(self, step_name: str, hop: HopSpec, injection: Injection) -> HopResult:
        return HopResult(
            step=step_name, hop=hop.name, sink=hop.sink, target=hop.target, deadline=self.spec.deadline(hop),
            verdict=INJECT_FAILED, start=injection.sent_at, end=injection.done_at, reason=injection.error, after=hop.after,
        )

    async def _await_hops(
        self, step_name: str, hops: list[HopSpec], watches: dict[str, Watch], injection: Injection
    ) -> list[HopResult]:
        done: dict[str, asyncio.Future[HopResult]] = {h.name: asyncio.get_running_loop().create_future() for h in hops}

        async def one(hop: HopSpec) -> HopResult:
            result = await self._await_hop(step_name, hop, watches[hop.name], injection, done)
            done[hop.name].set_result(result)
            return result

        return list(await asyncio.gather(*(one(h) for h in hops)))

    async def _await_hop(
        self, step_name: str, hop: HopSpec, watch: Watch, injection: Injection, done: dict[str, asyncio.Future[HopResult]]
    ) -> HopResult:
        collector = self.collectors[hop.sink]
        deadline = self.spec.deadline(hop)
        start, inherited_error = injection.sent_at, 0.0
        result = HopResult(step=step_name, hop=hop.name, sink=hop.sink, target=hop.target, deadline=deadline,
                           verdict=UNKNOWN, start=start, end=start, after=hop.after)
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
        certified = True
        if watch.first is None:
            # Give the collector a chance to look past the deadline before calling it lost.
            grace = max(5.0, 3 * collector.error_bar)
            certified = await collector.coverage.wait_certified(deadline_at, grace)
        obs = watch.first
        if hop.expect == "absent":
            result.verdict, result.reason = judge_absent(obs, start, deadline, collector.coverage, certified)
        else:
            result.verdict, result.reason = judge_present(obs, start, hop.target, deadline, collector.coverage, certified)
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
    async def check(self, samples: int, on_result: Callable[[ProbeResult], None] | None = None) -> list[ProbeResult]:
        """``samples`` probes per step, spaced by each step's ``spacing``; steps run side by side."""

        async def step_run(name: str) -> list[ProbeResult]:
            tasks = []
            for i in range(samples):
                if i:
                    await asyncio.sleep(self.spec.steps[name].spacing)
                tasks.append(asyncio.create_task(self.run_probe(name)))
                if on_result:
                    tasks[-1].add_done_callback(lambda t: t.cancelled() or t.exception() or on_result(t.result()))
            return list(await asyncio.gather(*tasks))

        per_step = await asyncio.gather(*(step_run(n) for n in self.spec.steps))
        return [r for results in per_step for r in results]

    def expected_duration(self, samples: int) -> float:
        """Rough upper bound of a check's wall time, for progress displays."""
        return max(
            (samples - 1) * s.spacing + sum(self.spec.deadline(h) for h in s.hops) for s in self.spec.steps.values()
        )

