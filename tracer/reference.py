"""The spec's reference, generated from the models: they are the single source of truth.

``funnel-tracer schema`` prints the JSON Schema of ``FunnelSpec`` (editors use it for completion
and inline errors through a ``# yaml-language-server: $schema=...`` line); ``funnel-tracer
schema --markdown`` renders the same schema as ``docs/REFERENCE.md``: every option with its
type, default, meaning and a short example. A test fails when the committed files are stale::

    funnel-tracer schema --builtin-only > docs/funnel-spec.schema.json
    funnel-tracer schema --builtin-only --markdown > docs/REFERENCE.md

``builtin_only`` leaves out sinks and injectors of third-party distributions, so the committed
files do not depend on what else is installed.
"""

from __future__ import annotations

import json
from typing import Any

from tracer.spec import INJECTOR_PLUGINS, SINK_PLUGINS, FunnelSpec

SCHEMA_ID = "https://json-schema.org/draft/2020-12/schema"
_PLUGIN_SECTIONS = {"InjectSpec": INJECTOR_PLUGINS, "HopSpec": SINK_PLUGINS, "CollectorsSpec": SINK_PLUGINS}


def _builtin(plugin: Any) -> bool:
    return str(getattr(plugin.config, "__module__", "")).startswith(("tracer.", "collectors."))


def json_schema(builtin_only: bool = False) -> dict[str, Any]:
    schema = FunnelSpec.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    if builtin_only:
        for model, registry in _PLUGIN_SECTIONS.items():
            props = defs.get(model, {}).get("properties", {})
            for name in [n for n, p in registry.items() if not _builtin(p)]:
                props.pop(name, None)
        reachable = _reachable(schema)
        schema["$defs"] = {k: v for k, v in defs.items() if k in reachable}
        # Defaults such as collectors' name every registered section: keep the built-in ones.
        foreign = {n for reg in _PLUGIN_SECTIONS.values() for n, p in reg.items() if not _builtin(p)}
        for node in [schema, *schema["$defs"].values()]:
            for prop in node.get("properties", {}).values():
                if isinstance(prop.get("default"), dict):
                    prop["default"] = _drop_keys(prop["default"], foreign)
    schema["description"] = (FunnelSpec.__doc__ or "").strip().replace("\n    ", " ")
    return {"$schema": SCHEMA_ID, "title": "funnel-tracer spec", **schema}


def _values(node: dict[str, Any]) -> dict[str, Any] | None:
    """The schema of a map's values (``dict[str, X]``), if ``node`` is a map."""
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        return extra
    pattern = node.get("patternProperties")
    if isinstance(pattern, dict) and len(pattern) == 1:
        return next(iter(pattern.values()))
    return None


def _drop_keys(node: Any, names: set[str]) -> Any:
    if isinstance(node, dict):
        return {k: _drop_keys(v, names) for k, v in node.items() if k not in names}
    if isinstance(node, list):
        return [_drop_keys(v, names) for v in node]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else []
        for k, v in node.items():
            if k != "$defs":
                out += _refs(v)
        return out
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _reachable(schema: dict[str, Any]) -> set[str]:
    seen: set[str] = set()
    todo = _refs(schema)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _refs(schema["$defs"].get(name, {}))
    return seen


def schema_text(builtin_only: bool = False) -> str:
    return json.dumps(json_schema(builtin_only), indent=2, sort_keys=False) + "\n"


# -- markdown -------------------------------------------------------------------------------
def _type(node: dict[str, Any]) -> str:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in node:
        parts = [p for p in node["anyOf"] if p.get("type") != "null"]
        if len(parts) == 2 and {p.get("type") for p in parts} == {"number", "string"}:
            return "duration"
        text = " or ".join(_type(p) for p in parts)
        return text if len(parts) == len(node["anyOf"]) else f"{text} (or null)"
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return " | ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    t = node.get("type")
    if t == "array":
        return f"list of {_type(node.get('items', {}))}"
    if t == "object":
        values = _values(node)
        return f"map of name → {_type(values)}" if values is not None else "object"
    if node.get("format") == "password":
        return "secret string"
    if t == "string" and node.get("pattern"):
        return "string"
    return str(t or "any")


