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
    a, b = (
        plan_round(
            fleet,
            SPEC,
            JOB,
            PlannerOptions(use_classes=by_class, objective="deadline", deadline_s=3.0),
            topology=topo,
        )
        for by_class in (True, False)
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
        plan = plan_round(fleet, SPEC, JobParams(), PlannerOptions(objective="rate"), topology=t)
        ev = [problem.costs.evaluate(fleet[d.device_id], d.layers, d.ranks) for d in plan.devices]
        sim = max(
            simulate_round(
                topo, fleet.devices, [e.compute_s for e in ev], [e.upload_bytes for e in ev]
            )
        )
        out[name] = (plan.round_time_s, sim)
    assert abs(out["aware"][1] - out["aware"][0]) <= 0.05 * out["aware"][0]
    assert out["blind"][1] > 1.2 * out["blind"][0]


# -- the class program under contention ------------------------------------------------------

# The per-device program's optimum on the ap30 example at a 2.5 s deadline (pulp-highs,
# mip_gap 1e-4: utility 42,491.98 at round time 2.499 s); the per-device program takes
# 6-18 s here, so the test compares with the recorded value.
AP30_DEADLINE_S = 2.5
AP30_DEVICE_OPTIMUM = 42491.977


def test_ap30_class_program_meets_deadline_with_contention() -> None:
    fleet = load_fleet(ROOT / "examples/fleet_ap30.csv")
    topo = load_topology(ROOT / "examples/topology_ap30.toml", fleet)
    opts = PlannerOptions(objective="deadline", deadline_s=AP30_DEADLINE_S, use_classes=True)
    plan = plan_round(fleet, SPEC, JobParams(), opts, topology=topo)
    # the class program used to leave "configuration used" unlinked from the counts when a
    # link was congested, and returned a 3.655 s round at this deadline
    assert plan.round_time_s <= AP30_DEADLINE_S * (1 + 1e-6)
    assert plan.utility == pytest.approx(AP30_DEVICE_OPTIMUM, rel=2e-4)
    assert (
        validate_plan(plan, fleet, SPEC, JobParams(), deadline_s=AP30_DEADLINE_S, topology=topo)
        == []
    )


@st.composite
def _shared_fleets(draw: st.DrawFn) -> tuple[Fleet, Topology]:
    """Up to 6 devices of 1-2 profiles (so classes have several members) behind 1-2 access
    points whose backhaul is usually slower than the devices together."""
    kinds = [
        (
            draw(st.sampled_from([0.1, 0.3, 1.0])),
            draw(st.sampled_from([10.0, 20.0, 50.0])),
            draw(st.sampled_from([20.0, 50.0, 100.0])),
            draw(st.sampled_from([100, 200])),
        )
        for _ in range(draw(st.integers(1, 2)))
    ]
    counts = [draw(st.integers(1, 3)) for _ in kinds]
    devices = []
    for (tflops, up, down, samples), count in zip(kinds, counts, strict=True):
        for _ in range(count):
            devices.append(
                DeviceProfile(
                    device_id=f"d{len(devices)}",
                    tflops=tflops,
                    memory_gb=3.0,
                    uplink_mbps=up,
                    downlink_mbps=down,
                    num_samples=samples,
                )
            )
    fleet = Fleet(devices=tuple(devices))
    groups = draw(st.integers(1, min(2, len(devices))))
    share = draw(st.floats(0.2, 1.2))
    nodes = [{"id": f"ap{g}", "kind": "access_point"} for g in range(groups)]
    links = []
    for g in range(groups):
        on = [d for k, d in enumerate(devices) if k % groups == g]
        links.append(
            {
                "a": f"ap{g}",
                "b": "server",
                "up_mbps": share * sum(d.uplink_mbps for d in on),
                "down_mbps": share * sum(d.downlink_mbps for d in on),
            }
        )
    for k, d in enumerate(devices):
        links.append({"a": d.device_id, "b": f"ap{k % groups}", "up_mbps": 1e3, "down_mbps": 1e3})
    return fleet, Topology.from_dict({"nodes": nodes, "links": links}, fleet)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=_shared_fleets(),
    objective=st.sampled_from(["deadline", "rate", "min-time"]),
    deadline=st.floats(1.0, 4.0),
    dropping=st.booleans(),
)
def test_class_program_matches_device_program_on_shared_links(
    case: tuple[Fleet, Topology], objective: str, deadline: float, dropping: bool
) -> None:
    fleet, topo = case
    deadline_s = deadline if objective == "deadline" else None
    opts = PlannerOptions(
        objective=objective, deadline_s=deadline_s, allow_dropping=dropping, mip_gap=1e-7
    )
    plans = {}
    for use_classes in (True, False):
        try:
            plans[use_classes] = plan_round(
                fleet, SPEC, JOB, opts.with_(use_classes=use_classes), topology=topo
            )
        except Exception as exc:  # both programs must find the deadline out of reach
            assert type(exc).__name__ == "InfeasibleError"
            plans[use_classes] = None
    if plans[True] is None or plans[False] is None:
        assert plans[True] is None and plans[False] is None
        return
    assert plans[True].objective_value == pytest.approx(plans[False].objective_value, rel=1e-5)
    for plan in plans.values():
        found = validate_plan(
            plan, fleet, SPEC, JOB, deadline_s=deadline_s, require_all=not dropping, topology=topo
        )
        assert found == []
        if deadline_s is not None:
            assert plan.round_time_s <= deadline_s * (1 + 1e-6)


def test_validate_plan_flags_contention_past_the_deadline() -> None:
    fleet = _fleet(6)
    topo = Topology.from_dict(_ap(fleet, 20, 40), fleet)
    deadline_s = 2.0
    blind = plan_round(
        fleet, SPEC, JOB, PlannerOptions(objective="deadline", deadline_s=deadline_s)
    )
    # every device meets the deadline on its own line ...
    assert validate_plan(blind, fleet, SPEC, JOB, deadline_s=deadline_s) == []
    # ... but not while the six share the access point's backhaul
    found = validate_plan(blind, fleet, SPEC, JOB, deadline_s=deadline_s, topology=topo)
    assert {v.constraint for v in found} == {"contention", "round_time"}
    late = {v.device_id for v in found if v.constraint == "contention"}
    assert late == set(fleet.device_ids)
    assert all("ap0--server" in v.detail for v in found if v.constraint == "contention")
    # without a deadline the plan's own round time (1.67 s, contention ignored) is the limit
    assert any(
        v.constraint == "contention" for v in validate_plan(blind, fleet, SPEC, JOB, topology=topo)
    )
    # the plan made with the topology passes both
    aware = plan_round(
        fleet, SPEC, JOB, PlannerOptions(objective="deadline", deadline_s=deadline_s), topology=topo
    )
    assert validate_plan(aware, fleet, SPEC, JOB, deadline_s=deadline_s, topology=topo) == []
