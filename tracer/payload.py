"""Reading what sinks hand us: every string in a parsed body, and the value at a dotted path.

Shared by every collector that looks for a trace id in a payload, so "anywhere in the body" and
``a.b[0].c`` mean the same thing for webhooks, DLQ entries, PostHog events and the canary ledger.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

_PART = re.compile(r"[^.\[\]]+")


def strings_in(node: Any) -> Iterator[str]:
    """Every string in a parsed body, dict keys included; iterative, so no recursion limit to trip."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for k, v in item.items():
                yield str(k)
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            yield str(item)


def value_at(node: Any, path: str, *, json_strings: bool = False) -> Any:
    """The value at ``a.b[0].c`` (``a.b.0.c`` too), or None. ``json_strings``: step into JSON
    held in a string field, as DLQ payloads often are."""
    for part in _PART.findall(path):
        if json_strings and isinstance(node, str):
            try:
                node = json.loads(node)
            except ValueError:
                return None
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
