"""Shared fixtures: paths of the example fleets and the tiny model's workload."""

from __future__ import annotations

from pathlib import Path

import pytest
from strategies import TINY, tiny_job

from legend.models.spec import ModelSpec
from legend.planner.profiles import JobParams

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run many times faster on one thread than on two busy cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def example_fleets() -> dict[str, Path]:
    """The example fleet in its three formats."""
    return {s: EXAMPLES / f"fleet.{s}" for s in ("csv", "toml", "json")}


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return TINY


@pytest.fixture
def tiny_workload() -> JobParams:
    return tiny_job()
