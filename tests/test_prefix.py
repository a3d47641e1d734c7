"""The frozen-prefix cache (``train.cache_prefix``): training from stored features is the
training of the full model, the cost model charges what the device runs, the planner and
the clock charge the one-off feature pass, and a run records who holds features."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from strategies import csv_rows

from legend.federation.adapters import init_global, slice_for
from legend.federation.apply import AdapterHost
from legend.federation.errors import FederationInputError
from legend.federation.flower.codec import (
    instruction_from_record,
    instruction_to_record,
    job_payload,
)
from legend.federation.job import load_job
from legend.federation.prefix import from_layer, prefix_features
from legend.federation.runner import prepare, run_job
from legend.federation.training import DeviceData, TokenizedSplit, train_steps
from legend.models.loaders import load_base_model
from legend.models.spec import get_model_spec
from legend.planner.api import plan_round
from legend.planner.catalog import fleet_costs
from legend.planner.costs import CostModel
from legend.planner.errors import FleetError
from legend.planner.plan import DevicePlan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams, load_fleet
from legend.planner.types import PlannerOptions, PlanningProblem

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.toml"


def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _data(vocab: int, n: int = 20, seq: int = 12, seed: int = 0) -> DeviceData:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[:, 9:] = 0  # padding: the features must follow the attention mask
    split = TokenizedSplit(
        {"input_ids": torch.randint(1, vocab, (n, seq), generator=g), "attention_mask": mask},
        torch.randint(0, 2, (n,), generator=g),
    )
    return DeviceData(split, np.arange(3, n - 2))


def _train(host: AdapterHost, plan: DevicePlan, data: DeviceData, prefix: int, **kw: Any) -> Any:
    glob = init_global(host.spec, 8, host.initial_head(), seed=3)
    with host.activate(plan, slice_for(glob, plan.layers, plan.ranks)) as model:
        loss = train_steps(
            model,
            data,
            steps=4,
            batch_size=4,
            learning_rate=0.05,
            weight_decay=0.0,
            seed=(1, 2),
            optimizer="sgd",
            prefix_layers=prefix,
            **kw,
        )
        return loss, host.extract()


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return _no_dropout(load_base_model("tiny-bert", seed=1))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_training_from_the_cache_is_training_the_full_model(
    family: str, bert: torch.nn.Module, tiny_roberta: Callable[..., Any], tmp_path: Path
) -> None:
    if family == "bert":
        base, name = bert, "tiny-bert"
    else:
        tiny_roberta().save_pretrained(tmp_path)
        base, name = _no_dropout(load_base_model(str(tmp_path))), str(tmp_path)
    spec = get_model_spec(name, target_modules="qv")
    host = AdapterHost(base, spec, JobParams(target_modules="qv"))
    data = _data(spec.vocab_size)
    L = spec.num_layers
    for first in range(1, L):
        plan = DevicePlan(device_id="d", layers=tuple(range(first, L)), ranks=(4,) * (L - first))
        loss_full, full = _train(host, plan, data, 0)
        loss_cached, cached = _train(host, plan, data, first)
        assert loss_cached == pytest.approx(loss_full, abs=1e-6)
        assert full.layers() == cached.layers()
        for key, (a, b) in full.factors.items():
            np.testing.assert_allclose(cached.factors[key][0], a, atol=1e-6)
            np.testing.assert_allclose(cached.factors[key][1], b, atol=1e-6)
            assert not np.array_equal(b, 0 * b), f"{key} did not train"
        for k, v in full.head.items():
            np.testing.assert_allclose(cached.head[k], v, atol=1e-6)


def test_local_steps_run_only_the_layers_above_the_cache(bert: torch.nn.Module) -> None:
    spec = get_model_spec("tiny-bert", target_modules="qv")
    host = AdapterHost(bert, spec, JobParams(target_modules="qv"))
    data = _data(spec.vocab_size)
    L, first = spec.num_layers, 2
    calls = dict.fromkeys(range(L), 0)
    handles = [
        block.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(bert.bert.encoder.layer)
    ]
    try:
        plan = DevicePlan(device_id="d", layers=tuple(range(first, L)), ranks=(4,) * (L - first))
        _train(host, plan, data, first)
    finally:
        for h in handles:
            h.remove()
    batches = math.ceil(data.num_samples / 4)  # the one feature pass over the device's samples
    assert calls == {i: (batches if i < first else 4) for i in range(L)}
    # the encoder is whole again afterwards
    assert len(bert.bert.encoder.layer) == L


def test_features_are_the_frozen_layers_output_without_dropout() -> None:
    base = load_base_model("tiny-bert", seed=1)  # with its dropout
    spec = get_model_spec("tiny-bert", target_modules="qv")
    data = _data(spec.vocab_size)
    tensors = {k: v for k, v in data.split.tensors.items()}
    base.train()
    feats = prefix_features(base, tensors, 2, batch_size=7)
    assert base.training  # the mode is restored
    base.eval()
    with torch.no_grad():
        want = base.bert(**tensors, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-5)
    # a forward from the features at layer 2 is the full model's (in eval mode)
    with torch.no_grad():
        full = base(**tensors).logits
        with from_layer(base, 2, feats):
            part = base(**tensors).logits
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shape"), from_layer(base, 2, feats[:3]):
        base(**tensors)
    with pytest.raises(ValueError, match="first"):
        prefix_features(base, tensors, 0, batch_size=4)


def test_the_cache_needs_an_encoder_family() -> None:
    llama = load_base_model("tiny-llama", seed=1)
    spec = get_model_spec("tiny-llama", target_modules="qv")
    with pytest.raises(FederationInputError, match=r"train\.cache_prefix.*set it to false"):
        AdapterHost(llama, spec, JobParams(target_modules="qv", cache_prefix=True))


# -- costs -----------------------------------------------------------------------------------


def _device(**kw: Any) -> DeviceProfile:
    values = dict(
        device_id="d",
        tflops=0.1,
        memory_gb=4.0,
        uplink_mbps=10.0,
        downlink_mbps=50.0,
        num_samples=80,
    )
    return DeviceProfile(**{**values, **kw})


def test_the_cache_skips_the_forward_of_the_frozen_layers() -> None:
    spec = get_model_spec("all-MiniLM-L6-v2", target_modules="qv")
    job = JobParams(batch_size=16, seq_len=32, local_steps=5)
    plain, cached = CostModel(spec, job), CostModel(spec, job.with_(cache_prefix=True))
    L = spec.num_layers
    layer = spec.layer_forward_flops_per_token(32) * 16 * 32
    for d in range(1, L + 1):
        layers, ranks = tuple(range(L - d, L)), (4,) * d
        saved = plain.step_flops(layers, ranks) - cached.step_flops(layers, ranks)
        assert saved == pytest.approx((L - d) * layer, rel=1e-9)
    # scattered layers (FedRA-style): forward from the lowest adapted layer up
    assert plain.step_flops((1, 4), (4, 4)) - cached.step_flops((1, 4), (4, 4)) == pytest.approx(
        layer, rel=1e-9
    )
    # a device still without features pays one forward pass of its samples through L-1 layers
    fresh = _device(prefix_built=False)
    build = 80 / 16 * (spec.forward_flops_per_token(32) * 16 * 32 - layer)
    assert cached.prefix_build_flops(80) == pytest.approx(build, rel=1e-9)
    assert cached.setup_s(fresh) == pytest.approx(build / 1e11, rel=1e-9)
    assert cached.setup_s(_device()) == 0.0 and plain.setup_s(fresh) == 0.0
    assert plain.prefix_build_flops(80) == 0.0
    got = cached.evaluate(fresh, (L - 1,), (2,)).compute_s
    assert got == pytest.approx(cached.evaluate(_device(), (L - 1,), (2,)).compute_s + build / 1e11)
    # the linear table and the vectorised fleet costs say the same as evaluate
    table = cached.table(fresh)
    for d in (1, 3, L):
        cost = cached.evaluate(fresh, tuple(range(L - d, L)), (8,) * d)
        k = job.ranks.index(8)
        linear = table.time_const_s + sum(table.time_coef_s[i][k] for i in range(L - d, L))
        assert linear == pytest.approx(cost.time_s, rel=1e-9)


def _fleet(n_fresh: int) -> Fleet:
    devices = [
        _device(device_id=f"d{i}", tflops=t, num_samples=s, prefix_built=i >= n_fresh)
        for i, (t, s) in enumerate([(0.05, 90), (0.05, 90), (0.2, 120), (1.0, 150)])
    ]
    return Fleet(devices=tuple(devices))


@pytest.mark.parametrize("n_fresh", [0, 1, 4])
def test_exact_plans_with_the_feature_pass_and_matches_the_oracle(n_fresh: int) -> None:
    spec = get_model_spec("tiny-bert", target_modules="qv")
    job = JobParams(batch_size=16, seq_len=32, local_steps=5, ranks=(2, 8), cache_prefix=True)
    fleet = _fleet(n_fresh)
    options = PlannerOptions(objective="rate")
    fleet_costs(PlanningProblem.create(fleet, spec, job, options))  # agrees with the model
    plan = plan_round(fleet, spec, job, options.with_(solver="highs"))
    oracle = plan_round(fleet, spec, job, options.with_(solver="brute-force"))
    assert plan.objective_value == pytest.approx(oracle.objective_value, rel=1e-6)
    costs = CostModel(spec, job)
    for dp in plan.devices:
        if dp.participates:
            want = costs.evaluate(fleet[dp.device_id], dp.layers, dp.ranks).compute_s
            assert dp.predicted_compute_s == pytest.approx(want, rel=1e-9)
    # the twin devices d0 and d1 differ only in holding features: the one without is slower
    if n_fresh == 1:
        t = {dp.device_id: dp.predicted_time_s for dp in plan.devices}
        same = plan.device("d0").layers == plan.device("d1").layers
        assert not same or t["d0"] > t["d1"]


def test_the_greedy_does_not_merge_devices_that_differ_in_features() -> None:
    spec = get_model_spec("all-MiniLM-L6-v2", target_modules="qv")
    job = JobParams(batch_size=16, seq_len=32, local_steps=5, cache_prefix=True)
    fleet = _fleet(1)
    plan = plan_round(fleet, spec, job, PlannerOptions(objective="rate", solver="greedy"))
    costs = CostModel(spec, job)
    for dp in plan.devices:
        if dp.participates:
            want = costs.evaluate(fleet[dp.device_id], dp.layers, dp.ranks).time_s
            assert dp.predicted_time_s == pytest.approx(want, rel=1e-9)


def test_fleet_files_may_say_who_holds_features(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    head = "device_id,tflops,memory_gb,uplink_mbps,downlink_mbps,num_samples,prefix_built\n"
    path.write_text(head + "a,1,4,10,50,80,false\nb,1,4,10,50,80,\n")
    fleet = load_fleet(path)
    assert [d.prefix_built for d in fleet.devices] == [False, True]
    assert Fleet.from_records(fleet.to_records()) == fleet
    path.write_text(head + "a,1,4,10,50,80,maybe\n")
    with pytest.raises(FleetError, match=r"row 1.*prefix_built.*'maybe'.*true or false"):
        load_fleet(path)
    with pytest.raises(FleetError, match="prefix_built"):
        _device(prefix_built="no")


# -- runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_cfg():
    return load_job(TINY, job__rounds=3, train__cache_prefix=True)


@pytest.fixture(scope="module")
def prepared(cached_cfg):
    return prepare(cached_cfg, calibration=None)


def test_a_run_charges_the_feature_pass_once_per_device(cached_cfg, prepared, tmp_path):
    result = run_job(cached_cfg, tmp_path / "run", prepared=prepared, show_progress=False)
    devices = csv_rows(result.out_dir / "devices.csv")
    fleet = prepared.fleet
    job = cached_cfg.job_params
    costs = CostModel(prepared.spec, job)
    held: set[str] = set()
    built_any = False
    for t in (1, 2, 3):
        for d in (d for d in devices if d["round"] == str(t) and d["status"] == "ok"):
            layers = tuple(int(x) for x in d["layers"].split())
            ranks = tuple(int(x) for x in d["ranks"].split())
            device = fleet[d["device_id"]]
            steps_s = costs.evaluate(device, layers, ranks).compute_s
            builds = d["device_id"] not in held and min(layers) > 0
            n = prepared.device_data[d["device_id"]].num_samples
            want = steps_s + (costs.prefix_build_flops(n) / device.flops_per_s if builds else 0)
            # no jitter in the tiny job: the clock is the cost model's
            assert float(d["observed_compute_s"]) == pytest.approx(want, rel=1e-9)
            # the plan knew who still had to compute its features
            predicted = costs.evaluate(
                replace(device, prefix_built=d["device_id"] in held), layers, ranks
            ).compute_s
            assert float(d["predicted_compute_s"]) == pytest.approx(predicted, rel=1e-6)
            built_any |= builds
            if builds:
                held.add(d["device_id"])
    assert built_any
    state = json.loads((result.out_dir / "checkpoints" / "state.json").read_text())
    assert state["progress"]["prefix_built"] == sorted(held)


def test_a_resumed_cached_run_equals_an_uninterrupted_one(cached_cfg, prepared, tmp_path):
    full = run_job(cached_cfg, tmp_path / "full", prepared=prepared, show_progress=False)
    run_job(cached_cfg, tmp_path / "part", prepared=prepared, show_progress=False, stop_after=1)
    resumed = run_job(
        cached_cfg, tmp_path / "part", prepared=prepared, show_progress=False, resume=True
    )
    a, b = csv_rows(full.out_dir / "rounds.csv"), csv_rows(resumed.out_dir / "rounds.csv")
    assert [r["accuracy"] for r in b] == [r["accuracy"] for r in a]
    # the devices' clock (the server's part is measured on the host, per run): a resumed run
    # remembers who computed features, so nobody pays for them twice
    da, db = csv_rows(full.out_dir / "devices.csv"), csv_rows(resumed.out_dir / "devices.csv")
    assert [d["observed_compute_s"] for d in db] == [d["observed_compute_s"] for d in da]
    assert [d["predicted_compute_s"] for d in db] == [d["predicted_compute_s"] for d in da]


def test_the_feature_pass_travels_in_a_flower_message(cached_cfg, prepared) -> None:
    from legend.federation.core import ClientInstruction

    glob = init_global(prepared.spec, 8, prepared.initial_head, seed=0)
    ins = ClientInstruction(
        round=1,
        device_id="phone-1",
        device_index=0,
        layers=(3,),
        ranks=(4,),
        init_state=slice_for(glob, (3,), (4,)),
        local_steps=2,
        batch_size=8,
        learning_rate=0.1,
        weight_decay=0.0,
        freeze_a=False,
        seed=(0, 1, 0),
        build_prefix=True,
    )
    job = job_payload(cached_cfg, prepared.fleet, None)
    record = instruction_to_record(ins, job)
    assert instruction_from_record(record).build_prefix is True
    # a server from before the cache sends no such key: no feature pass
    del record["legend.instruction"]["build-prefix"]
    assert instruction_from_record(record).build_prefix is False
    # the node reads the job's setting from the job's TOML
    assert "cache_prefix = true" in job["job-toml"]
