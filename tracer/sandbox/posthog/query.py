"""The query side of the sandbox PostHog: ``POST /api/projects/{id}/query/`` with a ``HogQLQuery``.

The text is parsed by PostHog's own parser (``parser.py``), so whatever PostHog's grammar refuses
is a 400 here too. The AST is then evaluated for a small subset over the ``events`` table: the
shapes the collector emits plus a few cheap generalisations; anything else is a 400 that names
what is not served. PostHog's answers that a client can get wrong are kept:

- ``properties.x`` is the property's raw JSON text with the outer quotes stripped (PostHog reads
  it with ``JSONExtractRaw``): a value holding a quote, a backslash or a newline does not compare
  equal to its decoded form.
- ``hasMore``/``limit``/``offset`` are only present when the query has no LIMIT (then 100 rows);
  with a LIMIT a full page says nothing about what was cut.
- OFFSET is refused for personal-API-key queries (keyset pagination on ``timestamp`` instead).
- A row is visible only from its ``visible_at`` (``created_at`` + ingest delay).
- Aggregates (``count``, ``countIf``, ``groupUniqArray[If](N)``) at the top of a select item,
  with or without ``GROUP BY`` plain expressions; a bare column that is neither grouped nor
  aggregated is refused, as ClickHouse refuses it.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tracer.sandbox.posthog.parser import HogQLSyntaxError, ParserPool, parse_select
from tracer.sandbox.posthog.state import (
    DEFAULT_LIMIT,
    EventStore,
    PostHogState,
    StoredEvent,
    error,
    iso,
)

_SCALAR_COLUMNS = {"uuid": "UUID", "event": "String", "distinct_id": "String"}
_TIME_COLUMNS = {"timestamp", "created_at"}
_TIME_TYPE = "DateTime64(6, 'UTC')"
_CLAUSES = {  # SelectQuery keys we do not serve, and how to name them in the 400
    "ctes": "WITH",
    "distinct": "DISTINCT",
    "having": "HAVING",
    "prewhere": "PREWHERE",
    "qualify": "QUALIFY",
    "window_exprs": "WINDOW",
    "limit_by": "LIMIT BY",
    "array_join_op": "ARRAY JOIN",
    "sample": "SAMPLE",
}
_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


class Unsupported(ValueError):
    """Valid HogQL outside the served subset; the message names what."""


def raw_text(value: Any) -> str | None:
    """A property as PostHog returns it: the raw JSON text, outer quotes stripped; JSON null is NULL."""
    if value is None:
        return None
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text[1:-1] if isinstance(value, str) else text


def _like_regex(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """A LIKE pattern as a regex: ``%`` any run, ``_`` one char, backslash makes the next literal."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "%" else "." if c == "_" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.S | (re.I if ignore_case else 0))


