"""The benchmark scripts' ``--smoke`` variants run end to end and write sane outputs.

Each script runs as it would from the command line (a subprocess, offline), on the tiny
BERT or small fleets; the assertions check the outputs' shape and ranges, not the numbers.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from strategies import csv_rows

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
METHODS = (
    "exact",
    "greedy",
    "greedy-learned",
    "exact-rate",
    "exact-drop",
    "exact-drop75",
    "greedy-drop75",
    "exact-price0.008",
    "exact-price0.08",
    "exact-price0.45",
    "exact-price-auto",
    "exact-probe",
    "uniform",
    "hetlora",
    "fedra",
    "depth-only",
    "rank-only",
)


def run_script(name: str, out: Path, *extra: str) -> str:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), "--smoke", "--out", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"benchmarks/{name} --smoke --out" in proc.stdout  # the reproduce command
    return proc.stdout


def bench_module(name: str) -> Any:
    """A module of benchmarks/, imported as the scripts run (with benchmarks/ on the path)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_fleet50_matches_its_generator() -> None:
    common = bench_module("common")
    assert common.FLEET50.read_text() == common.fleet50_csv()
    from legend.planner.profiles import load_fleet

    fleet = load_fleet(common.FLEET50)
    assert len(fleet) == 50
    classes = {d.device_class for d in fleet.devices}
    assert len(classes) >= 4 and len(classes) == len(common.FLEET50_CLASSES)
    tflops = [d.tflops for d in fleet.devices]
    up = [d.uplink_mbps for d in fleet.devices]
    down = [d.downlink_mbps for d in fleet.devices]
    assert max(tflops) / min(tflops) >= 10
    assert max(up) / min(up) >= 10 and max(down) / min(down) >= 10


