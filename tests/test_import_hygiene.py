"""The planner and model-shape modules import no heavy libraries (checked in a subprocess)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "peft", "transformers", "flwr")
SOLVERS = ("pulp", "cvxpy", "highspy")

# Solver libraries are imported inside the backend that uses them, never at import time.
MODULES = [
    "legend.models",
    "legend.models.spec",
    "legend.models.loaders",
    "legend.planner",
    "legend.planner.api",
    "legend.planner.costs",
    "legend.planner.plan",
    "legend.planner.profiles",
    "legend.planner.solvers",
    "legend.planner.cli",
    "legend.federation.adapters",
    "legend.federation.apply",
    "legend.federation.calibrate",
]


def _loaded_after_import(module: str) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_no_heavy_library(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not part of this installation")
    loaded = set(_loaded_after_import(module))
    assert "legend" in loaded
    assert sorted(loaded & set(HEAVY + SOLVERS)) == [], f"importing {module} pulled them in"
