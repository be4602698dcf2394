"""Helpers for the canary tests: a real alert-webhook receiver, a canary subprocess whose JSON
log lines are read as they come, Prometheus text parsing, and spec templates."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tracer.spec import FunnelSpec, parse_spec

ROOT = Path(__file__).resolve().parent.parent

LEAD_SPEC = """
service: sandbox-funnel
collectors:
  posthog:
    host: {posthog}
    project_id: "1"
    personal_api_key: phx_sandbox
    queries_per_minute: 6000
    queries_per_hour: 360000
    budget_share: 1.0
    min_interval: 200ms
    max_backoff: 1s
    timeout: {timeout}
canary:
  grace: {grace}
  jitter: 0.2
{canary_extra}
steps:
  lead:
    interval: {interval}
    inject:
      http:
        url: {funnel}/api/v1/leads
        json: {{name: "Canary {{probe_id}}", email: "canary+{{trace_id}}@example.com", metadata: {{canary_trace_id: "{{trace_id}}"}}}}
        timeout: 2s
    hops:
      - name: posthog_event
        target: {target}
        deadline: {deadline}
        posthog: {{event: lead_captured, property: canary_trace_id, value: "{{trace_id}}"}}
"""


def lead_spec_text(
    posthog: str,
    funnel: str,
    *,
    interval: str = "300ms",
    target: str = "1500ms",
    deadline: str = "3s",
    grace: str = "10s",
    timeout: str = "2s",
    canary_extra: str = "",
) -> str:
    extra = "\n".join("  " + line for line in canary_extra.strip("\n").splitlines())
    return LEAD_SPEC.format(
        posthog=posthog,
        funnel=funnel,
        interval=interval,
        target=target,
        deadline=deadline,
        grace=grace,
        timeout=timeout,
        canary_extra=extra,
    )


def load(text: str) -> FunnelSpec:
    return parse_spec(yaml.safe_load(text))


class AlertSink:
    """A real HTTP server standing in for Slack / an alert webhook: records every JSON post."""

    def __init__(self, status: int = 200) -> None:
        self.posts: list[Any] = []
        self.status = status
        self.attempts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.attempts += 1
                if outer.status == 200:
                    outer.posts.append(json.loads(body))
                self.send_response(outer.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/B000/s3cr3t-token"

    def __enter__(self) -> AlertSink:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class CanaryProcess:
    """``funnel-tracer canary`` in a subprocess with ``--log-format json``; stderr is read by a
    thread into ``lines`` (parsed JSON) and ``raw``."""

    def __init__(
        self, spec_path: Path, *args: str, env: dict[str, str] | None = None, prelude: str | None = None
    ) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        entry = "from tracer.cli import main; main()"
        code = (prelude + "\n" + entry) if prelude else entry
        cmd = [sys.executable, "-c", code, "canary", "-c", str(spec_path), "--log-format", "json", *args]
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full_env, cwd=str(ROOT)
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.raw.append(line)
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                self.lines.append(obj)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [d for d in list(self.lines) if d.get("event") == name]

    def probes(self) -> list[dict[str, Any]]:
        return self.events("probe")

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"canary exited ({self.proc.returncode}) waiting for {what}:\n{self.stderr_tail()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.stderr_tail()}")

    def stderr_tail(self, n: int = 40) -> str:
        return "".join(self.raw[-n:])

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)

    def __enter__(self) -> CanaryProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition; fails on any line that is not a valid sample,
    comment or blank."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def prom_value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    found = [v for n, ls, v in samples if n == name and all(ls.get(k) == v2 for k, v2 in labels.items())]
    assert found, f"no sample {name}{labels}"
    return sum(found)


def otlp_points(requests: list[Any], name: str) -> list[tuple[dict[str, Any], Any]]:
    """Data points of metric ``name`` in the LAST export request that has it (cumulative)."""
    from tests.otlp_receiver import _value

    for req in reversed(requests):
        points = []
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name != name:
                        continue
                    kind = m.WhichOneof("data")
                    for p in getattr(m, kind).data_points:
                        points.append(({a.key: _value(a.value) for a in p.attributes}, p))
        if points:
            return points
    return []


def otlp_resource(requests: list[Any]) -> dict[str, Any]:
    from tests.otlp_receiver import _value

    for req in requests:
        for rm in req.resource_metrics:
            return {a.key: _value(a.value) for a in rm.resource.attributes}
    return {}
