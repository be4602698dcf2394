"""Preflight: catch setup mistakes before the first probe (``funnel-tracer doctor``, and the start
of ``check`` and ``canary``).

Each sink and injector plugin checks its own section (``SinkPlugin.preflight``,
``InjectorPlugin.preflight``); nothing is injected. A finding that ``blocks`` means the sink cannot
measure at all, so ``check`` marks that collector broken at once: its hops are ``unknown`` with
the cause, within seconds, never ``lost`` after a deadline.
"""

from __future__ import annotations

import asyncio

from tracer.plugins import Finding
from tracer.spec import INJECTOR_PLUGINS, SINK_PLUGINS, FunnelSpec

TIMEOUT = 20.0  # per plugin: a preflight that hangs is itself a finding


async def run(spec: FunnelSpec) -> dict[str, list[Finding]]:
    """Findings per section (``collectors.posthog``, ``steps.lead.inject``...), all checks at once."""
    jobs: dict[str, object] = {}
    hops_by_sink: dict[str, list[object]] = {}
    for step in spec.steps.values():
        for hop in step.hops:
            hops_by_sink.setdefault(hop.sink, []).append(hop.sink_spec)
    for sink, hops in sorted(hops_by_sink.items()):
        jobs[f"collectors.{sink}"] = SINK_PLUGINS[sink].preflight(spec.collector_config(sink), hops)
    for name, step in spec.steps.items():
        jobs[f"steps.{name}.inject"] = INJECTOR_PLUGINS[step.inject.kind].preflight(step.inject.config, name)
    results = await asyncio.gather(*(_bounded(where, job) for where, job in jobs.items()))
    return dict(zip(jobs, results, strict=True))


async def _bounded(where: str, job: object) -> list[Finding]:
    try:
        return await asyncio.wait_for(job, timeout=TIMEOUT)  # type: ignore[arg-type]
    except asyncio.TimeoutError:
        return [Finding(f"{where}: preflight", False, f"no answer within {TIMEOUT:g}s")]
    except Exception as exc:  # a plugin's bug is reported, not raised into the gate
        return [Finding(f"{where}: preflight", False, f"the check itself failed ({type(exc).__name__})")]


def problems(findings: dict[str, list[Finding]]) -> list[Finding]:
    return [f for fs in findings.values() for f in fs if not f.ok]


def blocked_sinks(findings: dict[str, list[Finding]]) -> dict[str, str]:
    """``{sink: why}`` for sinks a finding says cannot measure at all."""
    out: dict[str, str] = {}
    for where, fs in findings.items():
        if where.startswith("collectors."):
            for f in fs:
                if f.blocks and not f.ok:
                    out.setdefault(where.removeprefix("collectors."), f"{f.check}: {f.detail}")
    return out


def line(f: Finding) -> str:
    mark = "ok  " if f.ok else "FAIL"
    text = f"{mark} {f.check}" + (f" ({f.detail})" if f.detail else "")
    if not f.ok and f.fix:
        text += f"\n       fix: {f.fix}"
    return text
