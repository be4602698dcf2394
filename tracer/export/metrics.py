"""Canary metrics through the OTel metrics SDK: OTLP (standard ``OTEL_*`` variables) and an
in-memory reader rendered as Prometheus text for the canary's own ``/metrics``.

Instruments (OTel name -> Prometheus name):

=====================================  ============================================  =================
funnel.probes            counter       funnel_probes_total{step,hop,sink,verdict}     resolved hops
funnel.probes.started    counter       funnel_probes_started_total{step}              injected probes
funnel.probes.skipped    counter       funnel_probes_skipped_total{step,reason}       cap hit, loop stalled
funnel.probes.in_flight  updown        funnel_probes_in_flight{step}
funnel.hop.lag           histogram (s) funnel_hop_lag_seconds{step,hop,sink}          ok and late hops
funnel.collector.up      gauge         funnel_collector_up{sink}                      1 up, 0 blind
funnel.collector.last_success_timestamp  funnel_collector_last_success_timestamp_seconds{sink}
funnel.collector.query_budget_used     funnel_collector_query_budget_used{sink,window}  fraction of limit
funnel.collector.queries counter       funnel_collector_queries_total{sink,outcome}
funnel.collector.rejected counter      funnel_collector_rejected_total{sink,reason}   receivers: turned away
funnel.ledger.up         gauge         funnel_ledger_up{kind}
funnel.gauge.value       gauge         funnel_gauge_value{step,gauge}                 a gauge's last good reading
funnel.alerts.sent       counter       funnel_alerts_sent_total{kind,type,outcome}
=====================================  ============================================  =================

The lag histogram of each hop has its own bucket bounds, placed around the hop's target (the
target itself is a bound, so "fraction within target" is an exact bucket read): one meter per
hop carries the bounds as the instrument's advisory. Lags of ``unknown`` hops are upper bounds
with an error bar from a blind window, so they are not recorded.

Observable values (collector health, budget) come from a snapshot the canary refreshes on its
own event loop (``refresh``), so the OTLP reader's thread never touches collector internals.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.resources import Resource

import tracer
from tracer import clock
from tracer.export import otlp
from tracer.verdict import LATE, OK

if TYPE_CHECKING:
    from tracer.engine import ProbeResult
    from tracer.spec import FunnelSpec

_FACTORS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0)


def lag_buckets(target: float, deadline: float) -> list[float]:
    """Bucket bounds around a hop's target: dense near it, the target and deadline exact."""
    bounds = {round(target * f, 3) for f in _FACTORS} | {round(deadline, 3)}
    return sorted(b for b in bounds if b > 0)


def otlp_metrics_configured() -> bool:
    return otlp.configured("metrics")


def otlp_metric_exporter() -> MetricExporter:
    if otlp.protocol("metrics") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    return HttpExporter()