@pytest.mark.slow
def test_time_to_accuracy_smoke(tmp_path: Path) -> None:
    out = tmp_path / "tta"
    run_script("time_to_accuracy.py", out)
    runs = csv_rows(out / "runs.csv")
    assert sorted(r["method"] for r in runs) == sorted(METHODS)
    for r in runs:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert float(r["sim_time_s"]) > 0 and float(r["total_bytes"]) > 0
        assert float(r["waiting_mean_s"]) >= 0
        assert int(r["rounds"]) == 3
        # the late gain (smoke: --flat-window 1): the last round against the one before
        accs = [float(x["accuracy"]) for x in csv_rows(out / "seed0" / r["method"] / "rounds.csv")]
        assert float(r["late_gain_pts"]) == pytest.approx(100 * (accs[2] - accs[1]))
        # Every method's moving average reaches the common target (its own accuracy at the
        # latest), and the time it is reached is on the method's simulated clock.
        assert r["time_to_common_s"] != ""
        assert 0 < float(r["time_to_common_s"]) <= float(r["sim_time_s"])
        assert float(r["common_target"]) <= float(r["accuracy"]) + 1e-12
        if r["reached"] == "True":
            # the device time leaves out the server's part of every round to the target
            device, full = float(r["device_time_to_target_s"]), float(r["time_to_target_s"])
            server = full - device
            assert 0 < device <= full and server >= 0
    # the same runs read to 2 rounds: every row stops at round 2 and its clock with it
    run_script("time_to_accuracy.py", out, "--collect-only", "--rounds", "2", "--window", "2")
    cut = {r["method"]: r for r in csv_rows(out / "runs.csv")}
    assert sorted(cut) == sorted(METHODS)
    for r in runs:
        short = cut[r["method"]]
        assert int(short["rounds"]) == 2
        assert 0 < float(short["sim_time_s"]) < float(r["sim_time_s"])
    # the adapter's change per round, from the run's checkpoints (benchmarks/adapter_growth.py)
    growth = bench_module("adapter_growth").growth_rows(out / "seed0" / "uniform")
    assert [g["round"] for g in growth] == [1, 2, 3]
    for g in growth:
        layers = [float(v) for v in str(g["layers"]).split()]
        assert len(layers) == 4  # the tiny BERT's layers, all adapted by uniform LoRA
        assert float(g["total"]) == pytest.approx(math.hypot(*layers), abs=0.01)
        assert float(g["total"]) > 0  # B starts at zero; a trained round moves it
    accuracies = {
        int(r["round"]): float(r["accuracy"])
        for r in csv_rows(out / "seed0" / "uniform" / "rounds.csv")
    }
    assert [g["accuracy"] for g in growth] == [accuracies[k] for k in (1, 2, 3)]
    # what each layer and rank slot bought the global model (benchmarks/attribution.py):
    # the slot groups and the layers split the same first-order decrease
    attribution = bench_module("attribution")
    assert attribution.slot_groups([2, 4, 8]) == [(0, 2), (2, 4), (4, 8)]
    rows = attribution.attribute(out / "seed0" / "exact", "validation", 0)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        layers = sum(v for k, v in r.items() if k.startswith("layer_"))
        slots = sum(v for k, v in r.items() if k.startswith("slots_"))
        assert layers == pytest.approx(slots, rel=1e-9, abs=1e-12)
        assert r["first_order_decrease"] == pytest.approx(layers + r["head"])
        assert math.isfinite(r["actual_decrease"]) and r["loss_before"] > 0
        # per layer and slot group: the cells split each layer's part, and the output
        # layer's first slot group is trained by every participant (mean-sized devices)
        for layer in range(3):
            cells = [v for k, v in r.items() if k.startswith(f"cell_{layer}_")]
            assert sum(cells) == pytest.approx(r[f"layer_{layer}"], rel=1e-9, abs=1e-12)
        ok = [
            d
            for d in csv_rows(out / "seed0" / "exact" / "devices.csv")
            if int(d["round"]) == r["round"] and d["status"] == "ok"
        ]
        last = max(int(k.split("_")[1]) for k in r if k.startswith("cover_"))
        assert r[f"cover_{last}_1-2"] == pytest.approx(len(ok))
    # the first order tracks the actual change of the loss over the three small steps
    first = [r["first_order_decrease"] for r in rows]
    actual = [r["actual_decrease"] for r in rows]
    assert sum(abs(f - a) for f, a in zip(first, actual, strict=True)) < sum(map(abs, actual))
    # how far the rounds are from their floor (benchmarks/round_floor.py): no plan beats the
    # floor on the same profiles, and uniform LoRA (every device at full depth) sits above it
    floor = bench_module("round_floor")
    for method in ("exact", "greedy", "uniform"):
        frows = floor.round_rows(out / "seed0" / method, 3)
        assert [r["round"] for r in frows] == [1, 2, 3]
        for r in frows:
            assert 0 < r["floor_s"] <= r["plan_s"] * (1 + 1e-9) and r["clock_s"] > 0
        if method == "uniform":
            assert all(r["plan_s"] > r["floor_s"] * 1.05 for r in frows)
    # what a round learns, per method: the mean accuracy after rounds 2 and 3 (the last)
    by_round = bench_module("time_to_accuracy").accuracy_by_round(out, [0], ["uniform"], 3, 2)
    assert list(by_round[0]) == ["method", "round 2", "round 3"]
    assert by_round[0]["round 3"] == pytest.approx(100 * accuracies[3])
    assert "## Accuracy by round" in (out / "time_to_accuracy.md").read_text()
    # the exact planner with the server's probe: it probed, and its probe is compared with
    # the layer gains the run learned (benchmarks/probe_agreement.py)
    state = json.loads((out / "seed0" / "exact-probe" / "checkpoints" / "state.json").read_text())
    assert state["progress"]["probe_time_s"] > 0
    agreement = bench_module("probe_agreement")
    rows, cpu = agreement.run_rows(out / "seed0" / "exact-probe", [1, 2], 8)
    assert cpu > 0 and [(r["round"], r["measure"]) for r in rows[:4]] == [
        (1, "probe"),
        (1, "squared_16"),
        (1, "squared_8"),
        (1, "learned"),
    ]
    for r in rows:
        assert r["layer 3"] == pytest.approx(1.0)  # ratios to the last layer
    assert math.isfinite(rows[3]["log_gap"]) and rows[3]["log_gap"] >= 0


def test_coverage_response_pools_cells_by_coverage() -> None:
    """A cell's decrease proportional to its coverage reads as a rising response; a cell
    trained at one coverage only says nothing and is left out."""
    attribution = bench_module("attribution")
    rows = []
    for t, c in enumerate([2.0, 4.0, 2.0, 4.0]):
        rows.append(
            {
                "run": "r",
                "round": t + 1,
                "cell_0_1-2": 0.5 * c,  # gain 0.5, proportional to coverage
                "cover_0_1-2": c,
                "cell_1_1-2": 3.0,  # always the same coverage
                "cover_1_1-2": 5.0,
            }
        )
    table = attribution.coverage_response(rows)
    assert [r["devices"] for r in table] == [2, 4]
    assert all(r["cells"] == 1 for r in table)
    # the cell's mean decrease is 1.5: 1.0 / 1.5 and 2.0 / 1.5
    assert [r["relative decrease"] for r in table] == pytest.approx([2 / 3, 4 / 3])


