"""Issue 10, engine side: hostile injection endpoints, auth endpoints, OTLP endpoints, output paths
and signals must never stall a probe, forge a verdict, crash with a traceback or leak a secret.

Real sockets throughout: the sandbox funnel and its PostHog (``sb``), small hostile servers
written here (raw sockets, so they can misbehave below HTTP), ``funnel-tracer`` subprocesses for
exit codes and signals, and a real OTLP receiver. The time bounds below are hang guards (a stall
fails the test instead of hanging it), never performance assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.canary_helpers import load
from tests.support import tmp_yaml
from tracer.engine import Engine, ProbeResult
from tracer.sandbox.runner import Sandbox

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent

POSTHOG = """
service: sandbox-funnel
collectors:
  posthog: {{host: "{posthog}", project_id: "1", personal_api_key: phx_sandbox, queries_per_minute: 6000,
             queries_per_hour: 360000, budget_share: 1.0, min_interval: 200ms, timeout: 2s}}
"""

LEAD = """
steps:
  lead:
    spacing: 100ms
    inject:
      http:
        url: {url}
        json: {{email: "canary+{{trace_id}}@example.com", metadata: {{canary_trace_id: "{{trace_id}}"}}}}
        timeout: {timeout}
{extra}
    hops:
      - name: posthog_event
        target: 1500ms
        deadline: 3s
        posthog: {{event: lead_captured, property: canary_trace_id, value: "{{trace_id}}"}}
"""


def lead_spec(sb: Sandbox, url: str, timeout: str = "1s", extra: str = "", head: str = "") -> str:
    return POSTHOG.format(posthog=sb.posthog_url) + head + LEAD.format(url=url, timeout=timeout, extra=extra)


# -- a hostile HTTP server ------------------------------------------------------------------------
Behaviour = Callable[[socket.socket, bytes], None]


class Hostile:
    """A raw-socket server: reads one request head (and its body, by Content-Length), then hands
    the socket to ``behaviour``. Counts the bytes it managed to send and keeps every request."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[bytes] = []
        self.sent = 0
        self._stop = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v.strip())
            while len(rest) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                rest += chunk
            self.requests.append(head + b"\r\n\r\n" + rest)
            self.behaviour(conn, head)
        except OSError:
            pass
        finally:
            conn.close()

    def __enter__(self) -> Hostile:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


