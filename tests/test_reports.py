"""Plan and what-if reports built from real planner output; the HTML/Markdown/CSV writers."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from strategies import device

from legend.federation.cli import main
from legend.models.errors import InputError
from legend.models.spec import get_model_spec
from legend.planner.api import PlannerOptions, plan_round
from legend.planner.costs import CostModel
from legend.planner.plan import Plan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams, load_fleet
from legend.reports.errors import ReportInputError
from legend.reports.plan_report import build_plan_report, load_plan
from legend.reports.render import write_report
from legend.reports.whatif import (
    WhatIfSettings,
    build_whatif_report,
    pareto_front,
    run_whatif,
    scale_bandwidth,
    scale_fleet,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_FLEET = ROOT / "examples" / "fleet.csv"
TINY_FLEET = ROOT / "examples" / "tiny_fleet.csv"
MINILM = "all-MiniLM-L6-v2"


def big_fleet(n: int = 1000) -> Fleet:
    """``n`` devices in four classes with spread-out bandwidths (deterministic)."""
    classes = (
        ("phone", 0.5, 4.0, 10.0, 40.0),
        ("jetson", 1.0, 6.0, 15.0, 50.0),
        ("laptop", 2.0, 8.0, 20.0, 100.0),
        ("desktop", 8.0, 16.0, 50.0, 200.0),
    )
    devices = []
    for i in range(n):
        name, tflops, mem, up, down = classes[i % 4]
        f = 1.0 + (i % 5) * 0.25
        devices.append(
            DeviceProfile(
                device_id=f"{name}-{i:04d}",
                tflops=tflops,
                memory_gb=mem,
                uplink_mbps=up * f,
                downlink_mbps=down * f,
                num_samples=100 + i % 7 * 30,
                device_class=name,
            )
        )
    return Fleet(devices=tuple(devices), source=f"<{n} devices>")


@pytest.fixture(scope="module")
def example_plan() -> tuple[Plan, Fleet]:
    fleet = load_fleet(EXAMPLE_FLEET)
    plan = plan_round(
        fleet, get_model_spec(MINILM), JobParams(), PlannerOptions(solver="pulp-highs")
    )
    return plan, fleet


# -- plan report -------------------------------------------------------------------------


def test_plan_report_tables_match_the_plan(example_plan):
    plan, fleet = example_plan
    report = build_plan_report(plan, fleet=fleet, source="example")
    devices = report.table("devices").frame
    assert len(devices) == len(fleet) == len(plan.devices)
    # Slowest first; every prediction and the waiting time come from the plan.
    assert list(devices["time_s"]) == sorted(devices["time_s"], reverse=True)
    for row in devices.itertuples():
        dp = plan.device(row.device_id)
        assert row.time_s == dp.predicted_time_s
        assert row.depth == dp.depth
        assert row.ranks == " ".join(map(str, dp.ranks))
        assert row.waiting_s == pytest.approx(plan.round_time_s - dp.predicted_time_s)
        assert row.capacity_GB == fleet[row.device_id].memory_gb
        assert row.memory_slack_GB == pytest.approx(
            fleet[row.device_id].memory_gb - dp.predicted_memory_bytes / 1e9
        )
    # The device class summary counts every device once.
    classes = report.table("fleet_classes").frame
    assert classes["devices"].sum() == len(fleet)
    assert set(classes["device_class"]) == {d.device_class for d in fleet.devices}
    # The straggler is named; the cost model was recovered from the plan alone.
    assert devices["limited_by"].iloc[0].startswith("sets round time")
    note = report.sections[-2].blocks[0]
    assert "reproduces every prediction" in note.text  # type: ignore[union-attr]
    assert len(report.figures) == 4


def test_binding_constraints_known_answer():
    """A device with memory for exactly its smallest configuration is memory-bound; a big
    one takes the largest configuration; under a generous deadline nothing is time-bound."""
    spec = get_model_spec("tiny-bert")
    job = JobParams(ranks=(2, 4, 8), batch_size=8, seq_len=32, local_steps=3)
    costs = CostModel(spec, job)
    speeds = {"tflops": 0.01, "uplink_mbps": 10, "downlink_mbps": 10}
    probe = device("probe", memory_gb=100.0, **speeds)
    top = spec.num_layers - 1
    smallest = costs.evaluate(probe, (top,), (2,)).memory_bytes
    next_up = min(
        costs.evaluate(probe, (top - 1, top), (2, 2)).memory_bytes,
        costs.evaluate(probe, (top,), (4,)).memory_bytes,
    )
    tight_gb = (smallest + next_up) / 2 / 1e9
    fleet = Fleet(
        devices=(
            device("tight", memory_gb=tight_gb, device_class="small", **speeds),
            device("roomy", memory_gb=100.0, device_class="big", **speeds),
        )
    )
    plan = plan_round(
        fleet,
        spec,
        job,
        PlannerOptions(solver="pulp-highs", objective="deadline", deadline_s=1e6),
    )
    # The job is not in the plan file: without it the report falls back on slack alone.
    fallback = build_plan_report(plan, fleet=fleet).table("devices").frame.set_index("device_id")
    assert fallback.loc["tight", "limited_by"] == "memory (use >= 99%)"
    frame = build_plan_report(plan, fleet=fleet, job=job).table("devices").frame
    frame = frame.set_index("device_id")
    assert plan.device("tight").depth == 1
    assert frame.loc["tight", "limited_by"].endswith("memory")
    assert frame.loc["roomy", "limited_by"].endswith("largest config")
    assert frame.loc["roomy", "at_max_depth"] and frame.loc["roomy", "at_max_rank"]
    assert frame.loc["tight", "memory_slack_GB"] == pytest.approx(tight_gb - smallest / 1e9)
    assert frame.loc["tight", "deadline_slack_s"] > 0


@pytest.mark.parametrize("server_mbps", [None, 20.0])
def test_exact_deadline_plans_leave_no_device_room_to_grow(server_mbps):
    """At an exact optimum of objective 'deadline' every one-step larger configuration of
    every device breaks a constraint, so the report never says 'a larger config fits'."""
    fleet = load_fleet(EXAMPLE_FLEET)
    options = PlannerOptions(
        solver="pulp-highs",
        objective="deadline",
        deadline_s=6.0,
        mip_gap=1e-7,
        server_mbps=server_mbps,
    )
    plan = plan_round(fleet, get_model_spec(MINILM), JobParams(), options)
    assert plan.status == "OPTIMAL"
    report = build_plan_report(plan, fleet=fleet)
    limits = report.table("devices").frame["limited_by"]
    assert not limits.str.contains("fits").any()
    if server_mbps is not None:
        link = next(
            b
            for s in report.sections
            for b in s.blocks
            if getattr(b, "items", None) and b.items[0][0] == "Server link"
        )  # type: ignore[union-attr]
        assert link.items[0][1].startswith("binds")  # type: ignore[union-attr]
        assert limits.str.contains("server link").any()


def test_plan_report_without_fleet_shows_what_the_plan_supports(example_plan):
    plan, _ = example_plan
    report = build_plan_report(plan)
    devices = report.table("devices").frame
    assert "capacity_GB" not in devices.columns
    assert set(devices["device_class"]) == {"-"}
    text = " ".join(b.text for s in report.sections for b in s.blocks if hasattr(b, "text"))
    assert "No fleet given" in text
    assert len(report.figures) == 4


def test_written_report_is_self_contained(example_plan, tmp_path):
    plan, fleet = example_plan
    written = write_report(build_plan_report(plan, fleet=fleet), tmp_path)
    html = written.html.read_text()
    manifest = json.loads(written.manifest.read_text())
    # Every figure is embedded; nothing is loaded from outside.
    assert html.count('src="data:image/png;base64,') == manifest["images"] == 4
    assert not re.search(r'(src|href)="(https?:)?//', html)
    for name, info in manifest["tables"].items():
        csv = pd.read_csv(written.tables[name])
        assert len(csv) == info["rows_total"]
        assert f'id="t-{name}" data-rows="{info["rows_shown"]}"' in html
    assert len(pd.read_csv(written.tables["devices"])) == len(fleet)
    md = written.markdown.read_text()
    assert md.startswith("# Plan report")
    assert "![Round timeline (Gantt)](figures/round_timeline.png)" in md
    assert all(p.stat().st_size > 5000 for p in written.figures.values())
    # The Markdown device table: header, rule, one line per device.
    block = md.split("### Per-device configuration", 1)[1].split("\n\n*", 1)[0]
    assert sum(line.startswith("|") for line in block.splitlines()) == 2 + len(fleet)


def test_thousand_device_plan_report_aggregates_and_is_fast(tmp_path):
    fleet = big_fleet(1000)
    plan = plan_round(fleet, get_model_spec(MINILM), JobParams(), PlannerOptions(solver="greedy"))
    start = time.perf_counter()
    report = build_plan_report(plan, fleet=fleet)
    written = write_report(report, tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 30  # ~1.5 s on an idle 2-core machine
    assert report.meta["aggregated"]
    devices = report.table("devices")
    assert devices.rows_total == 1000 and devices.rows_shown == 60
    assert len(pd.read_csv(written.tables["devices"])) == 1000
    captions = {f.name: f.caption for f in report.figures}
    assert "per device class" in captions["round_timeline"]
    assert "distinct configuration" in captions["depth_rank_heatmap"]
    assert "device class" in captions["memory"]
    html = written.html.read_text()
    assert "Showing 60 of 1,000 rows" in html
    assert written.html.stat().st_size < 2_000_000


def test_plan_cli_and_bad_plan_files(example_plan, tmp_path, capsys):
    plan, _ = example_plan
    path = plan.save(tmp_path / "plan.json")
    out = tmp_path / "report"
    assert (
        main(["report", "plan", str(path), "--fleet", str(EXAMPLE_FLEET), "--out", str(out)]) == 0
    )
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert (out / "tables" / "devices.csv").is_file()

    data = json.loads(path.read_text())
    data["schema_version"] = 99
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["report", "plan", str(old), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert str(old) in err and "schema_version" in err and "99" in err

    with pytest.raises(ReportInputError, match="does not exist"):
        load_plan(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ReportInputError, match=r"broken\.json is not readable JSON"):
        load_plan(broken)
    # A fleet that lacks the plan's devices.
    with pytest.raises(
        ReportInputError,
        match=r"tiny_fleet.csv lacks 16 device\(s\) of plan plan.json: phone-low-1",
    ):
        build_plan_report(plan, fleet=load_fleet(TINY_FLEET), source="plan.json")
    assert issubclass(ReportInputError, InputError) and issubclass(ReportInputError, ValueError)


# -- what-if -----------------------------------------------------------------------------


def test_fleet_and_bandwidth_transforms():
    fleet = load_fleet(EXAMPLE_FLEET)
    counts = pd.Series([d.device_class for d in fleet.devices]).value_counts()
    doubled = scale_fleet(fleet, 2.0)
    assert len(doubled) == 2 * len(fleet)
    assert pd.Series([d.device_class for d in doubled.devices]).value_counts().equals(counts * 2)
    halved = scale_fleet(fleet, 0.5)
    assert {d.device_class for d in halved.devices} == set(counts.index)
    assert len(set(doubled.device_ids)) == len(doubled)
    slow = scale_bandwidth(fleet, 0.25)
    for a, b in zip(fleet.devices, slow.devices, strict=True):
        assert b.uplink_mbps == a.uplink_mbps * 0.25 and b.tflops == a.tflops


def test_pareto_front_by_hand():
    times = [1.0, 2.0, 2.0, 3.0, 4.0, math.nan]
    utils = [1.0, 3.0, 2.0, 3.0, 5.0, 9.0]
    assert pareto_front(times, utils) == [True, True, False, False, True, False]


def test_whatif_sweeps_with_the_exact_planner():
    fleet = load_fleet(EXAMPLE_FLEET)
    spec = get_model_spec(MINILM)
    settings = WhatIfSettings(
        bandwidth_scales=(0.25, 1.0, 4.0),
        fleet_scales=(1.0, 2.0),
        deadline_points=4,
        models=(MINILM, "llama-2-7b"),
    )
    # objective rate: a doubled fleet of the same devices keeps every configuration
    options = PlannerOptions(objective="rate", solver="pulp-highs", time_limit_s=20)
    result = run_whatif(fleet, spec, JobParams(), options, settings)
    base = result.baseline
    bw = result.bandwidth.set_index("bandwidth_scale")
    assert bw.loc[1.0, "round_time_s"] == base.round_time_s
    # Exact optima: more bandwidth never lowers the best utility per second.
    rates = list(bw["utility_per_s"])
    assert rates == sorted(rates)
    size = result.fleet_size.set_index("fleet_scale")
    assert size.loc[2.0, "devices"] == 2 * len(fleet) == size.loc[2.0, "participants"]
    # Identical copies: the same round time, twice the bytes.
    assert size.loc[2.0, "round_time_s"] == pytest.approx(base.round_time_s, rel=1e-6)
    assert size.loc[2.0, "total_MB"] == pytest.approx(2 * size.loc[1.0, "total_MB"], rel=1e-6)
    # Deadline sweep: exact utility never falls as the deadline grows, each plan meets it.
    dl = result.deadline
    assert len(dl) == 4 and (dl["status"] != "INFEASIBLE").all()
    assert list(dl["utility"]) == sorted(dl["utility"])
    assert (dl["round_time_s"] <= dl["deadline_s"] * (1 + 1e-9)).all()
    assert dl["pareto"].any()
    models = result.models.set_index("model")
    assert models.loc["llama-2-7b", "status"] == "INFEASIBLE"
    assert "memory" in models.loc["llama-2-7b", "note"]
    report = build_whatif_report(result)
    assert [t.name for t in report.tables] == ["bandwidth", "fleet_size", "deadline", "models"]
    assert len(report.figures) == 4


def test_whatif_cli_on_a_thousand_devices(tmp_path):
    fleet_path = tmp_path / "fleet.csv"
    pd.DataFrame(big_fleet(1000).to_records()).drop(columns=["local_steps"]).to_csv(
        fleet_path, index=False
    )
    out = tmp_path / "whatif"
    start = time.perf_counter()
    code = main(
        [
            "report",
            "whatif",
            "--fleet",
            str(fleet_path),
            "--model",
            MINILM,
            "--out",
            str(out),
            "--models",
            f"{MINILM},roberta-large",
            "--deadline-points",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0
    assert time.perf_counter() - start < 60  # ~4 s on an idle 2-core machine
    manifest = json.loads((out / "report.json").read_text())
    assert manifest["images"] == 4
    assert manifest["tables"]["bandwidth"]["rows_total"] == 5
    assert manifest["tables"]["deadline"]["rows_total"] == 4
    sizes = pd.read_csv(out / "tables" / "fleet_size.csv")
    assert list(sizes["devices"]) == [500, 1000, 2000]


def test_whatif_bad_input(tmp_path, capsys):
    assert (
        main(
            [
                "report",
                "whatif",
                "--fleet",
                str(tmp_path / "nope.csv"),
                "--model",
                MINILM,
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "nope.csv" in capsys.readouterr().err
    assert (
        main(
            [
                "report",
                "whatif",
                "--fleet",
                str(EXAMPLE_FLEET),
                "--model",
                MINILM,
                "--out",
                str(tmp_path / "o"),
                "--bandwidth-scales",
                "1,fast",
            ]
        )
        == 2
    )
    assert "--bandwidth-scales" in capsys.readouterr().err
    with pytest.raises(ReportInputError, match="fleet_scales"):
        WhatIfSettings(fleet_scales=(0.0,))


def test_reports_do_not_import_torch(tmp_path):
    code = f"""
