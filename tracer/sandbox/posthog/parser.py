"""PostHog's own HogQL parser (``hogql-parser`` on PyPI), usable outside PostHog's monorepo.

Why: the sandbox must refuse exactly what PostHog's grammar refuses, and tests check every query
shape the collector emits against the same grammar. The C++ extension imports
``posthog.hogql.errors`` at load time; outside the monorepo ``posthog`` is the capture SDK, so a
stand-in module with the same exception names is registered first (only when the real one is
absent). We use the JSON entry point, which reports syntax errors as data instead of raising.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import json
import subprocess
import sys
import threading
import types
from typing import Any


class HogQLSyntaxError(ValueError):
    """PostHog's parser rejected the text; the message is the parser's own."""

    def __init__(self, message: str, start: int | None = None) -> None:
        super().__init__(message)
        self.start = start


def _install_error_module() -> None:
    try:
        importlib.import_module("posthog.hogql.errors")
        return
    except ImportError:
        pass

    class BaseHogQLError(Exception):
        def __init__(self, message: str = "", *, start: int | None = None, end: int | None = None, **_: Any):
            super().__init__(message)
            self.message, self.start, self.end = message, start, end

    errors = types.ModuleType("posthog.hogql.errors")
    errors.BaseHogQLError = BaseHogQLError  # type: ignore[attr-defined]
    names = ("ExposedHogQLError", "InternalHogQLError", "SyntaxError", "ParsingError", "QueryError")
    for name in (*names, "NotImplementedError", "ResolutionError"):
        setattr(errors, name, type(name, (BaseHogQLError,), {}))
    package = sys.modules.get("posthog.hogql") or types.ModuleType("posthog.hogql")
    package.__path__ = []  # type: ignore[attr-defined]
    package.errors = errors  # type: ignore[attr-defined]
    sys.modules.setdefault("posthog.hogql", package)
    sys.modules["posthog.hogql.errors"] = errors


_install_error_module()
import hogql_parser  # noqa: E402  (needs the error module above)


def parse_select_text(text: str) -> str:
    """PostHog's parser's JSON answer for ``text`` (an AST, or an error object). Picklable both
    ways, so it can run in a worker process."""
    try:
        return hogql_parser.parse_select_json(text, is_internal=True)
    except Exception as exc:  # the extension may still raise for internal failures
        return json.dumps({"error": True, "message": str(exc) or type(exc).__name__})


def parse_select(text: str) -> dict[str, Any]:
    """The JSON AST of a SELECT, as PostHog's parser builds it, or ``HogQLSyntaxError``."""
    return _tree(parse_select_text(text))


def _tree(answer: str) -> dict[str, Any]:
    tree = json.loads(answer)
    if isinstance(tree, dict) and tree.get("error"):
        start = tree.get("start") or {}
        raise HogQLSyntaxError(str(tree.get("message") or "syntax error"), start.get("offset"))
    return tree


_WARM_UP = (
    "SELECT uuid, event, timestamp, created_at, properties.`a` AS m0, properties.b.c AS m1 FROM events "
    "WHERE timestamp >= toDateTime('2024-01-01 00:00:00', 'UTC') AND timestamp <= toDateTime('2024-01-01 "
    "00:00:10', 'UTC') AND ((event = 'e' AND has(splitByChar(',', 'x,y'), properties.`a`)) OR (event IN "
    "('e', 'f') AND properties.a NOT IN ('x') AND arrayExists(r -> arrayExists(k -> has(splitByChar(',', "
    "'x'), substring(r, k, 32)), range(1, length(r) - 30)), extractAll(lower(properties.`a`), "
    "'[0-9a-f]{32,}')) AND properties.q LIKE '%x%')) ORDER BY timestamp ASC LIMIT 100"
)


class ParserPool:
    """PostHog's parser in a worker process. The C++ parser holds the GIL for its whole run
    (tens of milliseconds for a small query, seconds for a huge one); in-process it would stall
    the sandbox funnel, the SDK and the tracer sharing that interpreter, a lag PostHog's own
    servers never put on its clients. One worker per interpreter (a plain subprocess speaking
    JSON lines: no multiprocessing re-import of ``__main__``), shared by every app, started
    before the server accepts queries so no query pays the process start."""

    _proc: subprocess.Popen[bytes] | None = None
    _lock = threading.Lock()
    _recent: dict[str, str] = {}  # query text -> parser answer, oldest first

    @classmethod
    def ask(cls, text: str) -> str:
        """The parser's JSON answer (blocking; call it off the event loop)."""
        with cls._lock:
            if cls._proc is None or cls._proc.poll() is not None:
                cmd = [sys.executable, "-m", "tracer.sandbox.posthog.parser_worker"]
                cls._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                atexit.register(cls._proc.kill)
            proc = cls._proc
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps(text).encode() + b"\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except (BrokenPipeError, OSError):
                line = b""
            if not line:  # the worker died (killed, out of memory): a fresh one next time
                cls._proc = None
                return json.dumps({"error": True, "message": "internal error: the parser process died"})
            return line.decode()

    async def start(self) -> None:
        """Start the worker and warm the parser's lazily built decision tables on the shapes the
        tracer sends (the first parse of a new shape is several times slower)."""
        for _ in range(3):  # the tables keep growing over the first few parses
            await asyncio.get_running_loop().run_in_executor(None, self.ask, _WARM_UP)

    async def parse(self, text: str) -> dict[str, Any]:
        """The AST of ``text`` (read-only: shared between requests with the same text). A poller
        repeats its text within a second, so a small cache keeps the shared machine's cores for
        the processes under test; what is parsed, and so refused, is unchanged."""
        with self._lock:
            answer = self._recent.get(text)
        if answer is None:
            answer = await asyncio.get_running_loop().run_in_executor(None, self.ask, text)
            with self._lock:
                self._recent[text] = answer
                while len(self._recent) > 32:
                    self._recent.pop(next(iter(self._recent)))
        return _tree(answer)