def drip(server: Hostile) -> Behaviour:
    """Headers at once, then one byte every 0.3 s: each read is within any timeout, the whole never."""

    def go(conn: socket.socket, _head: bytes) -> None:
        server.send(
            conn, b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        while not server.stopped:
            server.send(conn, b" ")
            time.sleep(0.3)

    return go


def run_engine(text: str, samples: int, bound: float = 30.0) -> list[ProbeResult]:
    """``check`` with every probe kept, failing (not hanging) if it overruns ``bound``."""

    async def go() -> list[ProbeResult]:
        async with Engine(load(text)) as engine:
            return await asyncio.wait_for(engine.check(samples, early_stop=False), bound)

    return asyncio.run(go())


# -- injection endpoints ------------------------------------------------------------------------
def test_slow_drip_response_is_a_timeout_not_a_stall(sb: Sandbox) -> None:
    """httpx's timeout bounds each read; a server dripping a byte per 0.3 s must still cost the
    probe no more than its timeout, as inject_failed."""
    server = Hostile(lambda c, h: None)
    server.behaviour = drip(server)
    with server:
        t0 = time.monotonic()
        (res,) = run_engine(lead_spec(sb, f"{server.url}/api/v1/leads"), 1)
        took = time.monotonic() - t0
    assert res.injection.ok is False and res.injection.error == "timeout after 1s", res.injection
    assert [h.verdict for h in res.hops] == ["inject_failed"]
    assert took < 20, took  # hang guard (the drip alone would go on for 300 s)


def test_huge_response_is_not_read_into_memory(sb: Sandbox) -> None:
    """A 2 GB answer: the injector keeps at most its cap and drops the connection, and a capture
    from it is an honest inject_failed, not a parse of a truncated body."""
    server = Hostile(lambda c, h: None)

    def flood(conn: socket.socket, _head: bytes) -> None:
        server.send(
            conn,
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2000000000\r\n\r\n",
        )
        chunk = b'{"id": "' + b"x" * 65536
        while not server.stopped:
            server.send(conn, chunk)

    server.behaviour = flood
    with server:
        (res,) = run_engine(
            lead_spec(
                sb, f"{server.url}/api/v1/leads", timeout="10s", extra="        capture: {lead_id: id}"
            ),
            1,
        )
        time.sleep(0.2)
        sent = server.sent
    assert [h.verdict for h in res.hops] == ["inject_failed"]
    assert "larger than" in (res.injection.error or ""), res.injection
    assert sent < 256 << 20, sent  # far below the 2 GB offered: the client stopped reading


def test_reset_tls_and_dns_failures_are_inject_failed(sb: Sandbox) -> None:
    """Connection reset mid-answer, TLS spoken to a plain port, a name that does not resolve:
    each probe inject_failed with a short error, none lost or late, no traceback."""

    def reset(conn: socket.socket, _head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 201 Cre")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    with Hostile(reset) as rst, Hostile(lambda c, h: None) as plain:
        tls = plain.url.replace("http://", "https://")
        for url in (
            f"{rst.url}/api/v1/leads",
            f"{tls}/api/v1/leads",
            "http://no-such-host.invalid/api/v1/leads",
        ):
            (res,) = run_engine(lead_spec(sb, url), 1)
            assert [h.verdict for h in res.hops] == ["inject_failed"], (url, res.hops)
            assert res.injection.error and len(res.injection.error) < 120, res.injection.error


def test_redirect_to_another_host_is_not_followed_with_credentials(sb: Sandbox) -> None:
    """A 307 to another host (or a redirect loop) must not carry the bearer token anywhere: the
    probe is inject_failed with the status, and the token appears in no report."""
    token = "tok-s3cr3t-5f1e2d"
    with Hostile(lambda c, h: None) as other:

        def bounce(conn: socket.socket, _head: bytes) -> None:
            conn.sendall(
                f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {other.url}/steal\r\nContent-Length: 0\r\n\r\n".encode()
            )

        with Hostile(bounce) as first:
            head = f"auth:\n  api: {{token: {token}}}\n"
            text = lead_spec(sb, f"{first.url}/api/v1/leads", head=head, extra="        auth: api")
            (res,) = run_engine(text, 1)
            assert first.requests and token.encode() in first.requests[0]  # it was sent where asked
        assert other.requests == []
    assert [h.verdict for h in res.hops] == ["inject_failed"]
    assert res.injection.status == 307
    from tracer.export.report import summarize

    assert token not in repr(summarize(load(text), [res]))


def test_client_timeout_while_the_funnel_still_works_is_inject_failed(sb: Sandbox) -> None:
    """The funnel answers after our timeout but still emits the event: the probe must not be
    judged from a sighting (no ok, late or lost measured from the wrong start)."""
    sb.knobs.api_delay["leads"] = 2.0
    (res,) = run_engine(lead_spec(sb, f"{sb.url}/api/v1/leads", timeout="500ms"), 1)
    assert [h.verdict for h in res.hops] == ["inject_failed"], res.hops
    assert res.injection.error == "timeout after 0.5s"
    assert res.hops[0].lag is None


# -- the CLI as a process -------------------------------------------------------------------------
def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, **kw: Any
) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env or {})
    cmd = [sys.executable, "-m", "tracer.cli", *args]
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(
        cmd, stderr=subprocess.PIPE, text=True, env=full, timeout=timeout, cwd=str(ROOT), **kw
    )


GATE = ("--no-preflight", "-n", "3", "--quantile", "0.5", "--confidence", "0.8")


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr + (proc.stdout or ""), proc.stderr[-3000:]
    assert proc.returncode in (0, 1, 2, 3), (proc.returncode, proc.stderr[-3000:])