import sys
from legend.planner.api import PlannerOptions, plan_round
from legend.planner.profiles import load_fleet, JobParams
from legend.models.spec import get_model_spec
from legend.reports import cli, plan_report, render, run_report, whatif
fleet = load_fleet({str(EXAMPLE_FLEET)!r})
plan = plan_round(fleet, get_model_spec("{MINILM}"), JobParams(), PlannerOptions(solver="greedy"))
render.write_report(plan_report.build_plan_report(plan, fleet=fleet), {str(tmp_path)!r})
heavy = sorted(m for m in ("torch", "peft", "transformers", "flwr") if m in sys.modules)
print("heavy=" + ",".join(heavy))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "heavy="


def test_plan_of_the_previous_version_is_reported_with_a_warning() -> None:
    """A plan made before bucketing was removed carries `class_bucket_ratio` in its options
    and a digest over them: the report validates it against the fleet and warns that the
    digest cannot be checked, instead of refusing it."""
    from legend.planner.plan import Plan
    from legend.reports.plan_report import check_plan_inputs

    fleet = load_fleet(ROOT / "examples" / "fleet.csv")
    plan = plan_round(fleet, get_model_spec(MINILM))
    old = plan.to_dict()
    old["options"]["class_bucket_ratio"] = None
    old["inputs_digest"] = "0123456789abcdef"
    warnings = check_plan_inputs(Plan.from_dict(old), fleet, "old.json")
    assert len(warnings) == 1 and "older legend" in warnings[0]
    assert "class_bucket_ratio" in warnings[0]
