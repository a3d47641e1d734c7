"""The import graph of ``legend.*``: one direction, no cycles, light planner and models.

Layers, lowest first: ``models`` <- ``planner`` <- ``federation`` <- ``reports``. A module
may import its own layer and the layers below it, never one above. The graph is read from
the source with :mod:`ast` (every ``import``, at module level or inside a function), so a
deferred import counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("models", "planner", "federation", "reports")
"""Packages from the bottom layer up; each is the folder of ``legend.<name>``."""

ENTRY_POINT = "legend.federation.cli"
"""The ``legend`` console script: it assembles every command, so it sits above every layer."""

ACYCLIC = ("federation", "reports", "models", "planner")
"""Packages whose modules must form no import cycle (add a package here to hold it too)."""

HEAVY = ("torch", "peft", "flwr", "transformers")

FLOWER_PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.simulation")
"""Flower's public packages; anything else under ``flwr.`` is an internal."""


def _module_name(path: Path) -> str:
    layer, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = ["legend", layer, *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _sources() -> dict[str, Path]:
    found = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imported(name: str, path: Path) -> set[str]:
    """Every absolute module name ``name``'s source imports (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out.add(module)
            # `from package import submodule` imports the submodule.
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


@cache
def _graph() -> nx.DiGraph:
    """Edges between ``legend.*`` modules that exist in the tree."""
    sources = _sources()
    graph = nx.DiGraph()
    graph.add_nodes_from(sources)
    for name, path in sources.items():
        for target in _imported(name, path):
            if target in sources and target != name:
                graph.add_edge(name, target)
    return graph


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_the_graph_sees_every_package() -> None:
    layers = {_layer(m) for m in _graph()}
    assert layers == set(LAYERS)
    assert _graph().number_of_edges() > 50


def test_imports_point_down_the_layers() -> None:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = sorted(
        f"{source} -> {target}"
        for source, target in _graph().edges
        if source != ENTRY_POINT and rank[_layer(target)] > rank[_layer(source)]
    )
    assert upward == [], "imports pointing up the layers models <- planner <- federation <- reports"


def test_only_the_entry_point_imports_every_layer() -> None:
    """The exception above is the console script, and it imports nothing else upward."""
    targets = {_layer(t) for t in _graph().successors(ENTRY_POINT)}
    assert targets == {"models", "planner", "federation", "reports"}


@pytest.mark.parametrize("package", ACYCLIC)
def test_no_import_cycle(package: str) -> None:
    graph = _graph().subgraph(m for m in _graph() if _layer(m) == package)
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert cycles == [], f"import cycles in legend.{package}: {cycles}"


def _flower_internals(module: str) -> set[str]:
    return {
        name
        for name in _imported(module, _sources()[module])
        if name.startswith("flwr.")
        and not any(name == p or name.startswith(p + ".") for p in FLOWER_PUBLIC)
    }


def test_at_most_one_module_imports_flower_internals() -> None:
    users = {m: sorted(_flower_internals(m)) for m in _sources() if _flower_internals(m)}
    assert len(users) <= 1, f"modules importing Flower internals: {users}"


def test_the_flower_public_api_is_what_the_apps_import() -> None:
    """The check above must see Flower imports at all (a guard against a silent parser)."""
    imported = set().union(*(_imported(m, p) for m, p in _sources().items()))
    assert {"flwr.clientapp", "flwr.serverapp", "flwr.app"} <= imported


def test_planner_and_models_load_no_heavy_library() -> None:
    modules = sorted(m for m in _sources() if _layer(m) in ("planner", "models"))
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "legend" in loaded
    assert sorted(loaded & set(HEAVY)) == [], f"importing {len(modules)} modules pulled them in"