def test_progress_correlations_of_a_run() -> None:
    """Per run, how the plans' predicted progress tracked the validation and test loss
    drops; a constant prediction (uniform plans) or too few rounds says nothing."""
    tta = bench_module("time_to_accuracy")
    test_loss = [0.70, 0.60, 0.58, 0.40, 0.39]  # drops (from round 2) 0.10, 0.02, 0.18, 0.01
    predicted = [1.0, 5.0, 1.0, 9.0, 0.5]
    rounds = [
        {"predicted_progress": str(p), "val_loss_drop": str(-p), "test_loss": str(t)}
        for p, t in zip(predicted, test_loss, strict=True)
    ]
    val, test = tta.progress_correlations(rounds)
    assert val == pytest.approx(-1.0)
    # the drop of round t (its loss below round t-1's) goes with round t's plan: 0.02 x
    assert test == pytest.approx(1.0)
    flat = [dict(r, predicted_progress="5.9718") for r in rounds]
    assert all(math.isnan(v) for v in tta.progress_correlations(flat))
    assert all(math.isnan(v) for v in tta.progress_correlations(rounds[:2]))


def test_contention_rows_against_the_simulated_round(tmp_path) -> None:
    """The check of the exact planner's contention rows reads each round's plan and the
    devices' part of its simulated round (the server's part left out)."""
    from legend.models.spec import get_model_spec
    from legend.planner.costs import CostModel
    from legend.planner.profiles import load_fleet
    from legend.planner.topology import load_topology, predicted_round_time

    tta = bench_module("time_to_accuracy")
    cfg = tta.build_config(tta.parse_args(["--smoke"]), "greedy", 0)
    assert tta.contention_inputs(cfg) is None  # no topology
    assert math.isnan(tta.contention_rows_vs_clock(None, tmp_path, []))
    cfg = cfg.override(
        "job",
        fleet=str(ROOT / "examples" / "fleet_ap30.csv"),
        topology=str(ROOT / "examples" / "topology_ap30.toml"),
    )
    fleet = load_fleet(cfg.job.fleet)
    configurations = {d.device_id: ((3,), (8,)) for d in fleet.devices[:20]}
    (tmp_path / "plans").mkdir()
    plan = {"devices": [{"device_id": k, "layers": [3], "ranks": [8]} for k in configurations]}
    (tmp_path / "plans" / "round_0001.json").write_text(json.dumps(plan))
    rows = predicted_round_time(
        load_topology(cfg.job.topology, fleet),
        fleet,
        CostModel(get_model_spec(cfg.job.model), cfg.job_params),
        configurations,
    )
    round_row = {"round": "1", "sim_time_s": str(rows / 2 + 0.5), "server_time_s": "0.5"}
    inputs = tta.contention_inputs(cfg)
    assert tta.contention_rows_vs_clock(inputs, tmp_path, [round_row]) == pytest.approx(2.0)


