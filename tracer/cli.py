"""The ``funnel-tracer`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

import tracer
from tracer.spec import FunnelSpec, SpecError, load_spec

EXAMPLES = """
\b
Examples:
  funnel-tracer demo                              # local sandbox, no setup
  funnel-tracer validate -c funnel.yaml
  funnel-tracer check -c funnel.yaml --junit report.xml      # as many probes as the claims need
  funnel-tracer check -c funnel.yaml --quantile 0.99          # p99 claims (299 probes per hop)
  funnel-tracer check -c funnel.yaml --format json | jq '.steps[].hops[].claim'
  funnel-tracer check -c funnel.yaml --format markdown --html review.html   # launch review
\b
Claims: each hop must show its objective (default: p95 within target with 95 % confidence,
distribution-free: 59 probes all within target; 93 if one exceeds; 299 for p99).
\b
Exit codes (check, demo):
  0  every claim passes (shown with its confidence) and every gauge is below ok_below
  1  a claim fails (disproven, or a negative probe appeared) or a gauge is over its threshold
  2  invalid config or usage, or a report could not be written (a claim that fails stays 1)
  3  nothing failed, but some claim is inconclusive (too few samples, too many unknown or
     inject_failed) or a gauge could not be read
"""

err = Console(stderr=True)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "httpcore", "posthog", "uvicorn.error", "mail.log"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _load(path: str) -> FunnelSpec:
    try:
        return load_spec(path)
    except SpecError as exc:
        if len(exc.problems) == 1 and not exc.problems[0][0]:  # about the file as a whole: one line
            err.print(
                f"[red]error:[/] {escape(str(exc.source or path))}: invalid funnel spec: "
                f"{escape(exc.problems[0][1])}",
                highlight=False,
                soft_wrap=True,
            )
            sys.exit(2)
        err.print(
            f"[red]error:[/] {escape(str(exc.source or path))}: invalid funnel spec",
            highlight=False,
            soft_wrap=True,
        )
        for where, message in exc.problems:
            # Messages may quote a pattern or a server's words: printed as text, never as markup.
            err.print(
                f"  [bold]{escape(where or '(top)')}[/]: {escape(message)}", highlight=False, soft_wrap=True
            )
        sys.exit(2)


class _Main(click.Group):
    """``--help`` ends with the sinks and injectors registered (entry points, see tracer.plugins)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        from tracer.spec import INJECTOR_PLUGINS, SINK_PLUGINS

        with formatter.section("Sinks (a 'collectors:' section, and one per hop)"):
            formatter.write_dl([(name, p.summary) for name, p in SINK_PLUGINS.items()])
        with formatter.section("Injectors (a step's 'inject:' section)"):
            formatter.write_dl([(name, p.summary) for name, p in INJECTOR_PLUGINS.items()])
        formatter.write_paragraph()
        formatter.write_text("Each section's options: the README's Configuration section and examples/.")


@click.group(
    cls=_Main,
    epilog=EXAMPLES,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
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
@click.option(
    "-c", "--config", "config", required=True, type=click.Path(dir_okay=False), help="Funnel spec (YAML)."
)
def validate(config: str) -> None:
    """Check a funnel spec and exit: 0 valid, 2 invalid (each problem names its YAML path)."""
    spec = _load(config)
    _warn_unauthenticated(spec)
    hops = sum(len(s.hops) for s in spec.steps.values())
    click.echo(f"{config}: ok ({len(spec.steps)} steps, {hops} hops, sinks: {', '.join(_sinks(spec))})")


def _warn_unauthenticated(spec: FunnelSpec) -> None:
    """``allow_unauthenticated: true`` is legal on loopback, but never silent."""
    for name in type(spec.collectors).model_fields:
        section = getattr(spec.collectors, name, None)
        if getattr(section, "allow_unauthenticated", False) and not getattr(section, "authenticated", True):
            err.print(
                f"[yellow]warning:[/] collectors.{name}: allow_unauthenticated: true, so any local "
                "process that learns a trace id can report a sighting",
                highlight=False,
                soft_wrap=True,
            )


def _sinks(spec: FunnelSpec) -> list[str]:
    return sorted({h.sink for s in spec.steps.values() for h in s.hops})


def _output_options(f: Any) -> Any:
    from tracer.export.report import DEFAULT_TRACE_URL_HELP

    f = click.option(
        "--junit",
        type=click.Path(dir_okay=False, writable=True),
        help="Also write JUnit XML (one testcase per hop).",
    )(f)
    f = click.option(
        "--html",
        "html_path",
        type=click.Path(dir_okay=False, writable=True),
        help="Also write a self-contained HTML launch-review report with a lag plot per hop.",
    )(f)
    f = click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "json", "markdown"]),
        default="table",
        show_default=True,
        help="table for people, json for machines (contract in the README), markdown for a launch review.",
    )(f)
    f = click.option(
        "--trace-url",
        envvar="FUNNEL_TRACE_URL",
        default=None,
        show_default=DEFAULT_TRACE_URL_HELP,
        help="Per-probe trace link template ({trace_id} is filled in; '' for no links). Env: FUNNEL_TRACE_URL.",
    )(f)
    return f