class CanaryMetrics:
    def __init__(self, spec: FunnelSpec, resource: Resource, exporter: MetricExporter | None = None) -> None:
        self.spec = spec
        self.resource = resource
        self.memory = InMemoryMetricReader()
        readers: list[MetricReader] = [self.memory]
        with otlp.from_env("metrics"):
            if exporter is None and otlp_metrics_configured():
                exporter = otlp_metric_exporter()
            self.exporting = exporter is not None
            if exporter is not None:
                readers.append(PeriodicExportingMetricReader(exporter))  # OTEL_METRIC_EXPORT_INTERVAL
            self.provider = MeterProvider(resource=resource, metric_readers=readers)
        meter = self.provider.get_meter("funnel-tracer", tracer.__version__)
        self._probes = meter.create_counter(
            "funnel.probes", unit="{probe}", description="resolved hops by verdict"
        )
        self._started = meter.create_counter(
            "funnel.probes.started", unit="{probe}", description="probes injected"
        )
        self._skipped = meter.create_counter(
            "funnel.probes.skipped",
            unit="{probe}",
            description="probe slots not kept: a concurrency cap was hit or the event loop stalled",
        )
        self._in_flight = meter.create_up_down_counter(
            "funnel.probes.in_flight", unit="{probe}", description="probes injected and not resolved yet"
        )
        self._alerts = meter.create_counter(
            "funnel.alerts.sent", unit="{alert}", description="alert webhook posts"
        )
        self._lag: dict[tuple[str, str], Any] = {}
        for step_name, step in spec.steps.items():
            for hop in step.hops:
                hop_meter = self.provider.get_meter(
                    f"funnel-tracer/lag/{step_name}/{hop.name}", tracer.__version__
                )
                self._lag[(step_name, hop.name)] = hop_meter.create_histogram(
                    "funnel.hop.lag",
                    unit="s",
                    description="lag of a hop, ok and late probes (upper bound; see funnel.error_bar_s on spans)",
                    explicit_bucket_boundaries_advisory=lag_buckets(hop.target, spec.deadline(hop)),
                )
        self._snap: dict[str, Any] = {"collectors": {}, "ledger": None}
        meter.create_observable_gauge(
            "funnel.collector.up",
            [self._obs_up],
            unit="1",
            description="1 when the collector can see its sink",
        )
        meter.create_observable_gauge(
            "funnel.collector.last_success_timestamp",
            [self._obs_last],
            unit="s",
            description="epoch seconds up to which the collector's last successful look saw everything",
        )
        meter.create_observable_gauge(
            "funnel.collector.query_budget_used",
            [self._obs_budget],
            unit="1",
            description="fraction of the sink's query rate limit used in the window (PostHog: per minute, per hour)",
        )
        meter.create_observable_counter(
            "funnel.collector.queries",
            [self._obs_queries],
            unit="{query}",
            description="queries sent by polling collectors",
        )
        meter.create_observable_counter(
            "funnel.collector.rejected",
            [self._obs_rejected],
            unit="{request}",
            description="requests, connections or mails a push receiver turned away, by reason",
        )
        meter.create_observable_gauge(
            "funnel.ledger.up",
            [self._obs_ledger],
            unit="1",
            description="1 when the ledger (Redis) is reachable",
        )
        meter.create_observable_gauge(
            "funnel.gauge.value",
            [self._obs_gauges],
            unit="1",
            description="last good reading of each gauge (DLQ depth, failure counts); thresholds in the spec",
        )
        self._gauges: dict[str, float] = {}
        self._budget_samples: dict[str, deque[tuple[float, int]]] = {}

    # -- events from the canary ---------------------------------------------------------------
    def started(self, step: str) -> None:
        self._started.add(1, {"step": step})
        self._in_flight.add(1, {"step": step})

    def in_flight(self, step: str, delta: int) -> None:
        self._in_flight.add(delta, {"step": step})

    def skipped(self, step: str, reason: str, n: int = 1) -> None:
        self._skipped.add(n, {"step": step, "reason": reason})

    def resolved(self, result: ProbeResult) -> None:
        self._in_flight.add(-1, {"step": result.probe.step})
        for h in result.hops:
            self._probes.add(1, {"step": h.step, "hop": h.hop, "sink": h.sink, "verdict": h.verdict})
            hist = self._lag.get((h.step, h.hop))
            if hist is not None and h.lag is not None and h.verdict in (OK, LATE):
                hist.record(h.lag, {"step": h.step, "hop": h.hop, "sink": h.sink})

    def alert_sent(self, kind: str, type_: str, ok: bool) -> None:
        self._alerts.add(1, {"kind": kind, "type": type_, "outcome": "sent" if ok else "failed"})

    def zero_series(self) -> None:
        """Create every step's and hop's series at 0 so dashboards and rate() see them from the start."""
        for step_name, step in self.spec.steps.items():
            self._started.add(0, {"step": step_name})
            self._in_flight.add(0, {"step": step_name})
            for reason in ("step_cap", "global_cap", "stalled"):
                self._skipped.add(0, {"step": step_name, "reason": reason})
            for hop in step.hops:
                for verdict in ("ok", "late", "lost", "unknown"):
                    self._probes.add(
                        0, {"step": step_name, "hop": hop.name, "sink": hop.sink, "verdict": verdict}
                    )

    # -- snapshot of health, refreshed on the event loop --------------------------------------
    def refresh(self, collectors: dict[str, Any], ledger: Any | None) -> None:
        now = clock.now()
        snap: dict[str, Any] = {}
        for sink, c in collectors.items():
            try:
                health = dict(c.health())
            except Exception:  # a collector bug must not take metrics down
                health = {"up": False}
            certified = c.coverage.certified
            entry = {
                "up": bool(health.get("up")),
                "last_success": clock.wall(certified) if math.isfinite(certified) else None,
            }
            if isinstance(health.get("rejected"), dict):
                entry["rejected"] = {str(k): int(v) for k, v in health["rejected"].items()}
            if "queries" in health:
                entry["queries"] = int(health.get("queries") or 0)
                entry["failed_queries"] = int(health.get("failed_queries") or 0)
                samples = self._budget_samples.setdefault(sink, deque())
                samples.append((now, entry["queries"]))
                while samples and samples[0][0] < now - 3600:
                    samples.popleft()
                cfg = getattr(c, "config", None)
                per_min, per_hour = (
                    getattr(cfg, "queries_per_minute", None),
                    getattr(cfg, "queries_per_hour", None),
                )
                entry["budget"] = {
                    "1m": _used(samples, now, 60) / per_min if per_min else None,
                    "1h": _used(samples, now, 3600) / per_hour if per_hour else None,
                }
            snap[sink] = entry
        self._snap = {
            "collectors": snap,
            "ledger": {"kind": ledger.kind, "up": ledger.up} if ledger else None,
        }

    def _obs_up(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1 if e["up"] else 0, {"sink": s}) for s, e in self._snap["collectors"].items()]

    def _obs_last(self, _: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(e["last_success"], {"sink": s})
            for s, e in self._snap["collectors"].items()
            if e["last_success"] is not None
        ]

    def _obs_budget(self, _: CallbackOptions) -> Iterable[Observation]:
        out = []
        for s, e in self._snap["collectors"].items():
            for window, value in (e.get("budget") or {}).items():
                if value is not None:
                    out.append(Observation(value, {"sink": s, "window": window}))
        return out

    def _obs_queries(self, _: CallbackOptions) -> Iterable[Observation]:
        out = []
        for s, e in self._snap["collectors"].items():
            if "queries" in e:
                out.append(Observation(e["queries"] - e["failed_queries"], {"sink": s, "outcome": "ok"}))
                out.append(Observation(e["failed_queries"], {"sink": s, "outcome": "failed"}))
        return out

    def _obs_rejected(self, _: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {"sink": s, "reason": reason})
            for s, e in self._snap["collectors"].items()
            for reason, n in (e.get("rejected") or {}).items()
        ]

    def gauge(self, name: str, value: float) -> None:
        """A good reading; a failed one keeps no value (the series goes stale, never reads 0)."""
        self._gauges[name] = value

    def _obs_gauges(self, _: CallbackOptions) -> Iterable[Observation]:
        # ``step`` is the gauge's name: a gauge is a step of its own kind (nothing is injected).
        return [Observation(v, {"step": n, "gauge": n}) for n, v in self._gauges.items()]

    def _obs_ledger(self, _: CallbackOptions) -> Iterable[Observation]:
        led = self._snap["ledger"]
        return [Observation(1 if led["up"] else 0, {"kind": led["kind"]})] if led else []

    # -- output -------------------------------------------------------------------------------
    def prometheus(self) -> str:
        return render_prometheus(self.memory.get_metrics_data(), self.resource)

    def shutdown(self, timeout_ms: float = 5000) -> None:
        """Final collection and export (OTLP), then stop."""
        self.provider.shutdown(timeout_millis=timeout_ms)


