"""The cost model's parameter counts against real Hugging Face / PEFT models."""

from __future__ import annotations

import pytest
import torch

from legend.federation.adapters import init_global, slice_for
from legend.federation.apply import HEAD_MODULE, AdapterHost
from legend.models.loaders import hf_config, load_base_model
from legend.models.spec import ModelSpec, get_model_spec
from legend.planner.costs import CostModel
from legend.planner.plan import DevicePlan
from legend.planner.profiles import JobParams

# (layers, ranks) as fractions of the depth: top-1, top-2, everything, scattered.
PLANS = [
    ((-1,), (16,)),
    ((-2, -1), (4, 8)),
    ("all", None),
    ((0, -2), (2, 16)),
]


def _concrete(spec: ModelSpec, layers: object, ranks: object) -> tuple[tuple[int, ...], ...]:
    L = spec.num_layers
    if layers == "all":
        grid = (2, 4, 8, 16)
        return tuple(range(L)), tuple(grid[min(i * 4 // L, 3)] for i in range(L))
    assert isinstance(layers, tuple) and isinstance(ranks, tuple)
    return tuple(sorted(layer % L for layer in layers)), ranks


def _check_counts(base: torch.nn.Module, model: str) -> None:
    for modules in ("qv", "attention", "all"):
        for train_head in (True, False):
            spec = get_model_spec(model, target_modules=modules)
            job = JobParams(target_modules=modules, train_head=train_head)
            host = AdapterHost(base, spec, job)
            costs = CostModel(spec, job)
            glob = init_global(spec, 16, host.initial_head(), seed=0)
            for raw_layers, raw_ranks in PLANS:
                layers, ranks = _concrete(spec, raw_layers, raw_ranks)
                plan = DevicePlan(device_id="d", layers=layers, ranks=ranks)
                with host.activate(plan, slice_for(glob, layers, ranks)) as peft_model:
                    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
                    state = host.extract()
                expected = costs.trainable_params(layers, ranks)
                assert trainable == expected, (model, modules, train_head, layers, ranks)
                # What travels on the wire is exactly what trains (plus the head, always sent).
                lora = spec.lora_params(layers, ranks)
                assert state.num_params(include_head=False) == lora
                assert state.num_params() == lora + spec.head_params


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_trainable_params_match_the_cost_model(model: str) -> None:
    _check_counts(load_base_model(model), model)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_total_params_match_the_real_model(model: str) -> None:
    base = load_base_model(model)
    spec = get_model_spec(model)
    assert spec.total_params == sum(p.numel() for p in base.parameters())
    head = getattr(base, HEAD_MODULE[spec.family])
    assert spec.head_params == sum(p.numel() for p in head.parameters())


@pytest.fixture(scope="module")
def minilm() -> torch.nn.Module:
    return load_base_model("all-MiniLM-L6-v2")


@pytest.mark.slow
def test_minilm_counts(minilm: torch.nn.Module) -> None:
    spec = get_model_spec("all-MiniLM-L6-v2", target_modules="all")
    assert spec.total_params == sum(p.numel() for p in minilm.parameters()) == 22_713_986
    # docs/costs.md: p_l = 6,912 with all six linear modules, 1,536 with query+value.
    assert spec.params_per_rank == 6912
    assert get_model_spec("all-MiniLM-L6-v2").params_per_rank == 1536
    _check_counts(minilm, "all-MiniLM-L6-v2")


@pytest.mark.parametrize(
    "model", ["bert-base-uncased", "roberta-base", "roberta-large", "llama-2-7b"]
)
def test_shape_presets_match_a_meta_model(model: str) -> None:
    """Build the preset's model on the meta device (no memory) and count its parameters."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        net = AutoModelForSequenceClassification.from_config(hf_config(model, num_labels=2))
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    for modules in ("qv", "all"):
        spec = get_model_spec(model, target_modules=modules)
        assert spec.total_params == sum(p.numel() for p in net.parameters())
        head = getattr(net, HEAD_MODULE[spec.family])
        assert spec.head_params == sum(p.numel() for p in head.parameters())
        # The host checks every (layer, module) of the spec against the real linear layers.
        AdapterHost(net, spec, JobParams(target_modules=modules))