def _objective_options(f: Any) -> Any:
    f = click.option(
        "--confidence",
        type=click.FloatRange(0, 1, min_open=True, max_open=True),
        default=None,
        help="Override every hop's objective confidence (default per hop, 0.95).",
    )(f)
    return click.option(
        "--quantile",
        type=click.FloatRange(0, 1, min_open=True, max_open=True),
        default=None,
        help="Override every hop's objective quantile, e.g. 0.99 (default per hop, 0.95).",
    )(f)


@main.command(epilog=EXAMPLES)
@click.option(
    "-c", "--config", "config", required=True, type=click.Path(dir_okay=False), help="Funnel spec (YAML)."
)
@click.option(
    "-n",
    "--samples",
    default=None,
    type=click.IntRange(1, 10_000),
    help="Probes per step (default: what each step's objectives need, e.g. 59 for p95 at 95 %).",
)
@click.option("--step", "steps", multiple=True, help="Only these steps (repeatable).")
@click.option(
    "--no-preflight", is_flag=True, help="Skip the doctor's checks before the first probe (see `doctor`)."
)
@_objective_options
@_output_options
def check(
    config: str,
    samples: int | None,
    quantile: float | None,
    confidence: float | None,
    steps: tuple[str, ...],
    no_preflight: bool,
    fmt: str,
    junit: str | None,
    trace_url: str | None,
    html_path: str | None,
) -> None:
    """Run N probes per step, wait for every hop to resolve, report, and exit 0/1/2/3.

    Made for launch gates in CI: the exit code says whether the funnel was fresh.
    """
    spec = _load(config)
    if steps:
        unknown = [s for s in steps if s not in spec.steps]
        if unknown:
            raise click.UsageError(f"no such step: {', '.join(unknown)} (have: {', '.join(spec.steps)})")
        spec = spec.model_copy(update={"steps": {k: v for k, v in spec.steps.items() if k in steps}})
    sys.exit(
        run_check(
            spec, samples, fmt, junit, trace_url, html_path, quantile, confidence, preflight=not no_preflight
        )
    )