def _to_datetime(value: Any, tz: Any = "UTC") -> float | None:
    """``toDateTime(text[, zone])`` as epoch seconds; a text without offset is read in ``zone``."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        zone = ZoneInfo(str(tz))
    except (ZoneInfoNotFoundError, ValueError):
        raise Unsupported(f"unknown time zone {tz!r}") from None
    text = str(value).strip().replace(" ", "T", 1)
    text = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise Unsupported(f"cannot read {value!r} as a date-time") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=zone)).timestamp()


def _substring(s: Any, start: Any, length: Any = None) -> str | None:
    if s is None:
        return None
    begin = max(int(start) - 1, 0)
    return s[begin:] if length is None else s[begin : begin + int(length)]


def _extract(s: Any, pattern: Any) -> str | None:
    if s is None:
        return None
    m = re.search(pattern, s)
    return "" if m is None else (m.group(1) if m.groups() else m.group(0))


def _split_by_char(sep: Any, s: Any) -> list[str]:
    if not isinstance(sep, str) or len(sep) != 1:
        raise Unsupported("splitByChar needs a one-character separator")
    return [] if s is None else s.split(sep)


def _has(arr: Any, x: Any) -> bool:
    return x is not None and isinstance(arr, (list, frozenset, set)) and x in arr


def _range(a: Any, b: Any = None) -> list[int]:
    return list(range(int(a))) if b is None else list(range(int(a), int(b)))


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "lower": lambda s: None if s is None else s.lower(),
    "upper": lambda s: None if s is None else s.upper(),
    "length": lambda s: 0 if s is None else len(s),
    "substring": _substring,
    "extract": _extract,
    "extractAll": lambda s, p: [] if s is None else [m.group(0) for m in re.finditer(p, s)],
    "match": lambda s, p: s is not None and re.search(p, s) is not None,
    "splitByChar": _split_by_char,
    "has": _has,
    "range": _range,
    "toDateTime": _to_datetime,
    "toString": lambda v: None if v is None else str(v),
    "isNull": lambda v: v is None,
    "isNotNull": lambda v: v is not None,
}
_AGGREGATES = {"count", "countIf", "groupUniqArray", "groupUniqArrayIf"}


@dataclass
class _Query:
    """One parsed query and the per-request caches its evaluation uses."""

    tree: dict[str, Any]
    aliases: dict[str, dict[str, Any]]
    constants: dict[int, Any] = field(default_factory=dict)  # id(node) -> folded value
    patterns: dict[int, Any] = field(default_factory=dict)  # id(node) -> regex / set
    static: dict[int, bool] = field(default_factory=dict)  # id(node) -> no column or lambda inside
    persons: dict[str, dict[str, Any]] = field(default_factory=dict)  # distinct_id -> properties

    def is_static(self, node: Any) -> bool:
        key = id(node)
        if key not in self.static:
            self.static[key] = not _has_field(node)
        return self.static[key]


def _has_field(node: Any) -> bool:
    if isinstance(node, dict):
        if node.get("node") in ("Field", "Lambda"):
            return True
        return any(_has_field(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_field(v) for v in node)
    return False


def _eval(q: _Query, node: dict[str, Any], ev: StoredEvent, env: dict[str, Any]) -> Any:
    kind = node.get("node")
    if kind == "Constant":
        return node["value"]
    if kind == "Field":
        return _field(q, node["chain"], ev, env)
    if kind == "Alias":
        return _eval(q, node["expr"], ev, env)
    if kind == "And":
        return all(_eval(q, e, ev, env) for e in node["exprs"])
    if kind == "Or":
        return any(_eval(q, e, ev, env) for e in node["exprs"])
    if kind == "Not":
        return not _eval(q, node["expr"], ev, env)
    if kind in ("Tuple", "Array"):
        return [_eval(q, e, ev, env) for e in node["exprs"]]
    if kind == "CompareOperation":
        return _compare(q, node, ev, env)
    if kind == "ArithmeticOperation":
        a, b = _eval(q, node["left"], ev, env), _eval(q, node["right"], ev, env)
        if a is None or b is None:
            return None
        ops = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b}
        if node["op"] not in ops:
            raise Unsupported(f"unsupported operator {node['op']}")
        return ops[node["op"]]()
    if kind == "Call":
        return _call(q, node, ev, env)
    raise Unsupported(f"unsupported expression {kind}")


def _field(q: _Query, chain: list[Any], ev: StoredEvent, env: dict[str, Any]) -> Any:
    head = chain[0]
    if len(chain) == 1 and head in env:
        return env[head]
    if head == "events" and len(chain) > 1:  # a table-qualified column
        chain, head = chain[1:], chain[1]
    props: Any = ev.properties
    if head == "person" and len(chain) > 1 and chain[1] == "properties":
        # ``person.properties.x``: the event's person, by distinct_id (PostHog joins persons)
        chain, head, props = chain[1:], "properties", q.persons.get(ev.distinct_id, {})
    if head == "properties":
        if len(chain) == 1:
            raise Unsupported("selecting the whole 'properties' column is not supported")
        node: Any = props
        for part in chain[1:]:
            if not isinstance(node, dict):
                return None
            node = node.get(str(part))
        return raw_text(node)
    if len(chain) == 1 and (head in _SCALAR_COLUMNS or head in _TIME_COLUMNS):
        return getattr(ev, head)
    if len(chain) == 1 and head in q.aliases:
        return _eval(q, q.aliases[head], ev, env)
    raise Unsupported(f"unsupported column {'.'.join(map(str, chain))!r}")


def _compare(q: _Query, node: dict[str, Any], ev: StoredEvent, env: dict[str, Any]) -> bool:
    op = node["op"]
    left = _eval(q, node["left"], ev, env)
    if op in ("in", "not in"):
        key = id(node)
        if key not in q.patterns:
            right = node["right"]
            if _has_field(right):
                raise Unsupported("IN needs a list of constants")
            values = _eval(q, right, ev, env)
            q.patterns[key] = frozenset(values if isinstance(values, list) else [values])
        return left is not None and ((left in q.patterns[key]) == (op == "in"))
    if op in ("like", "ilike", "not like", "not ilike"):
        key = id(node)
        if key not in q.patterns:
            pattern = _eval(q, node["right"], ev, env)
            if not isinstance(pattern, str):
                raise Unsupported(f"{op.upper()} needs a string pattern")
            q.patterns[key] = _like_regex(pattern, "ilike" in op)
        hit = isinstance(left, str) and q.patterns[key].fullmatch(left) is not None
        return hit != op.startswith("not")
    if op not in _CMP:
        raise Unsupported(f"unsupported comparison {op}")
    right = _eval(q, node["right"], ev, env)
    if left is None or right is None:
        return False  # SQL: a comparison with NULL is never true
    if isinstance(left, float) != isinstance(right, float):  # a time column against a string
        left, right = (_to_datetime(v) if isinstance(v, str) else v for v in (left, right))
    try:
        return _CMP[op](left, right)
    except TypeError:
        return False


def _call(q: _Query, node: dict[str, Any], ev: StoredEvent, env: dict[str, Any]) -> Any:
    name = node["name"]
    key = id(node)
    if key in q.constants:
        return q.constants[key]
    if name in ("arrayExists", "arrayMap", "arrayFilter"):
        fn, arr = node["args"]
        if fn.get("node") != "Lambda" or len(fn["args"]) != 1:
            raise Unsupported(f"{name} needs a one-argument lambda")
        var = fn["args"][0]
        items = _eval(q, arr, ev, env) or []
        results = ((x, _eval(q, fn["expr"], ev, {**env, var: x})) for x in items)
        if name == "arrayExists":
            return any(r for _, r in results)
        return [r for _, r in results] if name == "arrayMap" else [x for x, r in results if r]
    if name in _AGGREGATES:
        raise Unsupported(f"aggregate {name}() is only served at the top of a select item")
    if name not in _FUNCTIONS:
        raise Unsupported(f"unsupported function {name}()")
    args = [_eval(q, a, ev, env) for a in node["args"]]
    try:
        value = _FUNCTIONS[name](*args)
    except TypeError as exc:
        raise Unsupported(f"{name}(): {exc}") from None
    if q.is_static(node["args"]):  # a constant expression is folded once per query
        if name == "splitByChar":
            value = frozenset(value)  # only ever used as a set (has, IN) in the subset
        q.constants[key] = value
    return value


def _aggregate_call(item: dict[str, Any]) -> dict[str, Any] | None:
    """The aggregate call a select item is, or None for a plain expression."""
    expr = item["expr"] if item.get("node") == "Alias" else item
    return expr if expr.get("node") == "Call" and expr.get("name") in _AGGREGATES else None


def _aggregate(q: _Query, node: dict[str, Any], group: list[StoredEvent]) -> Any:
    """One aggregate over the events of a group (NULLs are skipped, as ClickHouse skips them)."""
    name, args, params = node["name"], node["args"], node.get("params")
    if node.get("distinct") or node.get("filter_expr") or node.get("order_by"):
        raise Unsupported(f"{name}() with DISTINCT, FILTER or ORDER BY is not supported")
    want = {"count": 0, "countIf": 1, "groupUniqArray": 1, "groupUniqArrayIf": 2}[name]
    if len(args) != want or (params and (name.startswith("count") or len(params) != 1)):
        raise Unsupported(f"{name}() takes {want} argument(s)")
    if any(_aggregate_call(a) for a in args):
        raise Unsupported("aggregates cannot be nested")
    if name == "count":
        return len(group)
    if name == "countIf":
        return sum(1 for ev in group if _eval(q, args[0], ev, {}))
    cap = _constant_int(params[0], f"{name}(N)") if params else None
    out: list[Any] = []
    for ev in group:
        if name == "groupUniqArrayIf" and not _eval(q, args[1], ev, {}):
            continue
        v = _eval(q, args[0], ev, {})
        if v is not None and v not in out and (cap is None or len(out) < cap):
            out.append(v)
    return out


def _grouped(q: _Query, matched: list[StoredEvent], limit: int) -> tuple[list[list[Any]], bool]:
    """Rows of an aggregating query: one per distinct GROUP BY key (one in all without it)."""
    keys = q.tree.get("group_by") or []
    groups: dict[str, list[StoredEvent]] = {}
    for ev in matched:
        groups.setdefault(json.dumps([_eval(q, k, ev, {}) for k in keys], default=str), []).append(ev)
    if not keys and not groups:
        groups[""] = []  # an aggregate over nothing is still one row: count() = 0
    rows = []
    for group in groups.values():
        row = []
        for item in q.tree["select"]:
            agg = _aggregate_call(item)
            row.append(_aggregate(q, agg, group) if agg else _render(q, item, group[0]))
        rows.append(row)
    return rows[:limit], len(rows) > limit


def _check_grouping(q: _Query) -> bool:
    """Whether the query aggregates; refuses select items neither grouped nor aggregated."""
    keys = q.tree.get("group_by") or []
    aggs = [_aggregate_call(item) for item in q.tree["select"]]
    if not keys and not any(aggs):
        return False
    if q.tree.get("order_by"):
        raise Unsupported("ORDER BY with aggregates is not served here")
    for item, agg in zip(q.tree["select"], aggs, strict=True):
        expr = item["expr"] if item.get("node") == "Alias" else item
        if agg is not None:
            _aggregate(q, agg, [_NOBODY])
        elif expr not in keys:
            raise Unsupported(f"column {_column_name(item)!r} must be in GROUP BY or an aggregate")
    for k in keys:
        _eval(q, k, _NOBODY, {})
    return True


# --------------------------------------------------------------------------- pruning


def _event_names(node: dict[str, Any] | None) -> set[str] | None:
    """Event names the filter can possibly match, or None when it does not pin them down."""
    if not node:
        return None
    kind = node.get("node")
    if kind == "CompareOperation" and node["left"] == {"node": "Field", "chain": ["event"]}:
        right = node["right"]
        if node["op"] == "==" and right.get("node") == "Constant":
            return {str(right["value"])}
        tuple_of_constants = right.get("node") == "Tuple" and all(
            e.get("node") == "Constant" for e in right["exprs"]
        )
        if node["op"] == "in" and tuple_of_constants:
            return {str(e["value"]) for e in right["exprs"]}
    if kind in ("And", "Or"):
        sets = [_event_names(e) for e in node["exprs"]]
        if kind == "Or":
            return None if any(s is None for s in sets) else set().union(*sets)  # type: ignore[arg-type]
        known = [s for s in sets if s is not None]
        return set.intersection(*known) if known else None
    return None


def _window(q: _Query, node: dict[str, Any] | None) -> tuple[float, float]:
    """Timestamp bounds implied by the top-level AND (a superset is fine)."""
    lo, hi = -math.inf, math.inf
    parts = node["exprs"] if node and node.get("node") == "And" else [node] if node else []
    for c in parts:
        if c.get("node") != "CompareOperation" or c["left"] != {"node": "Field", "chain": ["timestamp"]}:
            continue
        if _has_field(c["right"]) or c["op"] not in _CMP:
            continue
        value = _eval(q, c["right"], _NOBODY, {})
        v = _to_datetime(value) if isinstance(value, str) else value
        if not isinstance(v, float):
            continue
        if c["op"] in (">", ">=", "=="):
            lo = max(lo, v)
        if c["op"] in ("<", "<=", "=="):
            hi = min(hi, v)
    return lo, hi


_NOBODY = StoredEvent("", "", "", {}, 0.0, 0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- running


def _constant_int(node: dict[str, Any] | None, what: str) -> int | None:
    if node is None:
        return None
    if node.get("node") != "Constant" or not isinstance(node.get("value"), int) or node["value"] < 0:
        raise Unsupported(f"{what} must be a whole number")
    return int(node["value"])


def _column_name(item: dict[str, Any]) -> str:
    if item.get("node") == "Alias":
        return str(item["alias"])
    if item.get("node") == "Field":
        return ".".join(str(c) for c in item["chain"])
    return "expr"


def _column_type(item: dict[str, Any]) -> str:
    expr = item["expr"] if item.get("node") == "Alias" else item
    agg = _aggregate_call(item)
    if agg is not None:
        return "UInt64" if agg["name"].startswith("count") else "Array(Nullable(String))"
    if expr.get("node") == "Field" and len(expr["chain"]) == 1:
        name = expr["chain"][0]
        return _TIME_TYPE if name in _TIME_COLUMNS else _SCALAR_COLUMNS.get(name, "String")
    return "Nullable(String)"


def prepare(text: str | dict[str, Any]) -> tuple[_Query, int | None]:
    """Check a query (text, or PostHog's parser's AST of it) against the served subset;
    (query, explicit LIMIT or None)."""
    tree = parse_select(text) if isinstance(text, str) else text
    if tree.get("node") != "SelectQuery":
        raise Unsupported("UNION and other set operations are not supported")
    for key, clause in _CLAUSES.items():
        if tree.get(key):
            raise Unsupported(f"{clause} is not supported here")
    if tree.get("offset") is not None:
        raise Unsupported(
            "OFFSET is not allowed for queries made with a personal API key: "
            "use keyset pagination on the `timestamp` column instead"
        )
    aliases = {str(s["alias"]): s["expr"] for s in tree["select"] if s.get("node") == "Alias"}
    q = _Query(tree, aliases)
    if not _check_grouping(q):
        for item in tree["select"]:  # unsupported functions and columns fail before the table check
            _eval(q, item, _NOBODY, {})
    source = tree.get("select_from")
    if not source and not tree.get("where") and not _has_field(tree["select"]):
        return q, _constant_int(tree.get("limit"), "LIMIT")  # ``SELECT 1``: a connectivity check
    table = source.get("table") if source else None
    if not source or source.get("next_join") or table != {"node": "Field", "chain": ["events"]}:
        raise Unsupported("only a plain 'FROM events' is served here")
    if tree.get("where"):
        _eval(q, tree["where"], _NOBODY, {})
    return q, _constant_int(tree.get("limit"), "LIMIT")


def run(q: _Query, store: EventStore, now: float, limit: int) -> tuple[list[list[Any]], bool]:
    """Rows over events visible at ``now``, and whether more rows exist past ``limit``."""
    if not q.tree.get("select_from"):  # constants only: one row
        return [[_render(q, s, _NOBODY) for s in q.tree["select"]]][:limit], False
    where = q.tree.get("where")
    lo, hi = _window(q, where)
    order = q.tree.get("order_by") or []
    by_timestamp = not order or (
        len(order) == 1
        and order[0]["order"] == "ASC"
        and order[0]["expr"] == {"node": "Field", "chain": ["timestamp"]}
    )
    grouping = bool(q.tree.get("group_by")) or any(_aggregate_call(i) for i in q.tree["select"])
    # candidates come in timestamp order; an aggregate needs them all
    enough = limit + 1 if by_timestamp and not grouping else math.inf
    matched: list[StoredEvent] = []
    for ev in store.candidates(_event_names(where), lo, hi):
        if ev.visible_at <= now and (not where or _eval(q, where, ev, {})):
            matched.append(ev)
            if len(matched) >= enough:
                break
    if grouping:
        return _grouped(q, matched, limit)
    for item in reversed(order):  # stable sorts, last key first; NULLs last either way
        desc = item["order"] == "DESC"

        def key(e: StoredEvent, expr: dict[str, Any] = item["expr"], desc: bool = desc) -> tuple[bool, Any]:
            v = _eval(q, expr, e, {})
            return ((v is not None) if desc else (v is None)), v

        matched.sort(key=key, reverse=desc)
    rows = [[_render(q, s, ev) for s in q.tree["select"]] for ev in matched[:limit]]
    return rows, len(matched) > limit


def _render(q: _Query, item: dict[str, Any], ev: StoredEvent) -> Any:
    got = _eval(q, item, ev, {})
    expr = item["expr"] if item.get("node") == "Alias" else item
    is_time = expr.get("node") == "Field" and expr["chain"] in (["timestamp"], ["created_at"])
    return iso(got) if is_time and isinstance(got, float) else got


async def handle(state: PostHogState, request: Request, parser: ParserPool) -> JSONResponse:
    """The query endpoint: auth, body shape, faults, then parse-and-run."""
    st = state
    st.queries += 1
    if st.query_fault is not None:
        return _fault(st.query_fault, st.retry_after)
    auth = request.headers.get("authorization", "")
    if not auth:
        return error(
            401, "authentication_error", "not_authenticated", "Authentication credentials were not provided."
        )
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or key.strip() != st.personal_api_key:
        detail = "Personal API key found in request Authorization header is invalid."
        return error(401, "authentication_error", "authentication_failed", detail)
    if request.path_params["project_id"] != st.project_id:
        return error(404, "invalid_request", "not_found", "Not found.")
    if st.query_raw is not None:
        return Response(st.query_raw, media_type="application/json")
    if st.query_body is not None:  # a broken or maintenance answer behind a 200
        return JSONResponse(st.query_body)
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        return error(
            400, "validation_error", "parse_error", "JSON parse error - request body is not valid JSON"
        )
    spec = body.get("query") if isinstance(body, dict) else None
    if (
        not isinstance(spec, dict)
        or spec.get("kind") != "HogQLQuery"
        or not isinstance(spec.get("query"), str)
    ):
        kind = spec.get("kind") if isinstance(spec, dict) else None
        detail = (
            f"unsupported query kind {kind!r}: only HogQLQuery is served here"
            if kind
            else "'query' must be a HogQLQuery"
        )
        return error(400, "validation_error", "invalid_input", detail)
    text = spec["query"]
    try:
        q, explicit = prepare(await parser.parse(text))
    except (HogQLSyntaxError, Unsupported) as exc:
        return error(400, "validation_error", "query_error", str(exc))
    except RecursionError:
        return error(400, "validation_error", "query_error", "query is nested too deeply")
    now = time.time()
    limit = min(explicit if explicit is not None else DEFAULT_LIMIT, st.max_limit)
    try:
        q.persons = st.persons
        rows, has_more = run(q, st._store, now, limit)
    except Unsupported as exc:
        return error(400, "validation_error", "query_error", str(exc))
    answer: dict[str, Any] = {
        "columns": [_column_name(s) for s in q.tree["select"]],
        "results": rows,
        "types": [[_column_name(s), _column_type(s)] for s in q.tree["select"]],
        "is_cached": bool(st.force_cached),
        "last_refresh": iso(now),
        "timings": [],
        "error": None,
        "query_status": None,
        "hogql": text,
    }
    if explicit is None:  # PostHog paginates only queries without their own LIMIT
        answer.update(hasMore=has_more, limit=limit, offset=0)
    return JSONResponse(answer)


def _fault(status: int, retry_after: float | None) -> JSONResponse:
    if status == 429:
        resp = error(429, "throttled_error", "throttled", "Request was throttled.")
    else:
        resp = error(status, "server_error", "error", "A server error occurred.")
    if retry_after is not None:
        resp.headers["Retry-After"] = f"{retry_after:g}"
    return resp
