"""Network topology: loading and bad input, link rows in the program, the fair-sharing clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from legend.models.spec import get_model_spec
from legend.planner.api import PlannerOptions, PlanningProblem, plan_round
from legend.planner.plan import validate_plan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams, load_fleet
from legend.planner.topology import (
    Topology,
    TopologyError,
    link_loads,
    load_topology,
    predicted_round_time,
    simulate_round,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = get_model_spec("all-MiniLM-L6-v2")
JOB = JobParams(ranks=(2, 4, 8))


def _fleet(n: int, *, up: float = 20.0, down: float = 50.0) -> Fleet:
    return Fleet(
        devices=tuple(
            DeviceProfile(
                device_id=f"d{i}",
                tflops=0.3,
                memory_gb=3.0,
                uplink_mbps=up,
                downlink_mbps=down,
                num_samples=100 + 10 * i,
            )
            for i in range(n)
        )
    )


def _ap(fleet: Fleet, up: float, down: float, groups: int = 1) -> dict:
    nodes = [{"id": f"ap{g}", "kind": "access_point"} for g in range(groups)]
    links = [
        {"a": f"ap{g}", "b": "server", "up_mbps": up, "down_mbps": down} for g in range(groups)
    ]
    for k, d in enumerate(fleet.device_ids):
        links.append({"a": d, "b": f"ap{k % groups}", "up_mbps": 1e3, "down_mbps": 1e3})
    return {"nodes": nodes, "links": links}


def _link_ok(plan, fleet: Fleet, topo: Topology) -> None:
    assert validate_plan(plan, fleet, SPEC, JOB, topology=topo) == []
    problem = PlanningProblem.create(fleet, SPEC, JOB)
    loads = link_loads(
        topo, fleet, problem.costs, {d.device_id: (d.layers, d.ranks) for d in plan.devices}
    )
    for load in loads:
        assert load.up_s <= plan.round_time_s * (1 + 1e-6)
        assert load.down_s <= plan.round_time_s * (1 + 1e-6)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t["links"].pop(), "'d3' has no route"),
        (
            lambda t: t["links"].append({"a": "d0", "b": "ghost", "up_mbps": 1, "down_mbps": 1}),
            "'ghost'",
        ),
        (lambda t: t["links"][0].update(up_mbps=0), "ap0--server: `up_mbps` must be > 0"),
        (lambda t: t["links"][0].update(down_mbps=-5), "`down_mbps` must be > 0"),
        (lambda t: t["links"].append(dict(t["links"][0])), "ap0--server is listed twice"),
        (
            lambda t: t["links"].append({"a": "d0", "b": "server", "up_mbps": 1, "down_mbps": 1}),
            "'d0' is attached 2 times",
        ),
        (
            lambda t: (
                t["nodes"].append({"id": "x"})
                or t["links"].append({"a": "x", "b": "ap0", "up_mbps": 1, "down_mbps": 1})
                or t["links"].append({"a": "x", "b": "server", "up_mbps": 1, "down_mbps": 1})
            ),
            "cycle",
        ),
    ],
)
def test_bad_topology_names_node_or_link(edit, needle) -> None:
    fleet = _fleet(4)
    data = _ap(fleet, 10, 10)
    edit(data)
    with pytest.raises(TopologyError, match=needle.replace("(", r"\(")) as info:
        Topology.from_dict(data, fleet)
    assert isinstance(info.value, ValueError)
    assert info.value.exit_code == 2


def test_unconnected_device_has_no_route() -> None:
    fleet = _fleet(2)
    data = {
        "nodes": [{"id": "island"}],
        "links": [
            {"a": "d0", "b": "server", "up_mbps": 5, "down_mbps": 5},
            {"a": "d1", "b": "island", "up_mbps": 5, "down_mbps": 5},
        ],
    }
    with pytest.raises(TopologyError, match="'d1' has no route"):
        Topology.from_dict(data, fleet)


def test_cli_bad_topology_exit_2(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from legend.federation.cli import main

    bad = tmp_path / "t.json"
    link = {"a": "phone-01", "b": "nowhere", "up_mbps": 1, "down_mbps": 1}
    bad.write_text(json.dumps({"links": [link]}))
    fleet = str(ROOT / "examples/fleet_ap30.csv")
    args = ["--model", "all-MiniLM-L6-v2", "--fleet", fleet, "--out", str(tmp_path / "p.json")]
    assert main(["plan", *args, "--topology", str(bad)]) == 2
    assert "nowhere" in capfd.readouterr().err
    good = str(ROOT / "examples/topology_ap30.toml")
    assert main(["plan", *args, "--topology", good]) == 0


# -- the program ---------------------------------------------------------------------------


def test_routes_and_loading_example() -> None:
    fleet = load_fleet(ROOT / "examples/fleet_ap30.csv")
    topo = load_topology(ROOT / "examples/topology_ap30.toml", fleet)
    assert len(topo.links) == 31
    assert all(len(r) == 2 for r in topo.routes.values())
    assert [topo.links[e].name for e, _u, _d in topo.congested(fleet)] == ["ap-1--server"]


@pytest.mark.parametrize("use_classes", [True, False])
def test_shared_link_binds_and_holds(use_classes: bool) -> None:
    fleet = _fleet(6)
    topo = Topology.from_dict(_ap(fleet, 20, 40), fleet)
    opts = PlannerOptions(use_classes=use_classes)
    blind = plan_round(fleet, SPEC, JOB, opts)
    aware = plan_round(fleet, SPEC, JOB, opts, topology=topo)
    _link_ok(aware, fleet, topo)
    problem = PlanningProblem.create(fleet, SPEC, JOB)
    cfgs = {d.device_id: (d.layers, d.ranks) for d in blind.devices}
    # the blind plan's round time ignores the contention its bytes cause on the AP
    assert predicted_round_time(topo, fleet, problem.costs, cfgs) > blind.round_time_s * 1.05


def test_class_and_device_programs_agree() -> None:
    fleet = _fleet(6)
    topo = Topology.from_dict(_ap(fleet, 20, 40, groups=2), fleet)
    a = plan_round(
        fleet,
        SPEC,
        JOB,
        PlannerOptions(use_classes=True, objective="deadline", deadline_s=3.0),
        topology=topo,
    )
    b = plan_round(
        fleet,
        SPEC,
        JOB,
        PlannerOptions(use_classes=False, objective="deadline", deadline_s=3.0),
        topology=topo,
    )
    assert a.utility == pytest.approx(b.utility, rel=1e-4)
    _link_ok(a, fleet, topo)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 6),
    up=st.floats(5.0, 60.0),
    down=st.floats(10.0, 150.0),
    groups=st.integers(1, 2),
    factor=st.floats(1.1, 4.0),
    deadline=st.floats(1.5, 6.0),
)
def test_properties_link_rows_and_capacity_monotone(n, up, down, groups, factor, deadline) -> None:
    fleet = _fleet(n)
    topo = Topology.from_dict(_ap(fleet, up, down, groups=min(groups, n)), fleet)
    opts = PlannerOptions(objective="deadline", deadline_s=deadline, allow_dropping=True)
    try:
        base = plan_round(fleet, SPEC, JOB, opts, topology=topo)
    except Exception as exc:  # nothing fits the deadline: no property to check
        assert type(exc).__name__ == "InfeasibleError"
        return
    _link_ok(base, fleet, topo)
    for e in range(len(topo.links)):
        more = plan_round(fleet, SPEC, JOB, opts, topology=topo.with_capacity(e, factor=factor))
        assert more.utility >= base.utility * (1 - 1e-6)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 6),
    headroom=st.floats(1.0, 3.0),
    objective=st.sampled_from(["rate", "min-time"]),
)
def test_star_topology_plans_like_no_topology(n, headroom, objective) -> None:
    fleet = _fleet(n)
    links = [
        {
            "a": d.device_id,
            "b": "server",
            "up_mbps": d.uplink_mbps * headroom,
            "down_mbps": d.downlink_mbps * headroom,
        }
        for d in fleet.devices
    ]
    topo = Topology.from_dict({"links": links}, fleet)
    opts = PlannerOptions(objective=objective)
    a = plan_round(fleet, SPEC, JOB, opts)
    b = plan_round(fleet, SPEC, JOB, opts, topology=topo)
    assert [(d.layers, d.ranks) for d in a.devices] == [(d.layers, d.ranks) for d in b.devices]
    assert a.round_time_s == b.round_time_s


# -- the fair-sharing clock ----------------------------------------------------------------


def test_simulator_shares_capacity_fairly() -> None:
    fleet = _fleet(4, up=10.0, down=10.0)
    topo = Topology.from_dict(_ap(fleet, 20, 20), fleet)
    nbytes = [1e6] * 4  # 8 Mbit each way
    fin = simulate_round(topo, fleet.devices, [1.0] * 4, nbytes)
    # 4 x 8 Mbit over 20 Mbit/s each way: 1.6 s down, 1 s compute, 1.6 s up
    assert fin == pytest.approx([4.2] * 4, rel=1e-6)
    alone = simulate_round(None, fleet.devices, [1.0] * 4, nbytes)
    assert alone == pytest.approx([0.8 + 1.0 + 0.8] * 4, rel=1e-6)


def test_ap30_prediction_met_by_fair_sharing_clock() -> None:
    fleet = load_fleet(ROOT / "examples/fleet_ap30.csv")
    topo = load_topology(ROOT / "examples/topology_ap30.toml", fleet)
    problem = PlanningProblem.create(fleet, SPEC, JobParams())
    out = {}
    for name, t in (("blind", None), ("aware", topo)):
        plan = plan_round(fleet, SPEC, JobParams(), PlannerOptions(), topology=t)
        ev = [problem.costs.evaluate(fleet[d.device_id], d.layers, d.ranks) for d in plan.devices]
        sim = max(
            simulate_round(
                topo, fleet.devices, [e.compute_s for e in ev], [e.upload_bytes for e in ev]
            )
        )
        out[name] = (plan.round_time_s, sim)
    assert abs(out["aware"][1] - out["aware"][0]) <= 0.05 * out["aware"][0]
    assert out["blind"][1] > 1.2 * out["blind"][0]