def run_check(
    spec: FunnelSpec,
    samples: int | None,
    fmt: str,
    junit: str | None,
    trace_url: str | None,
    html_path: str | None = None,
    quantile: float | None = None,
    confidence: float | None = None,
    preflight: bool = True,
) -> int:
    _telemetry_or_exit()
    _showable_or_exit(spec, quantile, confidence)
    from tracer.engine import StartError
    from tracer.export.otlp import TelemetryConfigError
    from tracer.export.report import default_trace_url, summarize

    _writable_or_exit(("--junit", junit), ("--html", html_path))
    # SIGTERM (CI cancelling the job) is an interrupt like Ctrl-C: during the probes it stops
    # the check with a partial report (``_check``), before them it ends it with one line.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        blocked = _preflight(spec) if preflight else {}
        interrupted: list[str] = []
        results, gauges, planned = asyncio.run(
            _check(spec, samples, quantile, confidence, blocked, interrupted)
        )
    except (StartError, TelemetryConfigError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("[red]interrupted[/] before the first probe: nothing measured (exit 3)", highlight=False)
        return 3
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = summarize(
        spec,
        results,
        default_trace_url() if trace_url is None else trace_url or None,
        quantile=quantile,
        confidence=confidence,
        gauges=gauges,
        planned=planned,
    )
    if interrupted:
        # Probes cut short are ``unknown`` and planned ones never started are missing: an
        # interrupted gate never passes, though a claim already disproven still fails.
        summary["interrupted"] = True
        if summary["exit_code"] == 0:
            summary["exit_code"], summary["ok"] = 3, False
    code = _report(summary, fmt, junit, html_path)
    if interrupted:
        err.print(
            f"[red]interrupted[/] by {interrupted[0]}: probes cut short are reported unknown (exit {code})",
            highlight=False,
            soft_wrap=True,
        )
    return code


def _report(summary: dict[str, Any], fmt: str, junit: str | None, html_path: str | None) -> int:
    """Print the report and write its files; the check's exit code, or 2 when some output could
    not be written (a full disk, a vanished directory: said in one line; a proven failure stays
    1). A reader that closed the pipe early (``| head -1``) changes nothing: the files are still
    written and the exit code is still the verdict's."""
    from tracer.export.report import junit_xml, render_table

    code = int(summary["exit_code"])
    failed = False
    try:
        if fmt == "json":
            click.echo(json.dumps(summary, indent=2))
        elif fmt == "markdown":
            from tracer.export.markdown import render_markdown

            click.echo(render_markdown(summary))
        else:
            render_table(summary, Console() if sys.stdout.isatty() else Console(width=150))
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()
    except OSError as exc:
        _stdout_gone()
        err.print(
            f"[red]error:[/] cannot write the report to stdout: {exc.strerror}",
            highlight=False,
            soft_wrap=True,
        )
        failed = True
    outputs: list[tuple[str, str | None, Any]] = [("--junit", junit, junit_xml)]
    if html_path:
        from tracer.export.html import render_html

        outputs.append(("--html", html_path, lambda s: render_html(s).encode()))
    for option, path, render in outputs:
        if path and not _write_output(option, path, render(summary)):
            failed = True
    return 2 if failed and code != 1 else code


def _stdout_gone() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _write_output(option: str, path: str, data: bytes) -> bool:
    """Write a report file; on failure say so in one line and leave no half-written regular
    file behind for CI to parse."""
    try:
        with open(path, "wb") as f:
            f.write(data)
        return True
    except OSError as exc:
        err.print(
            f"[red]error:[/] {option} {escape(path)}: cannot write: {exc.strerror}",
            highlight=False,
            soft_wrap=True,
        )
        with contextlib.suppress(OSError):
            if Path(path).is_file():
                Path(path).unlink()
        return False


def _showable_or_exit(spec: FunnelSpec, quantile: float | None, confidence: float | None) -> None:
    """``--quantile 0.999999 --confidence 0.999999``: no check runs the probes that would show
    it; a usage error (exit 2) before anything runs, not a traceback after the probes."""
    if quantile is None and confidence is None:
        return
    for step in spec.steps.values():
        for hop in step.hops:
            try:
                hop.objective_for(quantile, confidence).needed()
            except ValueError as exc:
                need = str(exc).replace(" samples needed", " probes")
                raise click.UsageError(
                    f"--quantile/--confidence: no check can show that objective (it needs {need}); lower them"
                ) from None


def _telemetry_or_exit() -> None:
    """The OTel SDK reads its span limits from OTEL_* at import and raises on a bad one: that is
    a configuration error (exit 2, one line), found before anything else runs."""
    from tracer.export.otlp import TelemetryConfigError, from_env

    try:
        with from_env("spans"):
            import opentelemetry.sdk.trace  # noqa: F401
    except TelemetryConfigError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


def _writable_or_exit(*outputs: tuple[str, str | None]) -> None:
    """Report files are checked before any probe runs: a bad path is a usage error (exit 2), not a
    finding discovered after a ten-minute gate."""
    for option, path in outputs:
        if not path:
            continue
        target = Path(path)
        existed = target.exists()
        try:
            with target.open("a", encoding="utf-8"):
                pass
        except OSError as exc:
            err.print(
                f"[red]error:[/] {option} {escape(str(path))}: cannot write: {escape(str(exc.strerror))}",
                highlight=False,
                soft_wrap=True,
            )
            sys.exit(2)
        if not existed:
            target.unlink()


def _preflight(spec: FunnelSpec) -> dict[str, str]:
    """The doctor's checks, before the first probe: problems go to stderr; the sinks that cannot
    measure at all are returned, so their hops become ``unknown`` at once."""
    from tracer import preflight

    findings = asyncio.run(preflight.run(spec))
    for f in preflight.problems(findings):
        err.print(f"[yellow]preflight:[/] {escape(preflight.line(f))}", highlight=False, soft_wrap=True)
    return preflight.blocked_sinks(findings)


async def _check(
    spec: FunnelSpec,
    samples: int | None,
    quantile: float | None,
    confidence: float | None,
    blocked: dict[str, str] | None = None,
    interrupted: list[str] | None = None,
) -> tuple[list[Any], dict[str, Any], dict[str, int]]:
    from tracer.engine import Engine

    async with Engine(spec) as engine:
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if engine.stopping.is_set():  # a second one: the user really wants out
                err.print(f"[red]{sig.name} again[/]: exiting without a report (exit 3)", highlight=False)
                os._exit(3)
            if interrupted is not None:
                interrupted.append(sig.name)
            err.print(
                f"[yellow]{sig.name}[/]: stopping; probes in flight end as unknown (again to exit at once)",
                highlight=False,
            )
            engine.stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        engine.block(blocked or {})
        planned = engine.plan(samples, quantile, confidence)
        # Gauges first: the check's own probes (synthetic DLQ entries) must not be in the levels.
        gauges = await engine.read_gauges()
        results = await _probes(engine, samples, quantile, confidence, sum(planned.values()))
        return results, gauges, planned


async def _probes(
    engine: Any, samples: int | None, quantile: float | None, confidence: float | None, total: int
) -> list[Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    kw = {"quantile": quantile, "confidence": confidence}
    if not err.is_terminal:
        return await engine.check(samples, **kw)
    with Progress(
        TextColumn("[bold]probes"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} resolved"),
        TimeElapsedColumn(),
        TextColumn("[dim]up to ~{task.fields[eta]:.0f}s"),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("probes", total=total, eta=engine.expected_duration(samples))
        return await engine.check(samples, on_result=lambda _r: progress.advance(task), **kw)


@main.command(epilog=EXAMPLES)
@click.option(
    "-n",
    "--samples",
    default=None,
    type=click.IntRange(1, 1000),
    help="Probes per step (default: what the objectives need).",
)
@_objective_options
@_output_options
@click.option(
    "--lead-delay",
    default=0.2,
    show_default=True,
    help="Sandbox: seconds before the funnel emits each event.",
)
@click.option(
    "--ingest-delay",
    default=0.3,
    show_default=True,
    help="Sandbox: seconds before PostHog makes an event queryable.",
)
def demo(
    samples: int | None,
    quantile: float | None,
    confidence: float | None,
    fmt: str,
    junit: str | None,
    trace_url: str | None,
    html_path: str | None,
    lead_delay: float,
    ingest_delay: float,
) -> None:
    """Start the sandbox funnel + a local PostHog on free ports, run `check` against them, clean up.

    Needs nothing beyond the install. The spec used is examples/sandbox.yaml.
    """
    from tracer.sandbox.approvals import ApprovalSettings
    from tracer.sandbox.auth import AuthSettings
    from tracer.sandbox.funnel import Knobs
    from tracer.sandbox.posthog import PostHogState
    from tracer.sandbox.redis_process import HOW_TO_GET_REDIS, PrivateRedis, free_port
    from tracer.sandbox.runner import Sandbox

    with contextlib.ExitStack() as stack:
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            try:
                redis_url = stack.enter_context(PrivateRedis()).url
            except RuntimeError:
                err.print(
                    f"[yellow]DLQ step skipped:[/] {escape(HOW_TO_GET_REDIS)}",
                    highlight=False,
                    soft_wrap=True,
                )
        receiver, mailbox = free_port(), free_port()
        # Fresh secrets each run: the receivers are authenticated, and the sandbox funnel signs
        # (timestamped HMAC) and addresses (recipient token) its notifications with them.
        hook_secret, mail_token = secrets.token_hex(16), secrets.token_hex(8)
        approvals = ApprovalSettings(
            slack_url=f"http://127.0.0.1:{receiver}/slack",
            smtp_host="127.0.0.1",
            smtp_port=mailbox,
            hmac_secret=hook_secret,
            hmac_scheme="timestamped",
            approver_email=f"approver+{mail_token}@funnel.invalid",
        )
        sb = stack.enter_context(
            Sandbox(
                knobs=Knobs(lead_delay=lead_delay),
                posthog=PostHogState(ingest_delay=ingest_delay),
                redis_url=redis_url,
                dlq_retry_interval=1.0,
                approvals=approvals,
                # Leads and approvals need a short-lived login token: the spec logs in (auth.sandbox).
                auth=AuthSettings(required=True, token_ttl=300.0),
            )
        )
        approvals.slack_api_url = sb.slack_api_url  # approvals also post to the Slack stand-in
        os.environ.update(
            {
                "FUNNEL_URL": sb.url,
                "POSTHOG_HOST": sb.posthog_url,
                "SLACK_API_URL": sb.slack_api_url,
                "RECEIVER_PORT": str(receiver),
                "SMTP_PORT": str(mailbox),
                "RECEIVER_HMAC_SECRET": hook_secret,
                "SMTP_RCPT_TOKEN": mail_token,
                "REDIS_URL": redis_url or "redis://127.0.0.1:1/0",
            }
        )
        import yaml

        from tracer.spec import parse_spec

        text = resources.files("tracer").joinpath("data/sandbox.yaml").read_text(encoding="utf-8")
        spec = parse_spec(yaml.safe_load(text), "examples/sandbox.yaml")
        if not redis_url:  # the other steps still run
            spec = spec.model_copy(
                update={
                    "steps": {
                        name: step
                        for name, step in spec.steps.items()
                        if step.inject.kind != "redis_dlq" and all(h.sink != "redis_dlq" for h in step.hops)
                    },
                    "gauges": {},  # both read the DLQ
                }
            )
        if fmt == "table":
            err.print(
                f"[dim]sandbox funnel {sb.url}, local PostHog {sb.posthog_url}, Redis "
                f"{'yes' if redis_url else 'no'}; "
                f"{f'{samples} probe(s)' if samples else 'as many probes as the claims need'} per step[/]",
                highlight=False,
                soft_wrap=True,
            )
        code = run_check(spec, samples, fmt, junit, trace_url, html_path, quantile, confidence)
    sys.exit(code)


@main.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 only inside a container)."
)
@click.option("--port", default=8000, show_default=True, help="Funnel API port.")
@click.option("--posthog-port", default=8010, show_default=True, help="Local PostHog port.")
@click.option("--slack-port", default=8020, show_default=True, help="Slack Web API stand-in port.")
@click.option(
    "--lead-delay", default=0.0, show_default=True, help="Seconds before the funnel emits lead_captured."
)
@click.option(
    "--drop-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Fraction of events never emitted.",
)
@click.option(
    "--ingest-delay", default=0.0, show_default=True, help="Seconds before PostHog makes an event queryable."
)
@click.option(
    "--redis-url", envvar="REDIS_URL", default=None, help="Redis for the payment DLQ and its retry worker."
)
@click.option(
    "--dlq-retry-interval",
    default=2.0,
    show_default=True,
    help="Seconds before the DLQ worker's first retry.",
)
@click.option(
    "--slack-url",
    default="http://127.0.0.1:8787/slack",
    show_default=True,
    help="Where approval notifications are posted (Slack incoming-webhook style).",
)
@click.option(
    "--smtp",
    "smtp_addr",
    default="127.0.0.1:2525",
    show_default=True,
    help="host:port approval emails go to.",
)
@click.option(
    "--receiver-secret",
    envvar="RECEIVER_HMAC_SECRET",
    default="sandbox-receiver-secret",
    show_default=True,
    help="HMAC key the notifications are signed with (timestamped); examples/sandbox.yaml's default.",
)
@click.option(
    "--mail-token",
    envvar="SMTP_RCPT_TOKEN",
    default="sandbox-mail-token",
    show_default=True,
    help="Recipient token: approval emails go to approver+<token>@funnel.invalid.",
)
@click.option(
    "--require-auth/--no-require-auth",
    default=False,
    show_default=True,
    help="Leads and approvals need a token from POST /api/v1/auth/login (user canary, password sandbox-password).",
)
@click.option("--token-ttl", default=1800.0, show_default=True, help="Seconds a login token lives.")
def sandbox(
    host: str,
    port: int,
    posthog_port: int,
    slack_port: int,
    lead_delay: float,
    drop_rate: float,
    ingest_delay: float,
    redis_url: str | None,
    dlq_retry_interval: float,
    slack_url: str,
    smtp_addr: str,
    receiver_secret: str,
    mail_token: str,
    require_auth: bool,
    token_ttl: float,
) -> None:
    """Run the reference funnel and a PostHog-compatible server until Ctrl-C."""
    import signal
    import threading

    from tracer.net import redact_url as redact
    from tracer.sandbox.approvals import ApprovalSettings
    from tracer.sandbox.auth import AuthSettings
    from tracer.sandbox.funnel import Knobs
    from tracer.sandbox.posthog import PostHogState
    from tracer.sandbox.runner import Sandbox

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    knobs = Knobs(lead_delay=lead_delay, drop_rate=drop_rate)
    smtp_host, _, smtp_port = smtp_addr.rpartition(":")
    approvals = ApprovalSettings(
        slack_url=slack_url,
        smtp_host=smtp_host,
        smtp_port=int(smtp_port),
        hmac_secret=receiver_secret,
        hmac_scheme="timestamped",
        approver_email=f"approver+{mail_token}@funnel.invalid",
    )
    with Sandbox(
        host=host,
        port=port,
        posthog_port=posthog_port,
        slack_port=slack_port,
        knobs=knobs,
        approvals=approvals,
        posthog=PostHogState(ingest_delay=ingest_delay),
        redis_url=redis_url,
        dlq_retry_interval=dlq_retry_interval,
        auth=AuthSettings(required=require_auth, token_ttl=token_ttl),
    ) as sb:
        click.echo(f"funnel   {sb.url}  (POST /api/v1/leads, /api/v1/webhooks/payments, /api/v1/approvals)")
        click.echo(f"dlq      {'on ' + redact(redis_url) if redis_url else 'off (give --redis-url)'}")
        approvals.slack_api_url = sb.slack_api_url
        click.echo(f"notify   {slack_url}, smtp://{smtp_addr} and Slack API {sb.slack_api_url} (#approvals)")
        click.echo(
            f"posthog  {sb.posthog_url}  (capture: /batch/ with project key phc_sandbox; query: /api/projects/1/query/ with personal key phx_sandbox)"
        )
        click.echo("Ctrl-C to stop.")
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass


@main.command()
@click.option(
    "-c", "--config", "config", required=True, type=click.Path(dir_okay=False), help="Funnel spec (YAML)."
)
@click.option("--probe", is_flag=True, help="Also send one probe per step and report its verdicts.")
def doctor(config: str, probe: bool) -> None:
    """Preflight: check the setup without injecting anything (unless --probe).

    One line per check, with a fix for each problem: each injection URL answers and its signing
    secret is set; each sink is reachable, its credentials work and what it watches exists (e.g.
    PostHog: key and scope, project, the event names seen lately, the property paths non-null);
    Redis keyspace notifications; receiver ports can be bound and their authentication is set.
    `check` and `canary` run the same checks at start (--no-preflight skips them).

    \b
    Exit codes: 0 all well, 1 problems found, 2 invalid config.
    """
    from tracer import preflight

    spec = _load(config)
    findings = asyncio.run(preflight.run(spec))
    for where, fs in findings.items():
        for f in fs:
            click.echo(preflight.line(f))
        if not fs:
            click.echo(f"ok   {where}: nothing to check")
    bad = preflight.problems(findings)
    if probe:
        code = run_check(spec, 1, "table", None, None, preflight=False)
        bad = bad or ([] if code == 0 else [None])
    click.echo(f"{len(bad)} problem(s) found" if bad else "all checks passed")
    sys.exit(1 if bad else 0)


@main.command()
@click.option(
    "-c", "--config", "config", required=True, type=click.Path(dir_okay=False), help="Funnel spec (YAML)."
)
@click.option(
    "--http-host",
    envvar="FUNNEL_CANARY_HTTP_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Bind address of /healthz and /metrics (0.0.0.0 inside a container).",
)
@click.option(
    "--http-port",
    envvar="FUNNEL_CANARY_HTTP_PORT",
    default=9464,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port of /healthz and /metrics (0: any free port).",
)
@click.option(
    "--location",
    envvar="FUNNEL_CANARY_LOCATION",
    default=None,
    help="Where this canary runs (e.g. eu-west-1): resource attribute canary.location.",
)
@click.option(
    "--instance",
    envvar="FUNNEL_CANARY_INSTANCE",
    default=None,
    help="Instance id in the shared ledger (default: canary.ledger.instance, else --location, else host name).",
)
@click.option(
    "--log-format",
    "log_format",
    envvar="FUNNEL_LOG_FORMAT",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per line.",
)
@click.option("--no-preflight", is_flag=True, help="Skip the doctor's checks at start (see `doctor`).")
@click.pass_context
def canary(
    ctx: click.Context,
    config: str,
    http_host: str,
    http_port: int,
    location: str | None,
    instance: str | None,
    log_format: str,
    no_preflight: bool,
) -> None:
    """Run probes continuously, each step on its own interval, until SIGTERM/SIGINT (then exit 0).

    One log line per resolved probe; spans and metrics over OTLP (OTEL_* variables); /healthz and
    /metrics (Prometheus text) on --http-port; alerts per the spec's canary.alerts section.
    """
    spec = _load(config)
    _telemetry_or_exit()
    from tracer.canary import run_canary, setup_logging

    setup_logging(log_format, (ctx.parent.params.get("verbose") or 0) if ctx.parent else 0)
    sys.exit(
        run_canary(
            spec,
            location=location,
            instance=instance,
            http_host=http_host,
            http_port=http_port,
            preflight=not no_preflight,
        )
    )


@main.command()
@click.option(
    "--markdown", is_flag=True, help="Render the reference (docs/REFERENCE.md) instead of JSON Schema."
)
@click.option(
    "--builtin-only", is_flag=True, help="Leave out third-party sinks and injectors (for the committed docs)."
)
def schema(markdown: bool, builtin_only: bool) -> None:
    """Print the JSON Schema of the funnel spec (for editors: `# yaml-language-server: $schema=<file>`).

    \b
      funnel-tracer schema > funnel-spec.schema.json
      funnel-tracer schema --builtin-only --markdown > docs/REFERENCE.md
    """
    from tracer import reference

    click.echo(
        reference.markdown(builtin_only) if markdown else reference.schema_text(builtin_only), nl=False
    )


@main.command()
@click.option("--posthog", is_flag=True, help="A lead step observed in PostHog.")
@click.option("--redis-dlq", "redis_dlq", is_flag=True, help="A DLQ step: synthetic entry -> first retry.")
@click.option("--webhook", is_flag=True, help="An approval step notified by webhook (Slack-style).")
@click.option("--smtp", is_flag=True, help="An approval step notified by e-mail.")
@click.option(
    "-o",
    "--output",
    default="funnel.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="'-': stdout.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(posthog: bool, redis_dlq: bool, webhook: bool, smtp: bool, output: str, force: bool) -> None:
    """Write a commented starter spec for the sinks named (default: --posthog); valid once its ${VARS} are set."""
    from pathlib import Path

    from tracer.starter import starter_spec

    name = "funnel.yaml" if output == "-" else Path(output).name
    text = starter_spec(posthog=posthog, redis_dlq=redis_dlq, webhook=webhook, smtp=smtp, name=name)
    if output == "-":
        click.echo(text, nl=False)
        return
    path = Path(output)
    if path.exists() and not force:
        err.print(f"[red]{escape(output)} exists[/] (use --force to overwrite)")
        sys.exit(2)
    path.write_text(text, encoding="utf-8")
    err.print(
        f"wrote {escape(output)}: set the variables listed at its top, then `funnel-tracer validate -c {escape(output)}`"
    )


if __name__ == "__main__":
    main()
