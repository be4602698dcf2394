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
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import collectors
from tracer import clock
from tracer.export.spans import get_tracer, make_provider, trace_id_for_next_root
from tracer.inject import Injection
from tracer.inject import http as http_injector
from tracer.probe import Probe
from tracer.spec import FunnelSpec, HopSpec
from tracer.verdict import FAILING, INJECT_FAILED, UNKNOWN, HopResult, judge_absent, judge_present, sink_lag
from tracer.watch import Watch

log = logging.getLogger(__name__)
_propagator = TraceContextTextMapPropagator()


@dataclass
class ProbeResult:
    probe: Probe
    injection: Injection
    hops: list[HopResult]


class Engine:
    def __init__(self, spec: FunnelSpec, provider: TracerProvider | None = None) -> None:
        self.spec = spec
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
        self.provider.force_flush(5000)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- one probe ----------------------------------------------------------
    async def run_probe(self, step_name: str) -> ProbeResult:
        step = self.spec.steps[step_name]
        probe = Probe(step=step_name)
        begin = clock.now()
        common = {"funnel.step": step_name, "funnel.probe_id": probe.probe_id, "funnel.synthetic": True,
                  "funnel.service": self.spec.service}
        with trace_id_for_next_root(probe.trace_id):
            root = self.tracer.start_span(f"probe {step_name}", start_time=clock.wall_ns(begin), attributes=common)
        root_ctx = trace.set_span_in_context(root)

        watches = {hop.name: Watch(probe=probe, hop=hop, since=begin) for hop in step.hops}
        for w in watches.values():
            self.collectors[w.sink].watch(w)
        try:
            injection = await self._inject(step_name, probe, root_ctx)
            if injection.ok:
                hops = await self._await_hops(step_name, step.hops, watches, injection)
            else:
                hops = [self._inject_failed(step_name, hop, injection) for hop in step.hops]
        finally:
            for w in watches.values():
                self.collectors[w.sink].unwatch(w)

        for result in hops:
            self._hop_span(result, root_ctx, common)
        failing = [h for h in hops if h.verdict in FAILING]
        root.set_attribute("funnel.verdict", failing[0].verdict if failing else _worst(hops))
        if failing:
            root.set_status(Status(StatusCode.ERROR, f"{len(failing)} hop(s) {failing[0].verdict}"))
        root.end(end_time=clock.wall_ns(max([injection.done_at, *(h.end for h in hops)])))
        return ProbeResult(probe, injection, hops)

    async def _inject(self, step_name: str, probe: Probe, root_ctx: Context) -> Injection:
        spec = self.spec.steps[step_name].inject
        if spec.kind == "http":
            assert spec.http is not None and self.http is not None
            span = self.tracer.start_span(
                spec.http.method, context=root_ctx, kind=SpanKind.CLIENT, start_time=clock.wall_ns(clock.now())
            )
            carrier: dict[str, str] = {}
            _propagator.inject(carrier, context=trace.set_span_in_context(span))
            injection = await http_injector.send(self.http, spec.http, probe, carrier)
        else:
            from tracer.inject import redis_dlq

            assert spec.redis_dlq is not None
            span = self.tracer.start_span(
                "dlq inject", context=root_ctx, kind=SpanKind.PRODUCER, start_time=clock.wall_ns(clock.now())
            )
            injection = await redis_dlq.send(spec.redis_dlq, probe)
        span.set_attributes({**injection.attributes, "funnel.step": step_name, "funnel.synthetic": True})
        if not injection.ok:
            span.set_status(Status(StatusCode.ERROR, injection.error))
        span.end(end_time=clock.wall_ns(injection.done_at))
        return injection

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

    def _hop_span(self, r: HopResult, root_ctx: Context, common: dict[str, object]) -> None:
        attrs: dict[str, object] = {
            **common,
            "funnel.hop": r.hop,
            "funnel.sink": r.sink,
            "funnel.target_s": r.target,
            "funnel.deadline_s": r.deadline,
            "funnel.verdict": r.verdict,
        }
        if r.lag is not None:
            attrs["funnel.lag_s"] = r.lag
        if r.error_bar is not None:
            attrs["funnel.error_bar_s"] = r.error_bar
        if r.sink_lag is not None:
            attrs["funnel.sink_lag_s"] = r.sink_lag
        if r.after:
            attrs["funnel.after"] = r.after
        if r.reason:
            attrs["funnel.reason"] = r.reason
        for source, lag in r.sources.items():
            attrs[f"funnel.lag_s.{source}"] = lag
        span = self.tracer.start_span(f"hop {r.hop}", context=root_ctx, start_time=clock.wall_ns(r.start), attributes=attrs)
        if r.verdict in FAILING:
            span.set_status(Status(StatusCode.ERROR, r.reason or r.verdict))
        span.end(end_time=clock.wall_ns(max(r.end, r.start)))

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


def _worst(hops: list[HopResult]) -> str:
    order = ["breach", "lost", "late", "unknown", "inject_failed", "ok"]
    return min((h.verdict for h in hops), key=order.index)