def test_time_to_accuracy_recipe() -> None:
    """The moving-average target and the last-rounds accuracy of the benchmark recipe."""
    tta = bench_module("time_to_accuracy")
    accs = [0.5, 0.9, 0.55, 0.66, 0.7, 0.68]
    avg = tta.moving_average(accs, 3)
    assert all(math.isnan(a) for a in avg[:2])
    assert avg[2:] == pytest.approx([0.65, 0.7033333, 0.6366667, 0.68])
    rounds = [{"round": str(i + 1), "accuracy": str(a)} for i, a in enumerate(accs)]
    # One lucky round (0.9) does not reach 0.66; the first 3-round mean at or above it does.
    hit = tta.first_reaching(rounds, 0.66, 3)
    assert hit is not None and hit["round"] == "4"
    assert tta.first_reaching(rounds, 0.71, 3) is None
    args = tta.parse_args([])
    assert args.max_test >= 2000 and len(args.seeds) >= 5 and args.window == 3
    b = tta.parse_args(["--setting", "B"])
    assert b.topology.endswith("fleet50_ap.toml") and b.alpha == 0.5
    assert tta.parse_args(["--setting", "C"]).alpha == 0.1
    # the ablations run like any method; an unknown one is refused
    assert tta.parse_args(["--methods", "greedy-learned", "exact-rate"]).methods == [
        "greedy-learned",
        "exact-rate",
    ]
    with pytest.raises(SystemExit):
        tta.parse_args(["--methods", "greedy-on-something"])
    # the byte-price ablations differ from `exact` in the price alone
    smoke = tta.parse_args(["--smoke"])
    base = tta.build_config(smoke, "exact", 0)
    assert base.planner.seconds_per_mb == "auto"  # the default
    prices = {"exact-price0.008": 0.008, "exact-price0.08": 0.08, "exact-price0.45": 0.45}
    for label, price in [*prices.items(), ("exact-price-auto", "auto")]:
        priced = tta.build_config(smoke, label, 0)
        assert priced.planner.seconds_per_mb == price
        assert priced.override("planner", seconds_per_mb=base.planner.seconds_per_mb).planner == (
            base.planner
        )
    # the frozen-prefix cache is one switch for every method alike
    cached = tta.parse_args(["--cache-prefix"])
    for method in ("exact", "greedy", "uniform"):
        assert tta.build_config(cached, method, 0).job_params.cache_prefix is True
        assert tta.build_config(args, method, 0).job_params.cache_prefix is False


def test_fleet50_topology_matches_its_generator() -> None:
    common = bench_module("common")
    assert common.FLEET50_AP.read_text() == common.fleet50_ap_topology_toml()
    assert common.FLEET50_AP_STAGGERED.read_text() == common.fleet50_ap_topology_toml(
        contention="staggered"
    )
    from legend.planner.profiles import load_fleet
    from legend.planner.topology import load_topology

    topology = load_topology(common.FLEET50_AP, load_fleet(common.FLEET50))
    assert len(topology.routes) == 50
    # Every route runs device -> access point -> core -> server: three links.
    assert {len(route) for route in topology.routes.values()} == {3}
    assert topology.contention == "together"
    staggered = load_topology(common.FLEET50_AP_STAGGERED, load_fleet(common.FLEET50))
    assert staggered.contention == "staggered" and staggered.links == topology.links


@pytest.mark.slow
def test_observation_smoke(tmp_path: Path) -> None:
    out = tmp_path / "obs"
    run_script("observation.py", out)
    summary = csv_rows(out / "observation_summary.csv")
    assert [r["config"] for r in summary] == ["top-1", "top-2", "all-4", "bottom-2"]
    # Equal trainable-parameter budgets by construction.
    assert len({r["lora_params"] for r in summary}) == 1
    per_seed = csv_rows(out / "observation.csv")
    assert len(per_seed) == 4
    for r in per_seed:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert float(r["step_median_s"]) > 0
        assert float(r["train_peak_MB"]) >= 0
        assert math.isfinite(float(r["train_loss_last"]))


@pytest.mark.slow
def test_cost_fidelity_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cf"
    run_script("cost_fidelity.py", out)
    table = csv_rows(out / "cost_fidelity.csv")
    assert {(int(r["depth"]), int(r["rank"])) for r in table} == {
        (d, r) for d in (1, 2, 4) for r in (2, 8)
    }
    assert sum(r["anchor"] == "True" for r in table) == 4
    for r in table:
        assert float(r["measured_step_s"]) > 0
        assert float(r["calibrated_s"]) > 0 and float(r["analytic_s"]) > 0
        assert float(r["predicted_memory_MB"]) > 0 and float(r["measured_memory_MB"]) > 0
        assert math.isfinite(float(r["calibrated_err_pct"]))
    # The analytic model is anchored on depth 1 at the lowest rank: no error there.
    anchor = next(r for r in table if r["depth"] == "1" and r["rank"] == "2")
    assert abs(float(anchor["analytic_err_pct"])) < 1e-6
    assert len(csv_rows(out / "cost_fidelity_summary.csv")) == 1


def test_planner_quality_smoke(tmp_path: Path) -> None:
    out = tmp_path / "pq"
    run_script("planner_quality.py", out)
    table = csv_rows(out / "planner_quality.csv")
    assert {(r["fleet"], int(r["devices"])) for r in table} == {
        (k, n) for k in ("fleet50", "distinct") for n in (10, 30)
    }
    for r in table:
        assert r["valid"] == "True"
        assert r["ip_status"] in ("OPTIMAL", "FEASIBLE")
        ratio = float(r["greedy_over_ip"])
        gap = float(r["ip_gap"] or 0.0)
        # The exact planner's objective bounds the greedy's (up to its proven gap).
        assert 0 < ratio <= 1 + gap + 1e-6
        assert float(r["ip_time_s"]) > 0 and float(r["greedy_time_s"]) > 0


