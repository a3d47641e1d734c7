"""Plans applied to PEFT models: exact module mapping, the adapter host, frozen lower layers."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from legend.federation.adapters import AdapterState, init_global, slice_for
from legend.federation.apply import (
    AdapterHost,
    adapted_modules,
    lora_config_for,
    verify_adapter,
)
from legend.federation.errors import FederationError, FederationInputError
from legend.models.loaders import load_base_model
from legend.models.spec import get_model_spec
from legend.planner.plan import DevicePlan
from legend.planner.profiles import JobParams


def _plan(layers: tuple[int, ...], ranks: tuple[int, ...], device_id: str = "dev") -> DevicePlan:
    return DevicePlan(device_id=device_id, layers=layers, ranks=ranks)


def _batch(vocab: int, seed: int, batch: int = 4, seq: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


def _train(model: torch.nn.Module, vocab: int, steps: int = 2, seed: int = 0) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        loss = model(**_batch(vocab, seed + step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return load_base_model("tiny-bert", seed=1)


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return load_base_model("tiny-llama", seed=1)


def _host(base: torch.nn.Module, model: str, modules: str, **job: object) -> AdapterHost:
    spec = get_model_spec(model, target_modules=modules)
    return AdapterHost(base, spec, JobParams(target_modules=modules, **job))  # type: ignore[arg-type]


# -- lora_config_for -----------------------------------------------------------------------
def test_lora_config_carries_the_plan() -> None:
    spec = get_model_spec("tiny-bert", target_modules="qv")
    job = JobParams(lora_scale=1.5)
    config = lora_config_for(_plan((2, 3), (4, 16)), spec, job)
    assert config.task_type == "SEQ_CLS"
    assert set(config.target_modules) == {"query", "value"}
    assert config.layers_to_transform == [2, 3]
    assert config.lora_dropout == 0.0
    assert config.modules_to_save == ["classifier"]
    assert sorted(config.rank_pattern.values()) == [4, 16]
    for key, rank in config.rank_pattern.items():
        assert config.alpha_pattern[key] / rank == pytest.approx(1.5)
    assert config.lora_alpha / config.r == pytest.approx(1.5)


def test_lora_config_rejects_bad_plans() -> None:
    spec = get_model_spec("tiny-bert")
    job = JobParams()
    with pytest.raises(FederationInputError, match="sits the round out"):
        lora_config_for(_plan((), ()), spec, job)
    with pytest.raises(FederationInputError, match=r"layer 4 is outside 0\.\.3"):
        lora_config_for(_plan((3, 4), (2, 2)), spec, job)
    with pytest.raises(FederationInputError, match="rank of layer 3 must be >= 1"):
        lora_config_for(_plan((3,), (0,)), spec, job)
    with pytest.raises(ValueError, match="appears twice"):
        lora_config_for(_plan((3, 3), (2, 2)), spec, job)


def test_output_dense_alone_does_not_touch_attention_output(bert: torch.nn.Module) -> None:
    """In BERT, the suffix `output.dense` also names `attention.output.dense` for PEFT."""
    spec = get_model_spec("tiny-bert", target_modules=("output.dense",))
    plan = _plan((2, 3), (2, 4))
    host = AdapterHost(bert, spec, JobParams())
    init = slice_for(init_global(spec, 4, host.initial_head(), seed=0), plan.layers, plan.ranks)
    with host.activate(plan, init) as model:
        names = sorted(adapted_modules(model, "bert"))
    assert names == [
        "bert.encoder.layer.2.output.dense",
        "bert.encoder.layer.3.output.dense",
    ]
    # Control: PEFT's plain suffix matching would also have adapted attention.output.dense.
    naive = LoraConfig(
        task_type="SEQ_CLS", target_modules=["output.dense"], layers_to_transform=[3], r=2
    )
    fresh = load_base_model("tiny-bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(fresh, naive)
    assert "bert.encoder.layer.3.attention.output.dense" in adapted_modules(peft_model, "bert")


@pytest.mark.parametrize("modules", ["qv", "attention", "all"])
def test_exactly_the_planned_modules_get_lora(bert: torch.nn.Module, modules: str) -> None:
    host = _host(bert, "tiny-bert", modules)
    spec = host.spec
    plan = _plan((1, 3), (2, 8))
    init = slice_for(init_global(spec, 8, host.initial_head(), seed=0), plan.layers, plan.ranks)
    with host.activate(plan, init) as model:
        found = adapted_modules(model, "bert")
    expected = {(layer, m): r for layer, r in ((1, 2), (3, 8)) for m in spec.target_modules}
    assert {key: rank for key, rank, _ in found.values()} == expected
    assert len(found) == len(expected)
    assert all(scale == pytest.approx(2.0) for _, _, scale in found.values())


def test_verify_adapter_reports_mismatches(bert: torch.nn.Module) -> None:
    spec = get_model_spec("tiny-bert", target_modules="qv")
    job = JobParams()
    built = _plan((2, 3), (2, 4))
    fresh = load_base_model("tiny-bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh, lora_config_for(built, spec, job))
    verify_adapter(model, built, spec, lora_scale=2.0)
    with pytest.raises(FederationError) as info:
        verify_adapter(model, _plan((1, 2, 3), (2, 2, 8)), spec)
    text = str(info.value)
    assert "layer 1 `query` has no LoRA" in text
    assert "layer 3 `value` has rank 4, planned 8" in text
    with pytest.raises(FederationError, match="not in the plan"):
        verify_adapter(model, _plan((3,), (4,)), spec)
    with pytest.raises(FederationError, match=r"LoRA scale 2\.0, expected 1\.0"):
        verify_adapter(model, built, spec, lora_scale=1.0)
    # A pattern that matches nothing is not silently accepted.
    typo = LoraConfig(task_type="SEQ_CLS", target_modules=["query", "valu"], r=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model2 = get_peft_model(load_base_model("tiny-bert"), typo)
    with pytest.raises(FederationError, match="`value` has no LoRA"):
        verify_adapter(model2, _plan((0, 1, 2, 3), (2, 2, 2, 2)), spec)


# -- AdapterHost ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "modules"), [("tiny-bert", "qv"), ("tiny-bert", "all"), ("tiny-llama", "all")]
)
def test_host_round_trips_and_leaves_the_base_unchanged(
    request: pytest.FixtureRequest, name: str, modules: str
) -> None:
    base = request.getfixturevalue("bert" if name == "tiny-bert" else "llama")
    before = _snapshot(base)
    host = _host(base, name, modules)
    spec = host.spec
    glob = init_global(spec, 16, host.initial_head(), seed=3)
    plans = [
        _plan((3,), (16,), "a"),
        _plan((2, 3), (4, 8), "b"),
        _plan((0, 1, 2, 3), (2, 2, 4, 16), "c"),
        _plan((0, 2), (8, 8), "fedra"),  # scattered layers (FedRA-style baseline)
    ]
    for i, plan in enumerate(plans):
        init = slice_for(glob, plan.layers, plan.ranks)
        with host.activate(plan, init) as model:
            assert model.training
            assert host.extract().equals(init)  # exact float32 round trip
            _train(model, spec.vocab_size, seed=10 * i)
            trained = host.extract()
        assert not host.active
        assert trained.ranks() == init.ranks()
        assert set(trained.head) == set(init.head)
        for key, (a, b) in trained.factors.items():
            assert a.dtype == np.float32 and b.dtype == np.float32
            assert not np.array_equal(b, init.factors[key][1]), f"{key} did not train"
        assert not np.array_equal(
            trained.head[next(iter(trained.head))], init.head[next(iter(init.head))]
        )
    # No leftover adapter, no trainable parameter, the same modules and bit-identical weights.
    assert not hasattr(base, "peft_config")
    assert not any(p.requires_grad for p in base.parameters())
    assert not base.training
    assert _same(before, _snapshot(base))
    assert adapted_modules(base, spec.family) == {}


def test_injecting_adapters_consumes_no_global_randomness(bert: torch.nn.Module) -> None:
    host = _host(bert, "tiny-bert", "qv")
    glob = init_global(host.spec, 4, host.initial_head(), seed=0)
    before = torch.random.get_rng_state()
    for depth in (1, 2, 3):
        plan = _plan(tuple(range(4 - depth, 4)), (4,) * depth)
        with host.activate(plan, slice_for(glob, plan.layers, plan.ranks)):
            host.extract()
    assert torch.equal(before, torch.random.get_rng_state())


def test_roberta_head_round_trips(tmp_path: Path, tiny_roberta: Callable[..., Any]) -> None:
    tiny_roberta(num_labels=3).save_pretrained(str(tmp_path))
    base = load_base_model(str(tmp_path), num_labels=3)
    spec = get_model_spec(str(tmp_path), target_modules="attention", num_labels=3)
    host = AdapterHost(base, spec, JobParams(target_modules="attention"))
    head = host.initial_head()
    assert sorted(head) == [
        "classifier.dense.bias",
        "classifier.dense.weight",
        "classifier.out_proj.bias",
        "classifier.out_proj.weight",
    ]
    assert sum(v.size for v in head.values()) == spec.head_params
    plan = _plan((1,), (4,))
    init = slice_for(init_global(spec, 4, head, seed=0), plan.layers, plan.ranks)
    with host.activate(plan, init) as model:
        _train(model, 100)
        trained = host.extract()
    assert trained.ranks() == {(1, m): 4 for m in spec.target_modules}


def test_freeze_a_trains_b_only(bert: torch.nn.Module) -> None:
    host = _host(bert, "tiny-bert", "qv")
    plan = _plan((2, 3), (4, 4))
    init = slice_for(
        init_global(host.spec, 4, host.initial_head(), seed=0), plan.layers, plan.ranks
    )
    with host.activate(plan, init, freeze_a=True) as model:
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and not any(".lora_A." in n for n in trainable)
        _train(model, host.spec.vocab_size)
        trained = host.extract()
    for key, (a, b) in trained.factors.items():
        assert np.array_equal(a, init.factors[key][0])
        assert not np.array_equal(b, init.factors[key][1])


def test_layer_parameters_are_the_trainable_factors_by_layer(bert: torch.nn.Module) -> None:
    host = _host(bert, "tiny-bert", "qv")
    plan = _plan((1, 3), (2, 4))
    init = slice_for(
        init_global(host.spec, 4, host.initial_head(), seed=0), plan.layers, plan.ranks
    )
    for freeze_a, per_layer in ((False, 4), (True, 2)):  # q and v: A and B, or B only
        with host.activate(plan, init, freeze_a=freeze_a) as model:
            groups = host.layer_parameters()
            assert sorted(groups) == [1, 3]
            assert all(len(params) == per_layer for params in groups.values())
            assert all(p.requires_grad for params in groups.values() for p in params)
            ids = {id(p) for params in groups.values() for p in params}
            lora = {id(p) for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}
            assert ids == lora  # every trainable factor, in its own layer, and nothing else
            ranks = {1: 2, 3: 4}
            for layer, params in groups.items():
                assert all(ranks[layer] in tuple(p.shape) for p in params)
    with pytest.raises(FederationError, match="activate"):
        host.layer_parameters()


def test_frozen_head_when_the_job_says_so(bert: torch.nn.Module) -> None:
    host = _host(bert, "tiny-bert", "qv", train_head=False)
    plan = _plan((3,), (2,))
    init = slice_for(
        init_global(host.spec, 2, host.initial_head(), seed=0), plan.layers, plan.ranks
    )
    with host.activate(plan, init) as model:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _train(model, host.spec.vocab_size)
        trained = host.extract()
    assert n == host.spec.lora_params(plan.layers, plan.ranks)
    for name, value in trained.head.items():
        assert np.array_equal(value, init.head[name])


@pytest.mark.parametrize(("name", "lowest"), [("tiny-bert", 2), ("tiny-llama", 3)])
def test_backward_stops_at_the_lowest_adapted_layer(
    request: pytest.FixtureRequest, name: str, lowest: int
) -> None:
    base = request.getfixturevalue("bert" if name == "tiny-bert" else "llama")
    host = _host(base, name, "all")
    spec = host.spec
    layers = tuple(range(lowest, spec.num_layers))
    plan = _plan(layers, (4,) * len(layers))
    init = slice_for(init_global(spec, 4, host.initial_head(), seed=0), plan.layers, plan.ranks)
    out_grad: dict[int, bool] = {}
    fired: list[int] = []
    with host.activate(plan, init) as model:
        blocks = (
            model.base_model.model.bert.encoder.layer
            if name == "tiny-bert"
            else model.base_model.model.model.layers
        )
        handles = []
        for index, block in enumerate(blocks):

            def forward_hook(_m, _i, output, index=index):  # type: ignore[no-untyped-def]
                tensor = output[0] if isinstance(output, tuple) else output
                out_grad[index] = tensor.requires_grad

            def backward_hook(_m, _gi, _go, index=index):  # type: ignore[no-untyped-def]
                fired.append(index)

            handles.append(block.register_forward_hook(forward_hook))
            handles.append(block.register_full_backward_hook(backward_hook))
        loss = model(**_batch(spec.vocab_size, 0)).loss
        with warnings.catch_warnings():
            # The lowest hooked layer has no input requiring grad: exactly what is tested.
            warnings.simplefilter("ignore", UserWarning)
            loss.backward()
        for handle in handles:
            handle.remove()
        lora_grads = [
            p.grad for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n
        ]
    assert all(g is not None for g in lora_grads)
    assert out_grad == {i: i >= lowest for i in range(spec.num_layers)}
    assert set(fired) == set(range(lowest, spec.num_layers))


def test_evaluation_model_and_save_pretrained(bert: torch.nn.Module, tmp_path: Path) -> None:
    host = _host(bert, "tiny-bert", "qv")
    spec = host.spec
    glob = init_global(spec, 8, host.initial_head(), seed=5)
    # Give B non-zero values so that the adapter changes the logits.
    rng = np.random.default_rng(0)
    glob = AdapterState(
        factors={k: (a, rng.normal(0, 0.5, b.shape)) for k, (a, b) in glob.factors.items()},
        head=glob.head,
    )
    batch = _batch(spec.vocab_size, 7)
    batch.pop("labels")
    with torch.no_grad():
        plain = bert(**batch).logits
    with host.evaluation_model(glob) as model:
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert {k: r for k, r, _ in adapted_modules(model, "bert").values()} == glob.ranks()
        with torch.no_grad():
            adapted = model(**batch).logits
    assert not torch.allclose(plain, adapted)
    out = host.save_pretrained(glob, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_base_model("tiny-bert", seed=1), str(out))
    loaded.eval()
    with torch.no_grad():
        again = loaded(**batch).logits
    torch.testing.assert_close(again, adapted, rtol=0, atol=1e-6)


def test_host_errors(bert: torch.nn.Module) -> None:
    host = _host(bert, "tiny-bert", "qv")
    spec = host.spec
    glob = init_global(spec, 8, host.initial_head(), seed=0)
    plan = _plan((3,), (4,))
    with pytest.raises(FederationError, match="inside activate"):
        host.extract()
    wrong = slice_for(glob, (3,), (8,))
    with (
        pytest.raises(FederationInputError, match=r"A \(8, 64\).*expected A \(4, 64\)"),
        host.activate(plan, wrong),
    ):
        pass
    assert not host.active
    with (
        host.activate(plan, slice_for(glob, (3,), (4,))),
        pytest.raises(FederationError, match="still installed"),
        host.activate(plan, slice_for(glob, (3,), (4,))),
    ):
        pass
    assert not host.active
    init = slice_for(glob, (3,), (4,))
    with pytest.raises(RuntimeError, match="boom"), host.activate(plan, init):
        raise RuntimeError("boom")
    assert not host.active and not hasattr(bert, "peft_config")
    unfrozen = load_base_model("tiny-bert")
    next(unfrozen.parameters()).requires_grad_(True)
    with pytest.raises(FederationInputError, match="must be frozen"):
        AdapterHost(unfrozen, spec, JobParams())
    with pytest.raises(FederationInputError, match="does not describe this model"):
        AdapterHost(bert, get_model_spec("all-MiniLM-L6-v2"), JobParams())
