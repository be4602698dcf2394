"""Layers point down only: a module may import its own layer or a lower one, never a higher one.

The layer list is data (docs/ARCHITECTURE.md draws the same picture). Type-only imports count
too: an upward ``if TYPE_CHECKING:`` import is still a dependency a reader has to hold in mind.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module belongs to the first layer with a matching pattern.
LAYERS: list[tuple[str, list[str]]] = [
    (
        "foundations",
        [
            "tracer",
            "tracer.clock",
            "tracer.durations",
            "tracer.schema",
            "tracer.payload",
            "tracer.net",
            "tracer.mime",
            "tracer.probe",
            "tracer.synthetic",
            "tracer.ratelog",
            "tracer.stats",
        ],
    ),
    (
        "pipeline contracts",
        [
            "tracer.watch",
            "tracer.verdict",
            "tracer.evidence",
            "tracer.inject",
            "tracer.plugins",
            "tracer.receipts",
            "tracer.supervise",
        ],
    ),
    ("plugins: sinks and injectors", ["collectors", "collectors.*", "tracer.inject.*", "tracer.gauges"]),
    ("the spec", ["tracer.spec"]),
    (
        "running and exporting",
        [
            "tracer.engine",
            "tracer.export",
            "tracer.export.*",
            "tracer.ledger",
            "tracer.alerts",
            "tracer.status",
            "tracer.preflight",
        ],
    ),
    (
        "applications",
        [
            "tracer.canary",
            "tracer.cli",
            "tracer.reference",
            "tracer.starter",
            "tracer.sandbox",
            "tracer.sandbox.*",
        ],
    ),
]


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and docs/ARCHITECTURE.md)")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> set[str]:
    return imports_in(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def imports_in(source: str, own: str, is_package: bool) -> set[str]:
    """Every project module ``source`` imports (``from x import y`` counts y when it is a module)."""
    package = own if is_package else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}"))
    return {m for m in found if m.split(".")[0] in ("tracer", "collectors") and m != own}


def upward_imports(own: str, deps: set[str]) -> list[str]:
    me = layer_of(own)
    return [
        f"{own} ({LAYERS[me][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
        for d in sorted(deps)
        if layer_of(d) > me
    ]


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def sources() -> list[Path]:
    return sorted(p for d in ("tracer", "collectors") for p in (ROOT / d).rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    assert sources()
    for path in sources():
        layer_of(module_name(path))


def test_layers_point_down_only() -> None:
    upward = [u for path in sources() for u in upward_imports(module_name(path), project_imports(path))]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_rule_catches_an_upward_import() -> None:
    """Guards against a checker that sees nothing: type-only and relative imports count."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from tracer.spec import HopSpec\n"
        "from . import engine\n"
        "import collectors.posthog\n"
    )
    deps = imports_in(source, "tracer.watch", is_package=False)
    assert {"tracer.spec", "tracer.engine", "collectors.posthog"} <= deps
    assert len(upward_imports("tracer.watch", deps)) == 3
    assert upward_imports("tracer.cli", deps) == []


def test_spec_names_no_concrete_sink() -> None:
    """The spec is assembled from registered plugins: it imports no collector or injector.
    (``tracer.inject.auth`` is no injector: the credentials every injector may use, declared
    once at the spec's top level.)"""
    deps = project_imports(ROOT / "tracer" / "spec.py") | project_imports(ROOT / "tracer" / "engine.py")
    shared = {"tracer.inject.auth"}
    assert not [d for d in deps if d.startswith(("collectors", "tracer.inject.")) and d not in shared], deps
