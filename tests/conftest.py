"""Shared fixtures: paths of the example fleets and the tiny model's workload."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Nothing is downloaded: the models and data sets ship as packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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


@pytest.fixture
def tiny_roberta() -> Callable[..., Any]:
    """Makes a small RoBERTa classifier (2 layers, width 32), seeded, for local model folders."""

    def make(vocab_size: int = 100, num_labels: int = 2) -> Any:
        import torch
        from transformers import RobertaConfig, RobertaForSequenceClassification

        config = RobertaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            vocab_size=vocab_size,
            max_position_embeddings=40,
            num_labels=num_labels,
        )
        torch.manual_seed(0)
        return RobertaForSequenceClassification(config)

    return make