def test_header_that_cannot_be_sent_is_inject_failed_not_a_crash(sb: Sandbox) -> None:
    """A ``${VAR}`` header value that is not ASCII is only found out when sent: each probe is
    inject_failed saying so, the check reports (exit 3), with no traceback."""
    text = lead_spec(sb, f"{sb.url}/api/v1/leads", extra='        headers: {X-Who: "${WHO}"}')
    proc = cli("check", "-c", str(tmp_yaml(text)), *GATE, "--format", "json", env={"WHO": "café"})
    no_traceback(proc)
    assert proc.returncode == 3
    assert "cannot send the request as rendered (UnicodeEncodeError)" in proc.stdout


def test_url_that_does_not_parse_is_a_config_error(sb: Sandbox) -> None:
    for bad in ("http://[::1/api", "http://127.0.0.1:99999/api"):
        proc = cli("check", "-c", str(tmp_yaml(lead_spec(sb, "${URL}"))), *GATE, env={"URL": bad})
        no_traceback(proc)
        assert proc.returncode == 2
        assert "steps.lead.inject.http.url: not a valid URL" in proc.stderr, proc.stderr


# -- auth -------------------------------------------------------------------------------------------
def command_auth(argv: list[str], timeout: str = "1s") -> str:
    return "auth:\n  cmd:\n    command: {argv: " + json.dumps(argv) + f", timeout: {timeout}}}\n"


def test_token_command_whose_child_holds_stdout_is_bounded_by_its_timeout(sb: Sandbox) -> None:
    """A helper that prints and then hangs in a child (``sh -c 'echo tok; sleep 30'``): the
    timeout must end the whole session, not wait for the child to close stdout."""
    head = command_auth(["sh", "-c", "echo tok; sleep 30"])
    t0 = time.monotonic()
    (res,) = run_engine(lead_spec(sb, f"{sb.url}/api/v1/leads", head=head, extra="        auth: cmd"), 1)
    took = time.monotonic() - t0
    assert [h.verdict for h in res.hops] == ["inject_failed"]
    assert res.injection.error == "auth 'cmd': sh timed out after 1s"
    assert took < 15, took  # hang guard: the child sleeps 30 s


def test_token_command_flooding_stdout_is_not_a_token(sb: Sandbox) -> None:
    head = command_auth([sys.executable, "-c", "import sys; sys.stdout.write('x' * 20_000_000)"], "10s")
    (res,) = run_engine(lead_spec(sb, f"{sb.url}/api/v1/leads", head=head, extra="        auth: cmd"), 1)
    assert [h.verdict for h in res.hops] == ["inject_failed"]
    assert "printed more than 65536 bytes" in (res.injection.error or "")


def test_token_command_failing_or_printing_secrets_to_stderr_leaks_nothing(sb: Sandbox) -> None:
    """Exit status 3 after writing a secret to stderr: inject_failed with the status, the secret
    in no output (report, logs at -vv)."""
    secret = "stderr-s3cr3t-9b8a7c"
    code = f"import sys; sys.stderr.write('{secret}\\n'); print('{secret}'); sys.exit(3)"
    head = command_auth([sys.executable, "-c", code], "5s")
    text = lead_spec(sb, f"{sb.url}/api/v1/leads", head=head, extra="        auth: cmd")
    proc = cli("-vv", "check", "-c", str(tmp_yaml(text)), *GATE, "--format", "json")
    no_traceback(proc)
    assert proc.returncode == 3
    assert "exited with status 3" in proc.stdout
    assert secret not in proc.stdout + proc.stderr


def test_login_that_drips_or_hides_its_token_is_inject_failed(sb: Sandbox) -> None:
    """A login endpoint dripping its answer is bounded by the login timeout; one that answers
    with the token somewhere else than configured is an auth error, not a probe sent unauthenticated."""
    server = Hostile(lambda c, h: None)
    server.behaviour = drip(server)

    def elsewhere(conn: socket.socket, _head: bytes) -> None:
        body = b'{"data": {"token": "tok-hidden-4242"}}'
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )

    with server, Hostile(elsewhere) as other:
        for login, error in (
            (server, "login timed out after 1s"),
            (other, "no text at JSON path access_token"),
        ):
            head = f"auth:\n  app:\n    login: {{url: {login.url}/login, json: {{password: pw-1234}}, timeout: 1s}}\n"
            (res,) = run_engine(
                lead_spec(sb, f"{sb.url}/api/v1/leads", head=head, extra="        auth: app"), 1
            )
            assert [h.verdict for h in res.hops] == ["inject_failed"]
            assert error in (res.injection.error or ""), res.injection.error


