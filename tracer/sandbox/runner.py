"""Run the sandbox (funnel + local PostHog + a Slack Web API stand-in) on loopback ports in a background thread.

A thread with its own event loop keeps the sandbox's work off the tracer's loop, so the sandbox
cannot distort the lags the tracer measures.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
from dataclasses import dataclass, field

import uvicorn
from opentelemetry.sdk.trace.export import SpanExporter

from tracer.sandbox import payments, telemetry
from tracer.sandbox.approvals import ApprovalSettings
from tracer.sandbox.auth import AuthSettings, AuthStats
from tracer.sandbox.auth import stats as auth_stats
from tracer.sandbox.dlq import DlqWorker
from tracer.sandbox.funnel import FunnelContext, Knobs, create_app, synthetic_records
from tracer.sandbox.posthog import PostHogState
from tracer.sandbox.posthog import create_app as create_posthog_app
from tracer.sandbox.slack import SlackState
from tracer.sandbox.slack import create_app as create_slack_app


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@dataclass
class Sandbox:
    host: str = "127.0.0.1"
    port: int = 0
    posthog_port: int = 0
    knobs: Knobs = field(default_factory=Knobs)
    posthog: PostHogState = field(default_factory=PostHogState)
    slack_port: int = 0
    slack: SlackState = field(default_factory=SlackState)  # the Slack Web API stand-in
    redis_url: str | None = None  # enables the payment DLQ and its retry worker
    dlq_retry_interval: float = 2.0
    approvals: ApprovalSettings = field(default_factory=ApprovalSettings)  # where approval notifications go
    auth: AuthSettings = field(default_factory=AuthSettings)  # login required for leads/approvals, token TTL
    # Spans go here; default: OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, else nowhere (sandbox/telemetry.py).
    exporter: SpanExporter | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._funnel_sock = bind(self.host, self.port)
        self._posthog_sock = bind(self.host, self.posthog_port)
        self._slack_sock = bind(self.host, self.slack_port)
        self.slack_port = self._slack_sock.getsockname()[1]
        self.port = self._funnel_sock.getsockname()[1]
        self.posthog_port = self._posthog_sock.getsockname()[1]
        self.ctx = FunnelContext(
            posthog_host=self.posthog_url,
            posthog_api_key=self.posthog.project_api_key,
            knobs=self.knobs,
            redis_url=self.redis_url,
        )
        self.ctx.extra["approvals"] = self.approvals
        self.ctx.extra["auth"] = self.auth
        self.dlq: DlqWorker | None = None
        self.tracer_provider = telemetry.make_provider(self.exporter)
        self._servers: list[uvicorn.Server] = []
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def posthog_url(self) -> str:
        return f"http://{self.host}:{self.posthog_port}"

    def synthetic_records(self) -> dict[str, int]:
        """Synthetic leads and pending approvals the funnel holds (what cleanup must remove)."""
        return synthetic_records(self.ctx)

    @property
    def auth_stats(self) -> AuthStats:
        return auth_stats(self.ctx)

    @property
    def slack_api_url(self) -> str:
        """Base URL of the Slack Web API stand-in (``<url>/chat.postMessage``...)."""
        return f"http://{self.host}:{self.slack_port}/api"

    def start(self) -> Sandbox:
        self._thread = threading.Thread(target=self._run, name="sandbox", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("sandbox did not start within 15 s")
        if self._error is not None:
            raise RuntimeError(f"sandbox failed to start: {self._error!r}") from self._error
        return self

    def stop(self) -> None:
        for s in self._servers:
            s.should_exit = True
        if self._thread:
            self._thread.join(10)
        self.ctx.close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()  # flushes the sandbox's spans

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        telemetry.activate(self.tracer_provider)  # this thread, its tasks and to_thread workers
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        funnel = create_app(self.ctx)
        if self.tracer_provider is not None:
            telemetry.instrument_libraries()
            funnel = telemetry.wrap_asgi(funnel, self.tracer_provider)
        if self.redis_url:
            handler = functools.partial(payments.reprocess, self.ctx)
            worker = DlqWorker(
                self.redis_url, key="dlq:webhooks", retry_interval=self.dlq_retry_interval, handler=handler
            )
            self.dlq = self.ctx.extra["dlq"] = await worker.start()
        apps = [
            (funnel, self._funnel_sock),
            (create_posthog_app(self.posthog), self._posthog_sock),
            (create_slack_app(self.slack), self._slack_sock),
        ]
        tasks = []
        for app, sock in apps:
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
            self._servers.append(server)
            tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
        while not all(s.started for s in self._servers):
            await asyncio.sleep(0.01)
        self._ready.set()
        try:
            await asyncio.gather(*tasks)
        finally:
            if self.dlq is not None:
                await self.dlq.close()