@pytest.mark.slow
def test_progress_prior_smoke() -> None:
    """The prior's measurement runs end to end (tiny random model) and prints an entry of
    the stored format: gains of mean 1 per layer, a non-decreasing response ending at 1."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "progress_prior.py"), "--smoke"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    entry = json.loads(proc.stdout[proc.stdout.index("{") :])["tiny-bert"]
    gains = entry["layer_gains"]
    assert len(gains) == 4 and sum(gains) / 4 == pytest.approx(1.0, abs=1e-3)
    response = [entry["rank_response"][r] for r in ("2", "4", "8")]
    assert response == sorted(response) and response[-1] == pytest.approx(1.0)


def test_run_inputs_are_verified_before_a_run_is_rebuilt(tmp_path: Path) -> None:
    """A run made from another checkout is rebuilt from the repository's copy of its fleet
    only when that copy has the digest the run recorded."""
    import hashlib

    common = bench_module("common")
    run = tmp_path / "run"
    run.mkdir()
    gone = tmp_path / "elsewhere" / "fleet50.csv"
    (run / "config.toml").write_text(
        f'[job]\nmodel = "all-MiniLM-L6-v2"\nfleet = "{gone}"\n', encoding="utf-8"
    )

    def record(digest: str) -> None:
        inputs = {"fleet": {"path": str(gone), "sha256": digest}}
        (run / "inputs.json").write_text(json.dumps(inputs), encoding="utf-8")

    record(hashlib.sha256(common.FLEET50.read_bytes()).hexdigest())
    assert Path(common.load_run_config(run).job.fleet) == common.FLEET50
    record("0" * 64)  # the repository's file is not the run's
    with pytest.raises(SystemExit, match=r"inputs.json.*fleet50.csv.*restore"):
        common.load_run_config(run)


def test_the_goals_check_the_method_they_are_asked_for() -> None:
    """``--goals-for`` checks an ablation of ``exact`` against the setting's goals, with the
    same arithmetic as ``exact`` (ratios per seed; four of five seeds and the mean)."""
    tta = bench_module("time_to_accuracy")
    rows = []
    for seed in range(5):
        for method, time_s, mb, acc in (
            ("exact", 10.0, 100.0, 0.73),
            ("exact-price-auto", 8.0, 40.0, 0.745 if seed else 0.70),
            ("greedy", 9.0, 100.0, 0.75),
            ("uniform", 30.0, 100.0, 0.75),
        ):
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "time_to_target_s": time_s,
                    "bytes_to_target": mb * 1e6,
                    "accuracy": acc,
                    "late_gain_pts": 0.1,
                }
            )
    methods = ["exact", "exact-price-auto", "greedy", "uniform"]
    plain = {g["goal"]: g["met"] for g in tta.goals(rows, methods, "A")}
    auto = {g["goal"]: g["met"] for g in tta.goals(rows, methods, "A", "exact-price-auto")}
    assert list(plain.values())[:4] == [True, False, False, False]
    assert list(auto.values())[:4] == [True, True, True, False]  # seed 0: 5 points below
    assert all(goal.startswith("exact-price-auto") for goal in list(auto)[:4])
    assert tta.goals(rows, ["exact", "greedy", "uniform"], "A", "exact-price-auto") == []


def test_solver_options_smoke(tmp_path: Path) -> None:
    """The HiGHS-options benchmark plans the same program under each configuration and
    reports each one's time against the first's, with the objectives' difference."""
    out = tmp_path / "solver_options"
    run_script("solver_options.py", out, "--configs", "no-restart", "no-restart-no-rins-rens")
    rows = csv_rows(out / "solver_options.csv")
    assert {r["config"] for r in rows} == {"no-restart", "no-restart-no-rins-rens"}
    assert all(r["status"] == "OPTIMAL" and float(r["plan_s"]) > 0 for r in rows)
    assert len({round(float(r["objective"]), 6) for r in rows}) == 1  # the same optimum
    assert "| no-restart-no-rins-rens | 1 |" in (out / "solver_options.md").read_text()