def _default(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in prop:
        return "-"
    d = prop["default"]
    if d is None:
        return "unset"
    if isinstance(d, dict) and d and _refs(prop):
        return "its section's defaults"
    return f"`{json.dumps(d)}`"


def _example(name: str, prop: dict[str, Any], defs: dict[str, Any]) -> str:
    """A one-line YAML example: the model's own example, else its default, else one by type."""
    refs = _refs(prop)
    if refs and not prop.get("examples"):
        return f"see [{refs[0]}](#{refs[0].lower()})"
    if prop.get("examples"):
        value: Any = prop["examples"][0]
    elif prop.get("default") not in (None, [], {}):
        value = prop["default"]
    else:
        value = _sample(prop, defs)
    if isinstance(value, str) and value.startswith("<"):
        return f"`{name}: {value}`"
    return f"`{name}: {json.dumps(value, separators=(', ', ': '))}`"


def _sample(node: dict[str, Any], defs: dict[str, Any]) -> Any:
    if "$ref" in node:
        return "<" + node["$ref"].rsplit("/", 1)[-1] + ">"
    if "anyOf" in node:
        parts = [p for p in node["anyOf"] if p.get("type") != "null"]
        if {p.get("type") for p in parts} == {"number", "string"}:
            return "5s"
        return _sample(parts[0], defs) if parts else None
    if "const" in node:
        return node["const"]
    if "enum" in node:
        return node["enum"][0]
    t = node.get("type")
    if t == "array":
        return [_sample(node.get("items", {}), defs)]
    if t == "object":
        values = _values(node)
        return {"name": _sample(values, defs)} if values is not None else {}
    if node.get("format") == "password":
        return "${SECRET}"
    return {"integer": 1, "number": 1.5, "boolean": True, "string": "text"}.get(str(t), "...")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(builtin_only: bool = False) -> str:
    schema = json_schema(builtin_only)
    defs: dict[str, Any] = schema.get("$defs", {})
    # Sections in the order a reader meets them, each with the first YAML path it appears at.
    order: list[tuple[str, str]] = [("FunnelSpec", "")]
    where = {"FunnelSpec": "(top level)"}
    i = 0
    while i < len(order):
        name, path = order[i]
        node = schema if name == "FunnelSpec" else defs[name]
        for key, prop in node.get("properties", {}).items():
            sub = f"{path}.{key}" if path else key
            for ref in _refs(prop):
                if ref not in where:
                    inner = _container_path(prop, sub)
                    where[ref] = inner
                    order.append((ref, inner))
        i += 1
    lines = [
        "# funnel-tracer spec reference",
        "",
        "<!-- Generated from the spec models by `funnel-tracer schema --builtin-only --markdown > docs/REFERENCE.md`;"
        " do not edit by hand (tests/test_reference.py fails when it is stale). -->",
        "",
        "Every option of the funnel spec, generated from the models `validate`, `check` and `canary` use.",
        "Durations are a number of seconds or text such as `5s`, `250ms`, `5m`, `1h30m`. Any value may",
        "use `${ENV_VAR}` or `${ENV_VAR:-default}`; templates (`{trace_id}`, `{probe_id}`, `{now_iso}`,",
        "`{now_epoch_s}`, `{now_epoch_ms}`, `{uuid}`, `{step}`, `{env:NAME}`, `{capture.NAME}`) are filled",
        'per probe. A value that is exactly one placeholder keeps its type: `"{now_epoch_s}"` is a number,',
        '`"{capture.id}"` whatever JSON value was captured.',
        "",
        "Editors: `funnel-tracer schema > funnel-spec.schema.json` and start the spec with",
        "`# yaml-language-server: $schema=./funnel-spec.schema.json` for completion and inline errors",
        "(VS Code with the Red Hat YAML extension, Neovim/Helix with yaml-language-server). The schema of",
        "the built-in plugins is committed as `docs/funnel-spec.schema.json`.",
        "",
        "## Contents",
        "",
    ]
    lines += [f"- [{name}](#{name.lower()}): `{where[name]}`" for name, _ in order]
    for name, _ in order:
        node = schema if name == "FunnelSpec" else defs[name]
        lines += ["", f"## {name}", "", f"At `{where[name]}`.", ""]
        desc = str(node.get("description") or "").strip()
        if desc:
            lines += [" ".join(desc.split()), ""]
        props = node.get("properties", {})
        if not props:
            lines.append("No options.")
            continue
        required = set(node.get("required", []))
        lines += ["| option | type | default | meaning | example |", "|---|---|---|---|---|"]
        for key, prop in props.items():
            meaning = " ".join(str(prop.get("description") or "").split()) or "-"
            lines.append(
                f"| `{key}` | {_cell(_type(prop))} | {_cell(_default(prop, key in required))} | "
                f"{_cell(meaning)} | {_cell(_example(key, prop, defs))} |"
            )
    return "\n".join(lines) + "\n"


def _container_path(prop: dict[str, Any], path: str) -> str:
    node = prop
    while True:
        if "anyOf" in node:
            node = next((p for p in node["anyOf"] if p.get("type") != "null"), {})
        elif node.get("type") == "array":
            node, path = node.get("items", {}), f"{path}[]"
        elif node.get("type") == "object" and _values(node) is not None:
            node, path = _values(node) or {}, f"{path}.<name>"
        else:
            return path
