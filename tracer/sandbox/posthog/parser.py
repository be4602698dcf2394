"""PostHog's own HogQL parser (``hogql-parser`` on PyPI), usable outside PostHog's monorepo.

Why: the sandbox must refuse exactly what PostHog's grammar refuses, and tests check every query
shape the collector emits against the same grammar. The C++ extension imports
``posthog.hogql.errors`` at load time; outside the monorepo ``posthog`` is the capture SDK, so a
stand-in module with the same exception names is registered first (only when the real one is
absent). We use the JSON entry point, which reports syntax errors as data instead of raising.
"""

from __future__ import annotations

import importlib
import json
import sys
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


def parse_select(text: str) -> dict[str, Any]:
    """The JSON AST of a SELECT, as PostHog's parser builds it, or ``HogQLSyntaxError``."""
    try:
        tree = json.loads(hogql_parser.parse_select_json(text, is_internal=True))
    except Exception as exc:  # the extension may still raise for internal failures
        raise HogQLSyntaxError(str(exc) or type(exc).__name__) from None
    if isinstance(tree, dict) and tree.get("error"):
        start = tree.get("start") or {}
        raise HogQLSyntaxError(str(tree.get("message") or "syntax error"), start.get("offset"))
    return tree