def _used(samples: deque[tuple[float, int]], now: float, window: float) -> int:
    """Queries in the last ``window`` seconds (or since the first sample, if younger)."""
    if not samples:
        return 0
    base = samples[0][1]
    for t, q in samples:
        if t >= now - window:
            break
        base = q
    return samples[-1][1] - base


# -- Prometheus text exposition format 0.0.4 -------------------------------------------------
def prom_name(name: str, unit: str | None, counter: bool) -> str:
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    if unit == "s" and not out.endswith("_seconds"):
        out += "_seconds"
    if counter:
        out += "_total"
    return out


def _label(key: str) -> str:
    k = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in key)
    return "_" + k if k[:1].isdigit() else k


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(attrs: dict[str, Any], extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = [(_label(k), v) for k, v in sorted(attrs.items())] + list(extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _num(v: float) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        if math.isnan(v):
            return "NaN"
        return repr(v)
    return str(v)


def render_prometheus(data: Any, resource: Resource) -> str:
    families: dict[str, dict[str, Any]] = {}
    for rm in getattr(data, "resource_metrics", None) or []:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                d = m.data
                if isinstance(d, Histogram):
                    kind = "histogram"
                elif isinstance(d, Sum):
                    kind = "counter" if d.is_monotonic else "gauge"
                elif isinstance(d, Gauge):
                    kind = "gauge"
                else:
                    continue
                name = prom_name(m.name, m.unit, kind == "counter")
                fam = families.setdefault(name, {"kind": kind, "help": m.description, "lines": []})
                lines: list[str] = fam["lines"]
                for p in d.data_points:
                    attrs = dict(p.attributes or {})
                    if kind == "histogram":
                        cum = 0
                        for bound, count in zip(
                            [*p.explicit_bounds, math.inf], p.bucket_counts, strict=False
                        ):
                            cum += count
                            le = "+Inf" if math.isinf(bound) else _num(float(bound))
                            lines.append(f"{name}_bucket{_labels(attrs, (('le', le),))} {cum}")
                        lines.append(f"{name}_sum{_labels(attrs)} {_num(float(p.sum))}")
                        lines.append(f"{name}_count{_labels(attrs)} {p.count}")
                    else:
                        lines.append(f"{name}{_labels(attrs)} {_num(p.value)}")
    out = ["# HELP target_info Target metadata", "# TYPE target_info gauge"]
    out.append(f"target_info{_labels(dict(resource.attributes))} 1")
    for name, fam in sorted(families.items()):
        base = name.removesuffix("_total") if fam["kind"] == "counter" else name
        out.append(f"# HELP {base} {_escape(fam['help'] or name)}")
        out.append(f"# TYPE {base} {fam['kind']}")
        out.extend(fam["lines"])
    return "\n".join(out) + "\n"
