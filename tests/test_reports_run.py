"""Run reports: real tiny runs of two methods, known answers on hand-written run directories,
and clear errors for broken run directories."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from legend.federation.cli import main
from legend.reports.errors import ReportInputError
from legend.reports.render import write_report
from legend.reports.run_report import (
    DEVICE_COLUMNS,
    ROUND_COLUMNS,
    build_run_report,
    default_target,
    load_run,
    target_frame,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.toml"


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory) -> list[Path]:
    """Two short real runs (LEGEND's exact planner and uniform LoRA) on the tiny model."""
    from legend.federation.job import load_job
    from legend.federation.runner import prepare, run_job

    cfg = load_job(
        TINY,
        job__rounds=2,
        train__local_steps=1,
        data__max_train=120,
        data__max_test=40,
        planner__solver="greedy",
        federation__jitter=0.2,
    )
    prepared = prepare(cfg, calibration=None)
    base = tmp_path_factory.mktemp("runs")
    out = []
    for method in ("exact", "uniform"):
        run_cfg = cfg.override("job", method=method)
        out.append(run_job(run_cfg, base / method, prepared=prepared, show_progress=False).out_dir)
    return out


def write_run(
    path: Path,
    method: str,
    accuracy: list[float],
    sim_time_s: list[float],
    mb_per_round: float,
    *,
    devices: tuple[tuple[str, str], ...] = (("a-1", "a"), ("b-1", "b")),
    observed_factor: float = 1.1,
) -> Path:
    """A run directory in the format `legend run` writes (hand-chosen numbers)."""
    path.mkdir(parents=True)
    (path / "config.toml").write_text(f'[job]\nmethod = "{method}"\n')
    (path / "summary.json").write_text(
        json.dumps(
            {
                "method": method,
                "model": "tiny-bert",
                "dataset": "rotten_tomatoes",
                "final_accuracy": accuracy[-1],
                "rounds": len(accuracy),
            }
        )
    )
    clock = 0.0
    rounds, rows = [], []
    for t, (acc, dt) in enumerate(zip(accuracy, sim_time_s, strict=True), start=1):
        clock += dt
        rounds.append(
            {
                "round": t,
                "sim_time_s": dt,
                "sim_clock_s": clock,
                "host_time_s": 1.0,
                "host_clock_s": float(t),
                "accuracy": acc,
                "test_loss": 0.5,
                "bytes_up": mb_per_round * 5e5,
                "bytes_down": mb_per_round * 5e5,
                "cum_bytes": mb_per_round * 1e6 * t,
                "participants": len(devices),
                "dropped": 0,
                "rejected": 0,
                "waiting_mean_s": dt / 4,
                "waiting_max_s": dt / 2,
                "planned_round_time_s": dt,
            }
        )
        for k, (device_id, device_class) in enumerate(devices):
            predicted = dt / (k + 1)
            rows.append(
                {
                    "round": t,
                    "device_id": device_id,
                    "device_class": device_class,
                    "status": "ok",
                    "layers": "2 3",
                    "ranks": "4 8",
                    "depth": 2,
                    "predicted_time_s": predicted,
                    "observed_time_s": predicted * observed_factor,
                    "predicted_compute_s": predicted / 2,
                    "observed_compute_s": predicted / 2 * observed_factor,
                    "bytes_up": 1000,
                    "bytes_down": 1000,
                    "memory_bytes": 1e8,
                    "train_loss": 0.6,
                    "samples": 50,
                    "waiting_s": dt - predicted,
                }
            )
    for name, data, columns in (
        ("rounds.csv", rounds, ROUND_COLUMNS),
        ("devices.csv", rows, DEVICE_COLUMNS),
    ):
        with (path / name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(data)
    return path


# -- known answers -------------------------------------------------------------------------


def test_time_and_bytes_to_target_by_hand(tmp_path):
    a = load_run(write_run(tmp_path / "a", "uniform", [0.5, 0.6, 0.7], [10, 10, 10], 100))
    b = load_run(write_run(tmp_path / "b", "exact", [0.55, 0.65, 0.68], [5, 5, 5], 40))
    assert default_target([a, b]) == 0.68
    frame = target_frame([a, b], 0.68).set_index("run")
    assert frame.loc["uniform", "time_to_target_s"] == 30
    assert frame.loc["exact", "time_to_target_s"] == 15
    assert frame.loc["uniform", "MB_to_target"] == 300
    assert frame.loc["exact", "MB_to_target"] == 120
    assert frame.loc["exact", "speedup_vs_slowest"] == 2
    assert frame.loc["exact", "MB_saved_vs_most_pct"] == pytest.approx(60)
    lower = target_frame([a, b], 0.6).set_index("run")
    assert list(lower["rounds_to_target"]) == [2, 2]
    assert list(lower["time_to_target_s"]) == [20, 10]
    unreached = target_frame([a, b], 0.69).set_index("run")
    assert not unreached.loc["exact", "reached"]
    assert math.isnan(unreached.loc["exact", "time_to_target_s"])


def test_calibration_error_by_hand(tmp_path):
    run = load_run(write_run(tmp_path / "r", "exact", [0.5, 0.6], [4, 4], 10, observed_factor=1.25))
    report = build_run_report([run])
    calib = report.table("calibration").frame
    assert set(calib["device_class"]) == {"a", "b"}
    assert calib["time_mape_pct"].tolist() == pytest.approx([25.0, 25.0])
    assert calib["time_ratio"].tolist() == pytest.approx([1.25, 1.25])
    assert report.table("calibration_devices").rows_total == 2


def test_same_method_twice_gets_distinct_labels(tmp_path):
    a = load_run(write_run(tmp_path / "seed0", "exact", [0.5, 0.6], [1, 1], 1))
    b = load_run(write_run(tmp_path / "seed1", "exact", [0.5, 0.7], [1, 1], 1))
    report = build_run_report([a, b])
    assert list(report.table("targets").frame["run"]) == ["exact (seed0)", "exact (seed1)"]


# -- real runs -----------------------------------------------------------------------------


@pytest.mark.slow
def test_report_on_real_runs(real_runs, tmp_path):
    runs = [load_run(p) for p in real_runs]
    report = build_run_report(runs)
    targets = report.table("targets").frame
    assert list(targets["method"]) == ["exact", "uniform"]
    assert targets["reached"].all()
    assert targets["target"].iloc[0] == min(r.final_accuracy for r in runs)
    for r, row in zip(runs, targets.itertuples(), strict=True):
        assert row.sim_time_s == pytest.approx(r.rounds["sim_time_s"].sum())
        assert row.total_MB == pytest.approx(r.rounds["cum_bytes"].iloc[-1] / 1e6)
    assert report.table("rounds").rows_total == 4
    status = report.table("device_status").frame
    assert status["device_rounds"].sum() == sum(len(r.devices) for r in runs)
    calib = report.table("calibration").frame
    # Jitter makes observed device times differ from the cost model's predictions.
    assert (calib["time_mape_pct"] > 0).all()
    written = write_report(report, tmp_path / "report")
    assert len(written.figures) == 4
    assert pd.read_csv(written.tables["targets"]).shape[0] == 2


@pytest.mark.slow
def test_run_cli_on_real_runs(real_runs, tmp_path):
    out = tmp_path / "cmp"
    args = ["report", "run", *map(str, real_runs), "--out", str(out), "--target", "0.4"]
    assert main(args) == 0
    manifest = json.loads((out / "report.json").read_text())
    assert manifest["meta"]["target"] == 0.4
    assert manifest["tables"]["targets"]["rows_total"] == 2
    assert (out / "report.md").read_text().startswith("# Run report: exact, uniform")


# -- bad input -----------------------------------------------------------------------------


def test_missing_files_name_the_file(tmp_path, capsys):
    run = write_run(tmp_path / "r", "exact", [0.5], [1], 1)
    (run / "devices.csv").unlink()
    assert main(["report", "run", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "missing devices.csv" in err
    (run / "summary.json").unlink()
    with pytest.raises(ReportInputError, match=r"missing summary\.json, devices\.csv"):
        load_run(run)
    with pytest.raises(ReportInputError, match="does not exist"):
        load_run(tmp_path / "nowhere")


def test_unfinished_run_hints_at_resume(tmp_path):
    run = write_run(tmp_path / "r", "exact", [0.5], [1], 1)
    (run / "summary.json").unlink()
    with pytest.raises(ReportInputError, match="--resume"):
        load_run(run)


def test_empty_run(tmp_path, capsys):
    run = write_run(tmp_path / "r", "exact", [0.5], [1], 1)
    header = (run / "rounds.csv").read_text().splitlines()[0]
    (run / "rounds.csv").write_text(header + "\n")
    assert main(["report", "run", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "empty run" in err and "rounds.csv has no rounds" in err
    (run / "rounds.csv").write_text("")
    with pytest.raises(ReportInputError, match=r"rounds\.csv is empty"):
        load_run(run)


def test_missing_column(tmp_path):
    run = write_run(tmp_path / "r", "exact", [0.5], [1], 1)
    frame = pd.read_csv(run / "rounds.csv").drop(columns=["accuracy", "cum_bytes"])
    frame.to_csv(run / "rounds.csv", index=False)
    with pytest.raises(ReportInputError, match=r"rounds\.csv lacks column.*accuracy, cum_bytes"):
        load_run(run)


def test_bad_target(tmp_path):
    run = load_run(write_run(tmp_path / "r", "exact", [0.5], [1], 1))
    with pytest.raises(ReportInputError, match="--target"):
        build_run_report([run], target=1.5)


@pytest.mark.slow
def test_plan_report_of_a_run_round_with_its_job(real_runs, tmp_path, capsys):
    """A run's round plan with the run's config.toml as --job: the report recovers the
    cost model (the tiny job is not the default one) and analyses moves."""
    run = real_runs[0]
    out = tmp_path / "plan"
    args = [
        "report",
        "plan",
        str(run / "plans" / "round_0001.json"),
        "--fleet",
        str(ROOT / "examples" / "tiny_fleet.csv"),
        "--job",
        str(run / "config.toml"),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "reproduces the plan" in (out / "report.md").read_text()
    limits = pd.read_csv(out / "tables" / "devices.csv")["limited_by"]
    assert not limits.str.contains("unknown without").any()
