"""The real trace backend for end-to-end tests: the Collector and Jaeger v2 binaries that
deploy/build-binaries.sh builds, run as subprocesses on free loopback ports.

Why binaries and not a fake: the point of these tests is what the real Collector (tail sampling,
span metrics) and the real Jaeger store and answer; our own OTLP receiver cannot say that.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import free_port, wait_port

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "deploy" / "build-binaries.sh"
COLLECTOR_CONFIG = ROOT / "otel-collector.yaml"
JAEGER_CONFIG = ROOT / "deploy" / "jaeger.yaml"
CACHE = Path(os.environ.get("FUNNEL_TRACER_CACHE", Path.home() / ".cache" / "funnel-tracer"))


def _pinned(name: str) -> str:
    """The version the build script pins (one source of truth for where the binary is cached)."""
    m = re.search(rf"^{name}=(\S+)", BUILD_SCRIPT.read_text(encoding="utf-8"), re.M)
    assert m, f"{name} not found in {BUILD_SCRIPT}"
    return m.group(1)


def binary(name: str) -> Path:
    """Path of a built binary: $FUNNEL_TRACER_<NAME>, PATH is NOT consulted (a different version
    there would test something else), else the build script's cache. Missing: fail under CI=true
    (a broken build must not look green), skip elsewhere with the command that builds it."""
    env = os.environ.get(f"FUNNEL_TRACER_{name.upper()}")
    version = _pinned("JAEGER_MODULE_VERSION" if name == "jaeger" else "OTELCOL_VERSION")
    path = Path(env) if env else CACHE / f"{name}-{version}" / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    msg = f"{name} binary not found at {path}: run deploy/build-binaries.sh"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@dataclass
class Process:
    """A binary under test with its log captured to a file (read on failure)."""

    argv: list[str]
    env: dict[str, str]
    name: str
    log: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self, ready_port: int) -> Process:
        fd, path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
        self.log = Path(path)
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=fd, stderr=subprocess.STDOUT)
        os.close(fd)
        try:
            wait_port(ready_port, 30)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{self.name} did not listen on :{ready_port}:\n{self.output()}") from exc
        return self

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-8000:]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _base_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "JAEGER_", "OTELCOL_", "FUNNEL_"))
    }


@dataclass
class Jaeger:
    query_port: int = field(default_factory=free_port)
    otlp_grpc_port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def query_url(self) -> str:
        return f"http://127.0.0.1:{self.query_port}"

    @property
    def otlp_grpc(self) -> str:
        return f"127.0.0.1:{self.otlp_grpc_port}"

    def start(self) -> Jaeger:
        env = {
            **_base_env(),
            "JAEGER_QUERY_HTTP_ENDPOINT": f"127.0.0.1:{self.query_port}",
            "JAEGER_QUERY_GRPC_ENDPOINT": f"127.0.0.1:{free_port()}",
            "JAEGER_HEALTH_ENDPOINT": f"127.0.0.1:{free_port()}",
            "JAEGER_OTLP_GRPC_ENDPOINT": self.otlp_grpc,
            "JAEGER_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{free_port()}",
        }
        argv = [str(binary("jaeger")), "--config", str(JAEGER_CONFIG)]
        self.process = Process(argv, env, "jaeger").start(self.query_port)
        wait_port(self.otlp_grpc_port, 15)
        return self

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """Jaeger's v1 JSON for a trace (the UI's own endpoint: adjusters ran, warnings included)."""
        r = httpx.get(f"{self.query_url}/api/traces/{trace_id}", timeout=5)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        data = r.json()["data"]
        return data[0] if data else None

    def stop(self) -> None:
        if self.process:
            self.process.stop()


@dataclass
class Collector:
    jaeger_otlp_grpc: str
    ok_sampling_percent: int = 100
    extra_env: dict[str, str] = field(default_factory=dict)
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    prometheus_port: int = field(default_factory=free_port)
    telemetry_port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def otlp_http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}/metrics"

    def env(self) -> dict[str, str]:
        return {
            **_base_env(),
            "OTELCOL_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{self.grpc_port}",
            "OTELCOL_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{self.http_port}",
            "OTELCOL_JAEGER_ENDPOINT": self.jaeger_otlp_grpc,
            "OTELCOL_PROMETHEUS_ENDPOINT": f"127.0.0.1:{self.prometheus_port}",
            "OTELCOL_TELEMETRY_HOST": "127.0.0.1",
            "OTELCOL_TELEMETRY_PORT": str(self.telemetry_port),
            "FUNNEL_OK_SAMPLING_PERCENT": str(self.ok_sampling_percent),
            **self.extra_env,
        }

    def start(self) -> Collector:
        argv = [str(binary("otelcol")), "--config", str(COLLECTOR_CONFIG)]
        self.process = Process(argv, self.env(), "otelcol").start(self.http_port)
        wait_port(self.prometheus_port, 15)
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()


def validate(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`otelcol validate`: the real binary's word on a config (unknown component, bad field...)."""
    return subprocess.run(
        [str(binary("otelcol")), "validate", "--config", str(config)],
        env=env if env is not None else _base_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_for(fn: Any, timeout: float, interval: float = 0.5) -> Any:
    """Poll fn() until it returns something truthy, or return its last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