# -- outputs --------------------------------------------------------------------------------------
def test_report_files_on_a_full_disk_exit_2_with_one_line(sb: Sandbox, tmp_path: Path) -> None:
    """``--junit`` / ``--html`` symlinked to /dev/full pass the start check (it opens for
    append) and fail at the end: one line each, exit 2 (not 1, which would claim a failing
    funnel; not a traceback); the same for stdout on a full disk."""
    junit, html = tmp_path / "junit.xml", tmp_path / "report.html"
    junit.symlink_to("/dev/full")
    html.symlink_to("/dev/full")
    spec = str(tmp_yaml(lead_spec(sb, f"{sb.url}/api/v1/leads")))
    proc = cli("check", "-c", spec, *GATE, "--junit", str(junit), "--html", str(html))
    no_traceback(proc)
    assert proc.returncode == 2, proc.stderr
    assert f"--junit {junit}: cannot write: No space left on device" in proc.stderr
    assert f"--html {html}: cannot write: No space left on device" in proc.stderr
    with open("/dev/full", "w") as full:
        proc = cli("check", "-c", spec, *GATE, "--format", "json", stdout=full)
    no_traceback(proc)
    assert proc.returncode == 2
    assert "cannot write the report to stdout: No space left on device" in proc.stderr
    assert proc.stdout is None


