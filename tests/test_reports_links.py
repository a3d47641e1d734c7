"""Shared links in the plan and what-if reports, on real plans of 30 phones behind one access
point (examples/fleet_ap30.csv, examples/topology_ap30.toml, all-MiniLM-L6-v2, solver auto)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from legend.federation.cli import main
from legend.models.spec import get_model_spec
from legend.planner.api import PlannerOptions, PlanningProblem, plan_round
from legend.planner.plan import Plan
from legend.planner.profiles import Fleet, JobParams, load_fleet
from legend.planner.topology import Topology, link_loads, load_topology
from legend.reports.errors import ReportInputError
from legend.reports.links import Replanner, binding_links
from legend.reports.plan_report import build_plan_report
from legend.reports.whatif import WhatIfSettings, run_whatif

ROOT = Path(__file__).resolve().parents[1]
FLEET = ROOT / "examples" / "fleet_ap30.csv"
TOPOLOGY = ROOT / "examples" / "topology_ap30.toml"
SPEC = get_model_spec("all-MiniLM-L6-v2")
BACKHAUL = "ap-1--server"
# Only the link sweep: every other what-if sweep off.
LINKS_ONLY = {"bandwidth_scales": (), "fleet_scales": (), "deadline_points": 0, "models": ()}


@pytest.fixture(scope="module")
def ap30() -> tuple[Plan, Fleet, Topology]:
    fleet = load_fleet(FLEET)
    topology = load_topology(TOPOLOGY, fleet)
    plan = plan_round(fleet, SPEC, JobParams(), PlannerOptions(objective="rate"), topology=topology)
    return plan, fleet, topology


def test_plan_report_link_table_is_the_plans_load(ap30):
    plan, fleet, topology = ap30
    report = build_plan_report(plan, fleet=fleet, topology=topology, source="ap30")
    links = report.table("links").frame.set_index("link")
    assert len(links) == len(topology.links) == 31
    costs = PlanningProblem.create(fleet, SPEC, JobParams()).costs
    configs = {d.device_id: (d.layers, d.ranks) for d in plan.devices}
    T = plan.round_time_s
    for load, link in zip(link_loads(topology, fleet, costs, configs), topology.links, strict=True):
        row = links.loc[load.link]
        assert row["up_MB"] * 1e6 == pytest.approx(load.up_bytes, rel=1e-12)
        assert row["down_MB"] * 1e6 == pytest.approx(load.down_bytes, rel=1e-12)
        assert row["utilisation_up"] == pytest.approx(load.up_s / T, rel=1e-12)
        assert row["utilisation_down"] == pytest.approx(
            load.down_bytes * 8 / (link.down_mbps * 1e6 * T), rel=1e-12
        )
        assert row["up_mbps"] == link.up_mbps and row["down_mbps"] == link.down_mbps
    # every phone's bytes cross the backhaul
    backhaul = links.loc[BACKHAUL]
    assert backhaul["devices"] == backhaul["participants"] == 30
    assert backhaul["up_MB"] * 1e6 == pytest.approx(plan.total_upload_bytes, rel=1e-12)
    assert backhaul["down_MB"] * 1e6 == pytest.approx(plan.total_download_bytes, rel=1e-12)
    # only the backhaul is congested (30 x 20 Mbit/s > 100), and it binds
    assert links.index[0] == BACKHAUL  # busiest first
    assert links["congested"].tolist() == [True] + [False] * 30
    assert links["binding"].tolist() == [True] + [False] * 30
    # the phones are held back by the backhaul's contention, and the report says so
    limits = report.table("devices").frame["limited_by"]
    assert limits.str.contains(f"link {BACKHAUL}").all()
    assert "link_utilisation" in [f.name for f in report.figures]
    section = next(s for s in report.sections if s.title == "Links")
    assert "re-planning with auto" in section.blocks[1].text  # type: ignore[union-attr]


def test_backhaul_binds_by_replanning_and_on_the_clock(ap30):
    plan, fleet, topology = ap30
    replanner = Replanner(
        fleet=fleet, spec=SPEC, job=JobParams(), options=PlannerOptions(objective="rate")
    )
    assert replanner.reference(plan, topology) is plan  # planned with this topology
    verdict = binding_links(plan, topology, fleet, replanner)
    assert verdict.rule == "re-plan" and verdict.names(topology) == [BACKHAUL]
    (doubled,) = verdict.doubled.values()  # only the congested link is re-planned
    assert doubled.objective_value > plan.objective_value
    # without the cost model the links.csv rule decides, and agrees here
    clock = binding_links(plan, topology, fleet, None)
    assert clock.rule == "clock" and clock.names(topology) == [BACKHAUL]


def test_doubling_the_backhaul_whatif(ap30):
    plan, fleet, topology = ap30
    settings = WhatIfSettings(**LINKS_ONLY, double_links=(BACKHAUL, "phone-01--ap-1"))
    result = run_whatif(
        fleet, SPEC, JobParams(), PlannerOptions(objective="rate"), settings, topology=topology
    )
    rows = result.links.set_index("scenario")
    base, wide, phone = (rows.loc[s] for s in ("baseline", f"x2 {BACKHAUL}", "x2 phone-01--ap-1"))
    assert base["round_time_s"] == pytest.approx(plan.round_time_s)
    assert base["binding_links"] == BACKHAUL
    # objective rate: twice the backhaul buys larger configurations for every phone
    assert wide["objective"] > base["objective"] and wide["objective_change_pct"] > 0
    assert wide["total_MB"] > base["total_MB"] and wide["changed_devices"] == 30
    assert wide["binding_links"] == BACKHAUL  # 30 x 20 Mbit/s still exceed 200
    # a phone's own link is not congested: nothing changes
    assert phone["changed_devices"] == 0 and phone["round_time_s"] == base["round_time_s"]
    assert "not congested" in phone["note"]

    # objective min-time: the doubled backhaul shortens the round
    fast = run_whatif(
        fleet,
        SPEC,
        JobParams(),
        PlannerOptions(objective="min-time"),
        WhatIfSettings(**LINKS_ONLY, double_links=(BACKHAUL,)),
        topology=topology,
    ).links.set_index("scenario")
    assert fast.loc[f"x2 {BACKHAUL}", "round_time_s"] < fast.loc["baseline", "round_time_s"]
    assert fast.loc[f"x2 {BACKHAUL}", "round_time_change_pct"] < 0


def test_report_cli_with_topology(ap30, tmp_path, capsys):
    plan, _, _ = ap30
    path = plan.save(tmp_path / "plan.json")
    out = tmp_path / "plan-report"
    args = ["report", "plan", str(path), "--fleet", str(FLEET), "--topology", str(TOPOLOGY)]
    assert main([*args, "--out", str(out)]) == 0
    links = pd.read_csv(out / "tables" / "links.csv")
    assert links.loc[links["binding"], "link"].tolist() == [BACKHAUL]
    assert "## Links" in (out / "report.md").read_text()

    whatif = [
        "report",
        "whatif",
        "--fleet",
        str(FLEET),
        "--model",
        "all-MiniLM-L6-v2",
        "--bandwidth-scales",
        "",
        "--deadline-points",
        "0",
        "--models",
        "",
        "--no-progress",
        "--out",
        str(tmp_path / "whatif"),
    ]
    assert main([*whatif, "--topology", str(TOPOLOGY), "--double-link", BACKHAUL]) == 0
    table = pd.read_csv(tmp_path / "whatif" / "tables" / "links.csv")
    assert table["scenario"].tolist() == ["baseline", f"x2 {BACKHAUL}"]

    capsys.readouterr()
    assert main([*whatif, "--topology", str(TOPOLOGY), "--double-link", "ap-9--server"]) == 2
    err = capsys.readouterr().err
    assert "'ap-9--server'" in err and BACKHAUL in err and "phone-01--ap-1" in err
    assert main([*whatif, "--double-link", BACKHAUL]) == 2
    assert "--topology" in capsys.readouterr().err
    assert main([*args[:3], "--topology", str(TOPOLOGY), "--out", str(tmp_path / "x")]) == 2
    assert "--fleet" in capsys.readouterr().err

    bad = tmp_path / "bad.toml"
    bad.write_text(TOPOLOGY.read_text().replace('b = "server"', 'b = "ghost"', 1))
    assert main([*args[:5], "--topology", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "'ghost'" in capsys.readouterr().err


def test_double_link_needs_an_exact_solver(ap30):
    _, fleet, topology = ap30
    settings = WhatIfSettings(**LINKS_ONLY, double_links=("all",))
    with pytest.raises(ReportInputError, match=r"greedy.*does not model a topology"):
        run_whatif(fleet, SPEC, None, PlannerOptions(solver="greedy"), settings, topology=topology)
