"""``legend plan``: the contract other tools rely on, output formats and exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from legend.federation.cli import main
from legend.planner.plan import Plan, validate_plan
from legend.planner.profiles import JobParams, load_fleet

ROOT = Path(__file__).resolve().parents[1]
FLEET = ROOT / "examples" / "fleet.csv"
HEADER = "device_id,tflops,memory_gb,uplink_mbps,downlink_mbps,num_samples"


def run(*args: str) -> int:
    return main(["plan", *args])


def test_table_summary_and_plan_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    code = run("--fleet", str(FLEET), "--model", "all-MiniLM-L6-v2", "--out", str(out))
    captured = capfd.readouterr()
    assert code == 0
    plan = Plan.load(out)
    fleet = load_fleet(FLEET)
    assert plan.solver == "sweep" and plan.status == "OPTIMAL"
    assert validate_plan(plan, fleet, _spec("all-MiniLM-L6-v2"), JobParams()) == []
    for fragment in ("solver", "status", "round time", "gap", "solve time", "waiting"):
        assert fragment in captured.out
    for device in fleet.devices:
        assert device.device_id in captured.out
    assert "Running HiGHS" not in captured.out  # solver banners go to stderr


def _spec(name: str):  # type: ignore[no-untyped-def]
    from legend.models.spec import get_model_spec

    return get_model_spec(name)


@pytest.mark.parametrize("solver", ["greedy", "pulp-cbc", "cvxpy-highs"])
def test_json_output_is_the_plan(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], solver: str
) -> None:
    out = tmp_path / "plan.json"
    code = run(
        "--fleet", str(ROOT / "examples" / "fleet.toml"),
        "--model", "tiny-bert",
        "--out", str(out),
        "--solver", solver,
        "--objective", "deadline",
        "--deadline-s", "2",
        "--ranks", "2,4,8",
        "--format", "json",
    )  # fmt: skip
    captured = capfd.readouterr()
    assert code == 0
    printed = json.loads(captured.out)
    assert printed == json.loads(out.read_text())
    assert printed["solver"] == solver and printed["ranks"] == [2, 4, 8]
    assert printed["objective"] == "deadline"


def test_extras_reach_the_planner(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    code = run(
        "--fleet", str(ROOT / "examples" / "fleet.json"),
        "--model", "all-MiniLM-L6-v2",
        "--out", str(out),
        "--solver", "greedy",
        "--target-modules", "all",
        "--batch-size", "8",
        "--seq-len", "32",
        "--local-steps", "5",
        "--bytes-per-param", "2",
        "--server-mbps", "1000",
        "--allow-dropping",
        "--min-depth", "2",
        "--free-ranks",
    )  # fmt: skip
    assert code == 0, capfd.readouterr().err
    plan = Plan.load(out)
    assert plan.options["min_depth"] == 2 and plan.options["allow_dropping"] is True
    assert plan.options["monotone_ranks"] is False and plan.options["server_mbps"] == 1000
    assert all(d.depth >= 2 for d in plan.participants)
    # fp16 transfer of all six modules: bytes are 2 per parameter.
    assert all(d.predicted_upload_bytes == 2 * d.trainable_params for d in plan.participants)


def test_saturation_response_reaches_the_planner(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan.json"
    code = run(
        "--fleet", str(ROOT / "examples" / "tiny_fleet.csv"),
        "--model", "tiny-bert",
        "--out", str(out),
        "--saturation", "1,1.5",
    )  # fmt: skip
    assert code == 0, capfd.readouterr().err
    plan = Plan.load(out)
    assert plan.options["saturation"] == [1.0, 1.5]
    assert plan.solver == "highs"  # the saturating program couples the devices


def _bad(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content)
    return path


BAD_FLEETS = [
    ("malformed.csv", f'{HEADER}\n"a,1,2,3,4,5\n', ["malformed.csv", "row 1", "cells"]),
    ("nocol.csv", "device_id,tflops\na,1\n", ["nocol.csv", "missing column", "memory_gb"]),
    ("extra.csv", f"{HEADER},gpu\na,1,2,3,4,5,x\n", ["extra.csv", "unknown column", "gpu"]),
    ("text.csv", f"{HEADER}\na,1,lots,3,4,5\n", ["text.csv", "row 1", "memory_gb", "'lots'"]),
    ("zero.csv", f"{HEADER}\na,0,2,3,4,5\n", ["zero.csv", "row 1", "tflops", "'0'"]),
    ("neg.csv", f"{HEADER}\na,1,2,3,4,-5\n", ["neg.csv", "row 1", "num_samples", "'-5'"]),
    ("nan.csv", f"{HEADER}\na,1,2,NaN,4,5\n", ["nan.csv", "row 1", "uplink_mbps", "'NaN'"]),
    ("dup.csv", f"{HEADER}\na,1,2,3,4,5\na,1,2,3,4,5\n", ["dup.csv", "row 2", "duplicate", "'a'"]),
    ("empty.csv", f"{HEADER}\n", ["empty.csv", "empty"]),
]


@pytest.mark.parametrize(
    ("name", "content", "fragments"), BAD_FLEETS, ids=[b[0] for b in BAD_FLEETS]
)
def test_bad_fleet_exits_2_with_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], name: str, content: str, fragments: list[str]
) -> None:
    path = _bad(tmp_path, name, content)
    out = tmp_path / "plan.json"
    code = run("--fleet", str(path), "--model", "tiny-bert", "--out", str(out))
    err = capfd.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    for fragment in fragments:
        assert fragment in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--model", "gpt-17"], ["gpt-17", "unknown model"]),
        (["--ranks", "8,4"], ["8, 4", "strictly increasing"]),
        (["--ranks", "0,4"], ["0", "> 0"]),
        (["--ranks", "2,four"], ["'four'"]),
        (["--objective", "fastest"], ["objective", "fastest"]),
        (["--objective", "deadline"], ["deadline_s", "--deadline-s"]),
        (["--objective", "deadline", "--deadline-s", "-1"], ["--deadline-s", "-1"]),
        (["--objective", "deadline", "--deadline-s", "nan"], ["--deadline-s", "nan"]),
        (["--solver", "magic"], ["magic", "pulp-highs"]),
        (["--format", "yaml"], ["--format", "yaml"]),
        (["--target-modules", "mlp"], ["--target-modules", "mlp"]),
        (["--batch-size", "0"], ["batch_size", "0"]),
        (["--bytes-per-param", "3"], ["bytes_per_param", "3"]),
        (["--calibration", "missing-calibration.json"], ["missing-calibration.json"]),
        (["--fleet", "no/such/fleet.csv"], ["no/such/fleet.csv", "does not exist"]),
        (["--solver", "brute-force"], ["brute-force", "limit"]),
        (["--saturation", "fast"], ["--saturation", "'fast'", "comma-separated"]),
        (["--saturation", "0,1"], ["saturation", "the first > 0"]),
        (["--saturation", "prior"], ["no coverage response is stored for tiny-bert"]),
    ],
)
def test_bad_arguments_exit_2(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], args: list[str], fragments: list[str]
) -> None:
    base = {"--fleet": str(FLEET), "--model": "tiny-bert", "--out": str(tmp_path / "p.json")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = [item for pair in base.items() for item in pair]
    code = run(*argv)
    err = capfd.readouterr().err
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err


def test_infeasible_deadline_exits_3_naming_each_device(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code = run(
        "--fleet", str(FLEET),
        "--model", "all-MiniLM-L6-v2",
        "--out", str(tmp_path / "p.json"),
        "--objective", "deadline",
        "--deadline-s", "4",
    )  # fmt: skip
    err = capfd.readouterr().err
    assert code == 3
    for device in ("phone-low-1", "phone-low-2", "phone-low-3"):
        assert f"'{device}'" in err
    assert "'laptop-1'" not in err
    assert "deadline" in err and "over by" in err


@pytest.mark.parametrize("solver", ["pulp-highs", "greedy"])
def test_infeasible_memory_exits_3_with_the_shortfall(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], solver: str
) -> None:
    code = run(
        "--fleet", str(FLEET),
        "--model", "llama-2-7b",
        "--out", str(tmp_path / "p.json"),
        "--solver", solver,
    )  # fmt: skip
    err = capfd.readouterr().err
    assert code == 3
    assert err.count("memory") >= 20 and "short by" in err


def test_solver_failure_exits_4(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code = run(
        "--fleet", str(FLEET),
        "--model", "bert-base-uncased",
        "--out", str(tmp_path / "p.json"),
        # a fixed deadline and a slow server link: the plan without the link moves too many
        # bytes, so there is no warm start to fall back on when the time runs out
        "--objective", "deadline",
        "--deadline-s", "1000",
        "--server-mbps", "0.5",
        "--solver", "highs",
        "--time-limit-s", "0.000001",
    )  # fmt: skip
    err = capfd.readouterr().err
    assert code == 4
    assert "time limit" in err


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    bad = _bad(tmp_path, "bad.csv", f"{HEADER}\na,1,2,3,4,zero\n")
    env_cmd = [sys.executable, "-m", "legend.federation.cli", "plan"]
    proc = subprocess.run(
        [*env_cmd, "--fleet", str(bad), "--model", "tiny-bert", "--out", str(tmp_path / "p.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {bad}, row 1: field `num_samples` = 'zero' is not a number; "
        "expected an integer > 0"
    )
    ok = subprocess.run(
        [*env_cmd, "--fleet", str(FLEET), "--model", "tiny-bert", "--solver", "greedy",
         "--out", str(tmp_path / "p.json"), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert Plan.from_json(ok.stdout) == Plan.load(tmp_path / "p.json")


def test_the_frozen_prefix_cache_reaches_the_planner(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    fleet_path = tmp_path / "fleet.csv"
    fleet_path.write_text(
        HEADER + ",prefix_built\n"
        "slow-new,0.05,3,4,20,90,false\nslow-old,0.05,3,4,20,90,true\nfast,1.0,8,40,200,150,\n"
    )
    out = tmp_path / "plan.json"
    args = ["--fleet", str(fleet_path), "--model", "all-MiniLM-L6-v2", "--out", str(out)]
    code = run(*args, "--seq-len", "32", "--local-steps", "5", "--cache-prefix")
    captured = capfd.readouterr()
    assert code == 0, captured.err
    plan = Plan.load(out)
    job = JobParams(seq_len=32, local_steps=5, cache_prefix=True)
    assert plan.job["cache_prefix"] is True
    fleet = load_fleet(fleet_path)
    assert validate_plan(plan, fleet, _spec("all-MiniLM-L6-v2"), job) == []
    from legend.planner.costs import CostModel

    costs = CostModel(_spec("all-MiniLM-L6-v2"), job)
    for dp in plan.participants:
        want = costs.evaluate(fleet[dp.device_id], dp.layers, dp.ranks).compute_s
        assert dp.predicted_compute_s == pytest.approx(want, rel=1e-9)
    # the device still to compute its features is charged for it
    new, old = plan.device("slow-new"), plan.device("slow-old")
    if new.layers == old.layers and new.ranks == old.ranks:
        assert new.predicted_compute_s > old.predicted_compute_s
    # without the flag the same fleet plans the uncached costs, in longer rounds
    args[-1] = str(tmp_path / "plain.json")
    code = run(*args, "--seq-len", "32", "--local-steps", "5", "--format", "json")
    assert code == 0
    plain = json.loads(capfd.readouterr().out)
    assert "cache_prefix" not in plain["job"]
    assert plain["round_time_s"] > plan.round_time_s