def test_reader_closing_the_pipe_keeps_the_verdict_and_the_files(sb: Sandbox, tmp_path: Path) -> None:
    """``check | head -1``: the reader is gone before the report is printed. The exit code
    must still be the verdict's (0 here, not click's 1 for EPIPE) and --junit still written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT)
    junit = tmp_path / "junit.xml"
    spec = str(tmp_yaml(lead_spec(sb, f"{sb.url}/api/v1/leads")))
    cmd = [
        sys.executable,
        "-m",
        "tracer.cli",
        "check",
        "-c",
        spec,
        *GATE,
        "--format",
        "json",
        "--junit",
        str(junit),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone
    rc = proc.wait(60)
    stderr = proc.stderr.read().decode()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert rc == 0, stderr
    assert b"<testcase" in junit.read_bytes()


# -- signals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_check_gives_an_honest_partial_report_and_cleans_up(
    sb: Sandbox, sig: signal.Signals
) -> None:
    """CI cancels the job (SIGTERM) or a person presses Ctrl-C while probes await their hops:
    the check stops at once, reports them ``unknown`` (never lost, never a pass: exit 3), still
    removes what they left in the funnel, and prints no traceback."""
    sb.knobs.lead_delay = 30.0  # nothing will be seen before the signal
    sb.ctx.extra.setdefault("leads", {}).clear()
    cleanup = f'    cleanup:\n      - {{method: DELETE, url: "{sb.url}/api/v1/leads/{{capture.lead_id}}"}}\n'
    text = lead_spec(sb, f"{sb.url}/api/v1/leads", extra="        capture: {lead_id: id}")
    text = text.replace("target: 1500ms", "target: 10s").replace("deadline: 3s", "deadline: 20s") + cleanup
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "tracer.cli", "check", "-c", str(tmp_yaml(text)), *GATE, "--format", "json"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT)
    )
    end = time.monotonic() + 20
    while sb.synthetic_records()["leads"] < 3 and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.05)
    assert sb.synthetic_records()["leads"] == 3
    proc.send_signal(sig)
    out, stderr = proc.communicate(timeout=20)
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 3, stderr
    report = json.loads(out)
    assert report["interrupted"] is True and report["ok"] is False
    (hop,) = report["steps"][0]["hops"]
    assert hop["verdicts"]["unknown"] == 3 and hop["verdicts"]["lost"] == 0, hop["verdicts"]
    assert all("interrupted" in p["reason"] for p in hop["probes"])
    assert sb.synthetic_records()["leads"] == 0  # the cleanup ran for probes cut short
    assert f"interrupted by {sig.name}" in stderr


# -- OpenTelemetry endpoints and settings --------------------------------------------------------
def test_otlp_endpoint_black_hole_500_or_garbage_changes_nothing_and_exit_is_bounded(sb: Sandbox) -> None:
    """Spans going to an endpoint that accepts and never answers, one answering 500, or a URL
    that is not one: the verdicts and the exit code are the same as without export, no
    traceback, and the exit waits at most the export timeout (OTEL_EXPORTER_OTLP_TIMEOUT)."""

    def answer_500(conn: socket.socket, _head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops")

    def never(_conn: socket.socket, _head: bytes) -> None:
        time.sleep(30)

    spec = str(tmp_yaml(lead_spec(sb, f"{sb.url}/api/v1/leads")))
    with Hostile(never) as hole, Hostile(answer_500) as broken:
        for endpoint in (hole.url, broken.url, "garbage"):
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_TIMEOUT": "2"}
            t0 = time.monotonic()
            proc = cli("check", "-c", spec, *GATE, "--format", "json", env=env)
            took = time.monotonic() - t0
            no_traceback(proc)
            assert proc.returncode == 0, (endpoint, proc.stderr[-2000:])
            (hop,) = json.loads(proc.stdout)["steps"][0]["hops"]
            assert hop["verdicts"]["ok"] == 3, (endpoint, hop["verdicts"])
            assert took < 45, (endpoint, took)  # hang guard: a black hole must not hold the exit


@pytest.mark.parametrize(
    "var, value", [("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "-5"), ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "abc")]
)
def test_otel_setting_the_sdk_refuses_is_a_config_error_for_check(sb: Sandbox, var: str, value: str) -> None:
    """Most bad OTEL_* values only make the SDK warn; these make it raise. One line naming the
    variable, exit 2, nothing injected (not a traceback and click's exit 1)."""
    before = len(sb.posthog.events())
    proc = cli("check", "-c", str(tmp_yaml(lead_spec(sb, f"{sb.url}/api/v1/leads"))), *GATE, env={var: value})
    no_traceback(proc)
    assert proc.returncode == 2
    assert "invalid OpenTelemetry settings for spans" in proc.stderr and var in proc.stderr
    assert len(sb.posthog.events()) == before


def test_otel_setting_the_sdk_refuses_is_a_config_error_for_the_canary(sb: Sandbox) -> None:
    from tests.canary_helpers import CanaryProcess, lead_spec_text

    spec = tmp_yaml(lead_spec_text(sb.posthog_url, sb.url))
    env = {"OTEL_METRICS_EXEMPLAR_FILTER": "bogus", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    with CanaryProcess(spec, "--http-port", "0", env=env) as canary:
        rc = canary.proc.wait(30)
        canary._reader.join(5)
    assert rc == 2, canary.stderr_tail()
    (failed,) = canary.events("start_failed")
    assert "invalid OpenTelemetry settings for metrics" in failed["msg"]
    assert "Traceback" not in "".join(canary.raw)


# -- a starved tracer ---------------------------------------------------------------------------
def test_a_stalled_tracer_loop_is_blind_not_a_false_late(sb: Sandbox) -> None:
    """The tracer's process starved (CPU pressure, a blocking call) for 3 s just after the
    injection, while the funnel (other threads) delivered within 0.5 s. The first look after the
    stall sees the event 3 s late by the clock: that straddle comes from the tracer not looking,
    so the hop must be ok or unknown (with the stall as the blind window), never late or lost."""
    sb.knobs.lead_delay = 0.2
    text = lead_spec(sb, f"{sb.url}/api/v1/leads")

    async def go() -> ProbeResult:
        async with Engine(load(text)) as engine:
            await asyncio.sleep(0.5)  # the poller is in its steady cadence
            loop = asyncio.get_running_loop()
            return await engine.run_probe(
                "lead", on_injected=lambda _i: loop.call_later(0.05, time.sleep, 3.0)
            )

    res = asyncio.run(go())
    (hop,) = res.hops
    assert hop.verdict in ("ok", "unknown"), (hop.verdict, hop.lag, hop.error_bar, hop.reason)
    if hop.verdict == "unknown":
        assert hop.evidence and any("stalled" in b["why"] for b in hop.evidence["blind"]), hop.evidence


# -- hostile text in reports, and secrets -----------------------------------------------------------
def test_hostile_answer_cannot_break_reports_or_leak_what_was_sent(sb: Sandbox, tmp_path: Path) -> None:
    """The funnel refuses with a 422 whose body echoes everything we sent (the bearer token,
    the personal key in the body) plus control characters, markup and XML breakers. Every
    report (JSON, table, JUnit, HTML, spans over OTLP, logs at -vv) stays well-formed, and no
    secret appears in any of them."""
    import xml.etree.ElementTree as ET

    from tests.otlp_receiver import OtlpReceiver

    token, key = "tok-3ch0-5ecret-77", "phx_personal_k3y_91"

    def echo(conn: socket.socket, _head: bytes) -> None:
        sent = server.requests[-1]
        body = b"\x00\x1b[2J\x07<script>alert(1)</script>]]>&[bold red]x[/] \xff\xfe " + sent
        conn.sendall(b"HTTP/1.1 422 Unprocessable\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    server = Hostile(echo)
    head = f"auth:\n  api: {{token: {token}}}\n"
    extra = "        auth: api"
    with server, OtlpReceiver() as rx:
        text = lead_spec(sb, f"{server.url}/api/v1/leads", head=head, extra=extra)
        text = text.replace("json: {email:", 'json: {key: "${PERSONAL_KEY}", email:')
        spec = str(tmp_yaml(text))
        env = {"PERSONAL_KEY": key, "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint}
        junit, html = tmp_path / "j.xml", tmp_path / "r.html"
        outs = []
        for fmt in ("json", "table", "markdown"):
            args = (
                "-vv",
                "check",
                "-c",
                spec,
                *GATE,
                "--format",
                fmt,
                "--junit",
                str(junit),
                "--html",
                str(html),
            )
            proc = cli(*args, env=env)
            no_traceback(proc)
            assert proc.returncode == 3, proc.stderr[-2000:]
            outs += [proc.stdout, proc.stderr, junit.read_text(), html.read_text()]
        time.sleep(1.5)
        spans = json.dumps(rx.spans, default=str)
    assert token.encode() in server.requests[0] and key.encode() in server.requests[0]  # really sent
    report = json.loads(outs[0])
    (hop,) = report["steps"][0]["hops"]
    assert hop["verdicts"]["inject_failed"] == 3
    assert "HTTP 422" in hop["probes"][0]["reason"]
    ET.parse(junit)  # well-formed XML despite NUL and ESC in the answer
    assert "<script>" not in html.read_text()
    for text_out in [*outs, spans]:
        assert token not in text_out and key not in text_out
        assert "\x00" not in text_out and "\x1b" not in text_out
    assert "tok-3ch0" not in spans


# -- specs valid in shape, absurd in value ------------------------------------------------------
@pytest.mark.parametrize(
    "edit, args, code, says",
    [
        (("spacing: 100ms", "spacing: 0"), ("-n", "3"), 3, None),  # no pause between starts: fine
        (
            ("spacing: 100ms", "spacing: 100ms\n    rate: 1e-9"),
            ("-n", "2"),
            2,
            "steps.lead.rate: at least one probe per 30 days",
        ),
        (("spacing: 100ms", "spacing: 100ms\n    concurrency: 1000000"), ("-n", "3"), 3, None),
        (("target: 1500ms", "target: 0.000000001"), ("-n", "1"), None, None),  # late or inconclusive
        (
            (
                "target: 1500ms",
                "target: 1500ms\n        objective: {quantile: 0.999999, confidence: 0.999999}",
            ),
            ("-n", "1"),
            2,
            "steps.lead.hops[0].objective: no check can show this objective",
        ),
        (
            (),
            ("-n", "1", "--quantile", "0.999999", "--confidence", "0.999999"),
            2,
            "no check can show that objective",
        ),
        ((), ("-n", "0"), 2, "0 is not in the range"),
        ((), ("-n", "1000000000"), 2, "is not in the range"),
    ],
)
def test_absurd_but_well_formed_specs_neither_hang_nor_crash(
    sb: Sandbox, edit: tuple[str, ...], args: tuple[str, ...], code: int | None, says: str | None
) -> None:
    """Zero spacing used to divide by zero; a rate of 1e-9 waited 31 years for the second
    probe; an objective needing over 100 000 probes raised after the probes had run."""
    text = lead_spec(sb, f"{sb.url}/api/v1/leads")
    if edit:
        assert edit[0] in text
        text = text.replace(*edit)
    proc = cli("check", "-c", str(tmp_yaml(text)), "--no-preflight", *args, "--format", "json", timeout=40)
    no_traceback(proc)
    assert code is None or proc.returncode == code, proc.stderr[-2000:]
    if says:
        assert says in proc.stderr, proc.stderr


# -- the canary's ledger and status endpoint ---------------------------------------------------------
def test_corrupt_or_foreign_ledger_records_cannot_block_the_canary(sb: Sandbox, redis_url: str) -> None:
    """The previous run's records (and heartbeat) are garbage, truncated, of another shape or
    from a newer version: each is dropped with a warning, the ledger comes up, the canary
    probes as usual. (Before: one record of the wrong shape made every connect attempt raise,
    so the ledger stayed down and resumed nothing.)"""
    import redis

    from tests.canary_helpers import lead_spec_text

    r = redis.Redis.from_url(redis_url)
    good_stamp = {"mono": 1.0, "wall": time.time() - 5, "boot": "other-boot"}
    bad = {
        "t-notjson": b'{"step": "lead", "trace_id": "t-notjs',  # truncated
        "t-list": b"[1, 2, 3]",
        "t-number": b"42",
        "t-stamp": json.dumps(
            {
                "step": "lead",
                "trace_id": "a" * 32,
                "probe_id": "p",
                "created": "yesterday",
                "root_span_id": "1" * 16,
                "inject_span_id": "2" * 16,
            }
        ).encode(),
        "t-newer": json.dumps(
            {
                "step": "lead",
                "trace_id": "b" * 32,
                "probe_id": "p",
                "created": good_stamp,
                "root_span_id": "1" * 16,
                "inject_span_id": "2" * 16,
                "v": 99,
                "done": {"posthog_event": {"hop": "posthog_event", "from_the_future": 1}},
            }
        ).encode(),
    }
    r.hset("funnel-tracer:rec:east-9", mapping=bad)
    r.set("funnel-tracer:alive:east-9", b"not a stamp")
    extra = f"ledger: {{redis_url: '{redis_url}', instance: east-9}}"
    text = lead_spec_text(sb.posthog_url, sb.url, interval="300ms", canary_extra=extra)
    results: list[ProbeResult] = []

    async def main() -> dict[str, Any]:
        from tracer.canary import Canary

        canary = Canary(load(text), http_port=None, on_result=results.append, preflight=False)
        await asyncio.wait_for(canary.start(), 20)
        try:
            end = time.monotonic() + 15
            while time.monotonic() < end and not (canary.ledger.health()["up"] and len(results) >= 3):
                await asyncio.sleep(0.1)
            return canary.ledger.health()
        finally:
            await canary.shutdown()

    health = asyncio.run(main())
    assert health["up"] is True, health
    fresh = [res for res in results if not res.resumed]
    assert len(fresh) >= 3 and all(h.verdict == "ok" for res in fresh for h in res.hops), [
        (h.verdict, h.reason) for res in results for h in res.hops
    ]
    left = {k.decode() for k in r.hkeys("funnel-tracer:rec:east-9")}
    assert not (left & set(bad)), left  # every unreadable record dropped, none kept forever


def test_status_endpoint_under_hostile_clients_keeps_answering_and_probing(sb: Sandbox) -> None:
    """Hundreds of idle connections (slowloris), an 8 MB header, binary garbage, a request
    line of 3 MB, half-closed sockets: /healthz still answers a proper client, no traceback is
    logged, and probes keep resolving ok meanwhile."""
    import logging

    from tests.canary_helpers import lead_spec_text

    text = lead_spec_text(sb.posthog_url, sb.url, interval="300ms")
    results: list[ProbeResult] = []
    errors: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record)

    async def hostile(port: int) -> None:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
        for payload in (
            b"GET /healthz HTTP/1.1\r\n" + b"X: " + b"a" * 8_000_000,
            b"\x00\xff" * 50_000,
            b"GET /" + b"x" * 3_000_000 + b" HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
            b"GET /healthz\r\n\r\n",
        ):
            rd, wr = await asyncio.open_connection("127.0.0.1", port)
            with contextlib.suppress(ConnectionError):
                wr.write(payload)
                await wr.drain()
                wr.write_eof()
                await asyncio.wait_for(rd.read(), 10)
            wr.close()
        rd, wr = await asyncio.open_connection("127.0.0.1", port)
        wr.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await wr.drain()
        answer = await asyncio.wait_for(rd.read(), 10)
        assert answer.startswith(b"HTTP/1.1 200") or answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b'"collectors"' in answer
        for _, w in idle:
            w.close()

    async def main() -> None:
        from tracer.canary import Canary

        canary = Canary(load(text), http_port=0, on_result=results.append, preflight=False)
        await canary.start()
        try:
            assert canary.status is not None
            await asyncio.wait_for(hostile(canary.status.port), 30)
            end = time.monotonic() + 10
            while len(results) < 3 and time.monotonic() < end:
                await asyncio.sleep(0.1)
        finally:
            await canary.shutdown()

    handler = Catch()
    logging.getLogger().addHandler(handler)
    try:
        asyncio.run(main())
    finally:
        logging.getLogger().removeHandler(handler)
    assert not errors, [r.getMessage() for r in errors]
    assert len(results) >= 3 and all(h.verdict == "ok" for res in results for h in res.hops)


@pytest.mark.parametrize(
    "name, code",
    [("x {unknown} y", 0), ("{{literal}} }{ {", 0), ("{trace_id", 0), ("{capture.x}", 2)],
)
def test_templates_with_stray_braces_are_sent_as_written_or_refused(
    sb: Sandbox, name: str, code: int
) -> None:
    """Only the known placeholders are filled in; anything else in braces goes out as written
    (ok), and a capture no request makes is a config error naming the path, never a crash."""
    text = lead_spec(sb, f"{sb.url}/api/v1/leads").replace(
        "json: {email:", f"json: {{name: {json.dumps(name)}, email:"
    )
    proc = cli("check", "-c", str(tmp_yaml(text)), *GATE, "--format", "json")
    no_traceback(proc)
    assert proc.returncode == code, proc.stderr[-1500:]
    if code == 0:
        (hop,) = json.loads(proc.stdout)["steps"][0]["hops"]
        assert hop["verdicts"]["ok"] == 3
    else:
        assert "steps.lead.inject.http" in proc.stderr


def test_canary_exit_is_not_held_by_a_black_hole_otlp_endpoint(sb: Sandbox) -> None:
    """SIGTERM with spans and metrics going to an endpoint that accepts and never answers: the
    final exports get a few seconds in all, not the exporter's 10 s per signal and retry (23 s
    measured before), so a supervisor's kill deadline is not spent on telemetry."""
    from tests.canary_helpers import CanaryProcess, lead_spec_text

    def never(_conn: socket.socket, _head: bytes) -> None:
        time.sleep(60)

    with Hostile(never) as hole:
        spec = tmp_yaml(lead_spec_text(sb.posthog_url, sb.url, grace="5s"))
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": hole.url, "OTEL_EXPORTER_OTLP_TIMEOUT": "10"}
        with CanaryProcess(spec, "--http-port", "0", "--no-preflight", env=env) as canary:
            canary.wait_for(lambda: len(canary.probes()) >= 3, 30, "probes")
            t0 = time.monotonic()
            rc = canary.terminate(timeout=60)
            took = time.monotonic() - t0
    assert rc == 0, canary.stderr_tail()
    assert "Traceback" not in "".join(canary.raw)
    assert all(p["verdict"] == "ok" for p in canary.probes()), canary.probes()
    assert took < 17, took  # hang guard with margin: probes resolve in ~1 s, exports get 5 s
