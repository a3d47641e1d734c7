"""Federated runs on a network topology: fair-sharing clock, aware vs blind plans, links.csv.

30 phones behind one access point (examples/fleet_ap30.csv, examples/topology_ap30.toml),
the tiny BERT, one round of ``exact``: the topology-aware plan's predicted round time is met
on the simulated clock, the topology-blind plan's is not.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from strategies import csv_rows

from legend.federation.job import JobError, load_job
from legend.federation.runner import prepare, run_job

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.toml"
FLEET = ROOT / "examples" / "fleet_ap30.csv"
TOPOLOGY = ROOT / "examples" / "topology_ap30.toml"


@pytest.fixture(scope="module")
def ap30_cfg():
    # A workload where the aware plan gives every phone the same configuration, so the
    # program's contention rows are exact (with mixed configurations they are an upper bound).
    return load_job(
        TINY,
        job__fleet=str(FLEET),
        job__topology=str(TOPOLOGY),
        job__rounds=1,
        train__batch_size=8,
        train__seq_len=32,
        train__local_steps=2,
        train__ranks=[4, 8],
        train__uniform_rank=4,
        data__max_train=300,
        data__max_test=60,
    )


@pytest.fixture(scope="module")
def ap30_prepared(ap30_cfg):
    return prepare(ap30_cfg, calibration=None)


def _predicted_and_simulated(out: Path) -> tuple[float, float]:
    (row,) = csv_rows(out / "rounds.csv")
    return float(row["planned_round_time_s"]), float(row["sim_time_s"]) - float(
        row["server_time_s"]
    )


def test_aware_prediction_met_blind_violated(ap30_cfg, ap30_prepared, tmp_path):
    aware_dir, blind_dir = tmp_path / "aware", tmp_path / "blind"
    # the fixed-utility objective plans enough bytes for the backhaul to bind
    ap30_cfg = ap30_cfg.override("planner", objective="rate")
    run_job(ap30_cfg, aware_dir, prepared=ap30_prepared, show_progress=False)
    blind_cfg = ap30_cfg.override("planner", use_topology=False)
    run_job(blind_cfg, blind_dir, prepared=ap30_prepared, show_progress=False)

    predicted, simulated = _predicted_and_simulated(aware_dir)
    assert simulated == pytest.approx(predicted, rel=0.05)
    blind_predicted, blind_simulated = _predicted_and_simulated(blind_dir)
    assert blind_simulated > 1.05 * blind_predicted
    assert predicted > blind_predicted  # the aware plan prices the contention in

    # The devices' observed times come from the shared clock: the blind plan's phones are
    # late against their private-link predictions, and waiting is measured against them.
    devices = [d for d in csv_rows(blind_dir / "devices.csv") if d["status"] == "ok"]
    assert len(devices) == 30
    assert max(float(d["observed_time_s"]) for d in devices) == pytest.approx(blind_simulated)
    assert all(float(d["observed_time_s"]) > float(d["predicted_time_s"]) for d in devices)
    assert all(float(d["waiting_s"]) >= -1e-12 for d in devices)

    # links.csv: the backhaul carries every phone's bytes and binds the round.
    links = {r["link"]: r for r in csv_rows(blind_dir / "links.csv")}
    assert len(links) == 31
    backhaul = links["ap-1--server"]
    up_total = sum(float(d["bytes_up"]) for d in devices)
    assert float(backhaul["up_bytes"]) == pytest.approx(up_total)
    assert backhaul["binding"] == "True"
    assert 0 < float(backhaul["utilisation_up"]) <= 1 + 1e-9
    assert 0 < float(backhaul["utilisation_down"]) <= 1 + 1e-9
    assert all(r["binding"] == "False" for name, r in links.items() if name != "ap-1--server")

    # benchmarks/contention_models.py prices the runs' plans with both contention models:
    # "together" is the aware plan's own prediction, and with every phone on one
    # configuration (the blind plan) "staggered" is the clock as well
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        models = importlib.import_module("contention_models")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    models.main([str(aware_dir), str(blind_dir), "--skip-rounds", "0", "--out", str(tmp_path)])
    aware, blind = csv_rows(tmp_path / "contention_models.csv")
    assert float(aware["together"]) == pytest.approx(predicted / simulated, rel=1e-6)
    assert float(blind["staggered"]) == pytest.approx(1.0, rel=0.05)
    assert "benchmarks/contention_models.py" in (tmp_path / "contention_models.md").read_text()


def test_no_topology_keeps_private_links(ap30_cfg, ap30_prepared, tmp_path):
    cfg = ap30_cfg.override("job", topology="")
    run_job(cfg, tmp_path / "run", prepared=ap30_prepared, show_progress=False)
    assert not (tmp_path / "run" / "links.csv").exists()
    devices = csv_rows(tmp_path / "run" / "devices.csv")
    # without jitter the private-link clock repeats the plan's per-device predictions
    for d in devices:
        assert float(d["observed_time_s"]) == pytest.approx(float(d["predicted_time_s"]))


def test_job_topology_errors(tmp_path):
    with pytest.raises(JobError, match=r"job\.topology.*does not exist"):
        load_job(TINY, job__topology="missing.toml")
    with pytest.raises(JobError, match="server_mbps"):
        load_job(TINY, job__topology=str(TOPOLOGY), planner__server_mbps=100.0)
    cfg = load_job(TINY, job__topology="topology_ap30.toml")  # relative to the job file
    assert cfg.job.topology == str(TOPOLOGY)


def test_run_report_shows_links_per_round(ap30_cfg, ap30_prepared, tmp_path):
    from legend.reports.render import write_report
    from legend.reports.run_report import build_run_report, load_run

    out = tmp_path / "run"
    run_job(ap30_cfg.override("job", rounds=2), out, prepared=ap30_prepared, show_progress=False)
    report = build_run_report([load_run(out)])
    written = write_report(report, tmp_path / "report")

    table = report.table("links").frame
    rows = csv_rows(out / "links.csv")
    assert len(table) == len(rows) == 2 * 31
    for row, (_, shown) in zip(rows, table.iterrows(), strict=True):
        assert (shown["round"], shown["link"]) == (int(row["round"]), row["link"])
        assert shown["up_MB"] * 1e6 == pytest.approx(float(row["up_bytes"]))
        assert shown["down_MB"] * 1e6 == pytest.approx(float(row["down_bytes"]))
        assert shown["utilisation_up"] == pytest.approx(float(row["utilisation_up"]))
        assert shown["utilisation_down"] == pytest.approx(float(row["utilisation_down"]))
        assert shown["binding"] == (row["binding"] == "True")
    bound = {int(r["round"]): r["link"] for r in rows if r["binding"] == "True"}
    per_round = report.table("binding_links").frame
    assert per_round["round"].tolist() == [1, 2]
    assert per_round["binding_links"].tolist() == [bound[1], bound[2]] == ["ap-1--server"] * 2
    assert "link_utilisation" in written.figures


def test_tiny_ap30_example_is_the_tested_job(ap30_cfg):
    example = load_job(ROOT / "examples" / "tiny_ap30.toml")
    assert (example.job.fleet, example.job.topology) == (str(FLEET), str(TOPOLOGY))
    assert example.job.rounds == 2
    for section in ("train", "data", "planner", "federation"):
        assert getattr(example, section) == getattr(ap30_cfg, section)
