"""The ``funnel-tracer`` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from importlib import resources
from typing import Any

import click
from rich.console import Console

import tracer
from tracer.spec import FunnelSpec, SpecError, load_spec

EXAMPLES = """
\b
Examples:
  funnel-tracer demo                              # local sandbox, no setup
  funnel-tracer validate -c funnel.yaml
  funnel-tracer check -c funnel.yaml --samples 10 --junit report.xml
  funnel-tracer check -c funnel.yaml --format json | jq .steps
\b
Exit codes (check, demo):
  0  every hop within its freshness target
  1  a hop was late or lost, or a negative probe appeared (breach)
  2  invalid config or usage
  3  no breach seen, but some hop could not be measured (unknown, inject_failed)
"""

err = Console(stderr=True)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "posthog", "uvicorn.error", "mail.log"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _load(path: str) -> FunnelSpec:
    try:
        return load_spec(path)
    except SpecError as exc:
        err.print(f"[red]error:[/] {exc.source or path}: invalid funnel spec", highlight=False, soft_wrap=True)
        for where, message in exc.problems:
            err.print(f"  [bold]{where or '(top)'}[/]: {message}", highlight=False, soft_wrap=True)
        sys.exit(2)


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(tracer.__version__, prog_name="funnel-tracer")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """Is the revenue funnel fresh right now, and was it fresh enough to launch?

    funnel-tracer injects synthetic leads, payments and approvals, each carrying a W3C trace id,
    watches the sinks (PostHog, a Redis DLQ, webhooks, email) and measures the lag of every hop
    against its freshness target. Spans go out over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    """
    _setup_logging(verbose)


@main.command()
@click.option("-c", "--config", "config", required=True, type=click.Path(dir_okay=False), help="Funnel spec (YAML).")
def validate(config: str) -> None:
    """Check a funnel spec and exit: 0 valid, 2 invalid (each problem names its YAML path)."""
    spec = _load(config)
    hops = sum(len(s.hops) for s in spec.steps.values())
    click.echo(f"{config}: ok ({len(spec.steps)} steps, {hops} hops, sinks: {', '.join(_sinks(spec))})")


def _sinks(spec: FunnelSpec) -> list[str]:
    return sorted({h.sink for s in spec.steps.values() for h in s.hops})


def _output_options(f: Any) -> Any:
    f = click.option("--junit", type=click.Path(dir_okay=False, writable=True), help="Also write JUnit XML (one testcase per hop).")(f)
    f = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
                     help="table for people, json for machines (contract in the README).")(f)
    f = click.option("--trace-url", envvar="FUNNEL_TRACE_URL", default=None,
                     help="Per-probe trace link template, e.g. http://localhost:16686/trace/{trace_id}.")(f)
    return f


@main.command(epilog=EXAMPLES)
@click.option("-c", "--config", "config", required=True, type=click.Path(dir_okay=False), help="Funnel spec (YAML).")
@click.option("-n", "--samples", default=5, show_default=True, type=click.IntRange(1, 10_000), help="Probes per step.")
@click.option("--step", "steps", multiple=True, help="Only these steps (repeatable).")
@_output_options
def check(config: str, samples: int, steps: tuple[str, ...], fmt: str, junit: str | None, trace_url: str | None) -> None:
    """Run N probes per step, wait for every hop to resolve, report, and exit 0/1/2/3.

    Made for launch gates in CI: the exit code says whether the funnel was fresh.
    """
    spec = _load(config)
    if steps:
        unknown = [s for s in steps if s not in spec.steps]
        if unknown:
            raise click.UsageError(f"no such step: {', '.join(unknown)} (have: {', '.join(spec.steps)})")
        spec = spec.model_copy(update={"steps": {k: v for k, v in spec.steps.items() if k in steps}})
    sys.exit(run_check(spec, samples, fmt, junit, trace_url))


def run_check(spec: FunnelSpec, samples: int, fmt: str, junit: str | None, trace_url: str | None) -> int:
    from tracer.export.report import render_table, summarize, write_junit

    results = asyncio.run(_check(spec, samples))
    summary = summarize(spec, results, trace_url)
    if fmt == "json":
        click.echo(json.dumps(summary, indent=2))
    else:
        render_table(summary, Console() if sys.stdout.isatty() else Console(width=150))
    if junit:
        write_junit(summary, junit)
    return int(summary["exit_code"])


async def _check(spec: FunnelSpec, samples: int) -> list[Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from tracer.engine import Engine

    total = samples * len(spec.steps)
    async with Engine(spec) as engine:
        if not err.is_terminal:
            return await engine.check(samples)
        with Progress(TextColumn("[bold]probes"), BarColumn(), TextColumn("{task.completed}/{task.total} resolved"),
                      TimeElapsedColumn(), TextColumn("[dim]up to ~{task.fields[eta]:.0f}s"), console=err,
                      transient=True) as progress:
            task = progress.add_task("probes", total=total, eta=engine.expected_duration(samples))
            return await engine.check(samples, on_result=lambda _r: progress.advance(task))


@main.command(epilog=EXAMPLES)
@click.option("-n", "--samples", default=5, show_default=True, type=click.IntRange(1, 1000), help="Probes per step.")
@_output_options
@click.option("--lead-delay", default=0.2, show_default=True, help="Sandbox: seconds before the funnel emits each event.")
@click.option("--ingest-delay", default=0.3, show_default=True, help="Sandbox: seconds before PostHog makes an event queryable.")
def demo(samples: int, fmt: str, junit: str | None, trace_url: str | None, lead_delay: float, ingest_delay: float) -> None:
    """Start the sandbox funnel + a local PostHog on free ports, run `check` against them, clean up.

    Needs nothing beyond the install. The spec used is examples/sandbox.yaml.
    """
    from sandbox.funnel import Knobs
    from sandbox.posthog_server import PostHogState
    from sandbox.runner import Sandbox

    with Sandbox(knobs=Knobs(lead_delay=lead_delay), posthog=PostHogState(ingest_delay=ingest_delay)) as sb:
        os.environ["FUNNEL_URL"] = sb.url
        os.environ["POSTHOG_HOST"] = sb.posthog_url
        text = resources.files("tracer").joinpath("data/sandbox.yaml").read_text(encoding="utf-8")
        import yaml

        from tracer.spec import parse_spec

        spec = parse_spec(yaml.safe_load(text), "examples/sandbox.yaml")
        if fmt == "table":
            err.print(f"[dim]sandbox funnel {sb.url}, local PostHog {sb.posthog_url}; "
                      f"{samples} probe(s) per step[/]", highlight=False)
        code = run_check(spec, samples, fmt, junit, trace_url)
    sys.exit(code)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 only inside a container).")
@click.option("--port", default=8000, show_default=True, help="Funnel API port.")
@click.option("--posthog-port", default=8010, show_default=True, help="Local PostHog port.")
@click.option("--lead-delay", default=0.0, show_default=True, help="Seconds before the funnel emits lead_captured.")
@click.option("--drop-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Fraction of events never emitted.")
@click.option("--ingest-delay", default=0.0, show_default=True, help="Seconds before PostHog makes an event queryable.")
@click.option("--redis-url", envvar="REDIS_URL", default=None, help="Redis for the payment DLQ.")
def sandbox(host: str, port: int, posthog_port: int, lead_delay: float, drop_rate: float, ingest_delay: float,
            redis_url: str | None) -> None:
    """Run the reference funnel and a PostHog-compatible server until Ctrl-C."""
    import signal
    import threading

    from sandbox.funnel import Knobs
    from sandbox.posthog_server import PostHogState
    from sandbox.runner import Sandbox

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    knobs = Knobs(lead_delay=lead_delay, drop_rate=drop_rate)
    with Sandbox(host=host, port=port, posthog_port=posthog_port, knobs=knobs,
                 posthog=PostHogState(ingest_delay=ingest_delay), redis_url=redis_url) as sb:
        click.echo(f"funnel   {sb.url}  (POST /api/v1/leads)")
        click.echo(f"posthog  {sb.posthog_url}  (capture: /batch/, query: /api/projects/1/query/, key phx_sandbox)")
        click.echo("Ctrl-C to stop.")
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
