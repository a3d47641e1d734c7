"""The ``"staggered"`` contention model of shared links: parsing, the bound against the
fair-sharing clock, and the exact planner's program against enumeration."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from legend.models.spec import get_model_spec
from legend.planner.api import PlannerOptions, PlanningProblem, plan_round
from legend.planner.catalog import device_configurations
from legend.planner.costs import ConfigCost
from legend.planner.plan import validate_plan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams
from legend.planner.topology import (
    Topology,
    TopologyError,
    link_times,
    load_topology,
    predicted_round_time,
    simulate_round,
    staggered_upload_s,
)

SPEC = get_model_spec("all-MiniLM-L6-v2")
JOB = JobParams(ranks=(2, 4))


def _device(i: int, *, tflops: float, up: float, down: float = 200.0) -> DeviceProfile:
    return DeviceProfile(
        device_id=f"d{i}",
        tflops=tflops,
        memory_gb=3.0,
        uplink_mbps=up,
        downlink_mbps=down,
        num_samples=100 + 10 * i,
    )


def _ap(fleet: Fleet, up: float, down: float, contention: str) -> Topology:
    links = [{"a": "ap", "b": "server", "up_mbps": up, "down_mbps": down}]
    links += [{"a": d, "b": "ap", "up_mbps": 1e4, "down_mbps": 1e4} for d in fleet.device_ids]
    data = {"contention": contention, "nodes": [{"id": "ap"}], "links": links}
    return Topology.from_dict(data, fleet)


# -- the topology file -----------------------------------------------------------------------


def test_contention_key_is_read_written_and_checked(tmp_path: Path) -> None:
    fleet = Fleet(devices=(_device(0, tflops=0.3, up=10.0), _device(1, tflops=0.3, up=10.0)))
    assert _ap(fleet, 10.0, 100.0, "together").to_dict().get("contention") is None
    topo = _ap(fleet, 10.0, 100.0, "staggered")
    path = tmp_path / "topo.json"
    path.write_text(json.dumps(topo.to_dict()), encoding="utf-8")
    assert load_topology(path, fleet).contention == "staggered"
    data = topo.to_dict() | {"contention": "fair"}
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TopologyError) as err:
        load_topology(path, fleet)
    msg = str(err.value)
    assert str(path) in msg and "`contention` = 'fair'" in msg and '"staggered"' in msg
    # a restricted or rescaled topology keeps its model
    assert topo.with_capacity(0, factor=2.0).contention == "staggered"


# -- the bound against the fair-sharing clock ---------------------------------------------------


def _cost(compute_s: float, nbytes: float, up_mbps: float, down_mbps: float) -> ConfigCost:
    down_s, up_s = nbytes * 8 / (down_mbps * 1e6), nbytes * 8 / (up_mbps * 1e6)
    return ConfigCost(
        compute_s=compute_s,
        download_s=down_s,
        upload_s=up_s,
        time_s=down_s + compute_s + up_s,
        trainable_params=0,
        download_bytes=nbytes,
        upload_bytes=nbytes,
        memory_bytes=0.0,
    )


def test_staggered_uploads_overlap_the_slower_compute() -> None:
    # two devices at 10 Mbit/s behind a 10 Mbit/s uplink, 1.25 MB each (1 s alone); one
    # computes for 1 s, the other for 3 s: the first upload is done before the second starts
    fleet = Fleet(devices=(_device(0, tflops=0.3, up=10.0), _device(1, tflops=0.3, up=10.0)))
    costs = {"d0": _cost(1.0, 1.25e6, 10.0, 200.0), "d1": _cost(3.0, 1.25e6, 10.0, 200.0)}
    finish = simulate_round(
        _ap(fleet, 10.0, 1e3, "staggered"), fleet.devices, [1.0, 3.0], [1.25e6, 1.25e6]
    )
    assert max(finish) == pytest.approx(0.05 + 3.0 + 1.0)
    (stag,) = link_times(_ap(fleet, 10.0, 1e3, "staggered"), fleet, costs).values()
    (together,) = link_times(_ap(fleet, 10.0, 1e3, "together"), fleet, costs).values()
    assert stag == pytest.approx(max(finish))
    assert together == pytest.approx(0.05 + 3.0 + 2.0)  # waits for both uploads
    # released together they queue: 1 s + 2 x 1 s
    assert staggered_upload_s([1.0, 1.0], [1.25e6] * 2, [1.25e6] * 2, 1 / 1.25e6) == (
        pytest.approx(3.0)
    )
    # a release after every upload is done adds nothing of the others'
    assert staggered_upload_s([0.0, 5.0], [1.25e6] * 2, [1.25e6] * 2, 1 / 1.25e6) == (
        pytest.approx(6.0)
    )


def _costs_for(fleet: Fleet, topo: Topology, cfgs: dict) -> dict:
    problem = PlanningProblem.create(fleet, SPEC, JOB)
    return {d: problem.costs.evaluate(fleet[d], *c) for d, c in cfgs.items()}, problem


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tflops=st.lists(st.floats(0.02, 2.0), min_size=2, max_size=5),
    ups=st.lists(st.floats(1.0, 40.0), min_size=5, max_size=5),
    share=st.floats(0.2, 0.9),
    depth=st.lists(st.integers(1, 6), min_size=5, max_size=5),
)
def test_staggered_prediction_bounds_the_clock_from_below(tflops, ups, share, depth) -> None:
    """Downstream uncongested, the staggered prediction is a lower bound of the fair-sharing
    clock's round (uploads released at the devices' own download plus compute) and at least
    every device's own time."""
    n = len(tflops)
    fleet = Fleet(devices=tuple(_device(i, tflops=tflops[i], up=ups[i]) for i in range(n)))
    cap = share * sum(ups[:n])
    cfgs = {
        d.device_id: (tuple(range(6 - depth[i], 6)), (4,) * depth[i])
        for i, d in enumerate(fleet.devices)
    }
    topo = _ap(fleet, cap, 1e4, "staggered")
    evals, problem = _costs_for(fleet, topo, cfgs)
    ev = [evals[d] for d in fleet.device_ids]
    clock = max(
        simulate_round(topo, fleet.devices, [e.compute_s for e in ev], [e.upload_bytes for e in ev])
    )
    stag = predicted_round_time(topo, fleet, problem.costs, cfgs)
    assert stag <= clock * (1 + 1e-6)
    assert stag >= max(e.time_s for e in ev) * (1 - 1e-9)


# -- the exact planner's program -------------------------------------------------------------


def _enumerate(problem: PlanningProblem, topo: Topology) -> float:
    """The best ``U / T`` over every combination of the devices' configurations, each
    priced by :func:`predicted_round_time` (the staggered model)."""
    fleet = problem.fleet
    options = [device_configurations(SPEC.num_layers, JOB.ranks)] * len(fleet)
    best = 0.0
    for combo in itertools.product(*options):
        cfgs = dict(zip(fleet.device_ids, combo, strict=True))
        u = sum(
            d.num_samples * problem.utility_per_sample(*cfgs[d.device_id]) for d in fleet.devices
        )
        t = predicted_round_time(topo, fleet, problem.costs, cfgs)
        best = max(best, u / t)
    return best


@pytest.mark.parametrize(
    ("seed", "rows", "share"),
    [(0, None, 0.5), (1, None, 0.5), (2, None, 0.3), (0, None, 0.15), (0, 0, 0.3), (1, 0, 0.3)],
)
def test_staggered_program_matches_enumeration(
    seed: int, rows: int | None, share: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The program's optimum is the enumerated one; without row times set in advance it is
    reached by the rows added at the solutions' peaks alone."""
    import random

    from legend.planner import formulation, milp

    cuts = []
    if rows is not None:
        monkeypatch.setattr(formulation, "MAX_THETA_ROWS", rows)
        real = milp.staggered_cuts
        monkeypatch.setattr(
            milp, "staggered_cuts", lambda m, v: cuts.append(real(m, v)) or cuts[-1]
        )

    rng = random.Random(seed)
    fleet = Fleet(
        devices=tuple(
            _device(i, tflops=rng.uniform(0.05, 1.0), up=rng.uniform(2.0, 20.0), down=30.0)
            for i in range(3)
        )
    )
    cap_up = share * sum(d.uplink_mbps for d in fleet.devices)
    topo = _ap(fleet, cap_up, 0.6 * 90.0, "staggered")  # both directions congested
    opts = PlannerOptions(objective="rate", mip_gap=1e-7)
    plan = plan_round(fleet, SPEC, JOB, opts, topology=topo)
    assert validate_plan(plan, fleet, SPEC, JOB, topology=topo) == []
    problem = PlanningProblem.create(fleet, SPEC, JOB, opts, topology=topo)
    cfgs = {d.device_id: (d.layers, d.ranks) for d in plan.devices}
    assert plan.round_time_s == pytest.approx(
        predicted_round_time(topo, fleet, problem.costs, cfgs), rel=1e-9
    )
    assert plan.utility / plan.round_time_s == pytest.approx(_enumerate(problem, topo), rel=1e-6)
    if rows is not None:
        # at least one row added, and the last solution needed none
        assert any(c is not None for c in cuts) and cuts[-1] is None


@pytest.mark.parametrize("deadline_s", [1.2, 2.0])
def test_staggered_deadline_plans_meet_it_by_class_and_by_device(deadline_s: float) -> None:
    fleet = Fleet(
        devices=tuple(
            _device(i, tflops=0.3 if i % 2 else 1.0, up=10.0 if i % 2 else 25.0) for i in range(6)
        )
    )
    topo = _ap(fleet, 30.0, 100.0, "staggered")
    plans = []
    for by_class in (True, False):
        opts = PlannerOptions(objective="deadline", deadline_s=deadline_s, use_classes=by_class)
        plan = plan_round(fleet, SPEC, JOB, opts, topology=topo)
        assert plan.round_time_s <= deadline_s * (1 + 1e-6)
        assert validate_plan(plan, fleet, SPEC, JOB, deadline_s=deadline_s, topology=topo) == []
        plans.append(plan)
    assert plans[0].utility == pytest.approx(plans[1].utility, rel=1e-4)


def test_staggered_plans_move_more_through_the_same_link_than_together() -> None:
    """A slow device and fast ones behind one uplink: the together rows charge the fast
    devices' uploads after the slow device's compute; the staggered rows let them go
    first: the staggered plan's round time is the clock's, and its rate on the clock is at
    least the together plan's."""
    fleet = Fleet(
        devices=(
            _device(0, tflops=0.2, up=5.0),
            _device(1, tflops=1.0, up=30.0),
            _device(2, tflops=1.0, up=30.0),
        )
    )
    cap = 8.0
    plans = {}
    for model in ("together", "staggered"):
        topo = _ap(fleet, cap, 1e4, model)
        plans[model] = plan_round(fleet, SPEC, JOB, PlannerOptions(objective="rate"), topology=topo)
    topo = _ap(fleet, cap, 1e4, "staggered")
    problem = PlanningProblem.create(fleet, SPEC, JOB)

    def clock(plan) -> float:
        ev = [problem.costs.evaluate(fleet[d.device_id], d.layers, d.ranks) for d in plan.devices]
        return max(
            simulate_round(
                topo, fleet.devices, [e.compute_s for e in ev], [e.upload_bytes for e in ev]
            )
        )

    rate = {m: p.utility / clock(p) for m, p in plans.items()}
    assert rate["staggered"] >= rate["together"] * (1 - 1e-9)
    # the staggered round time is what the clock runs, the together one overrates its plan
    assert plans["staggered"].round_time_s == pytest.approx(clock(plans["staggered"]), rel=0.02)
    assert plans["together"].round_time_s > clock(plans["together"]) * 1.1


def _cutless(monkeypatch: pytest.MonkeyPatch) -> None:
    """No staggered rows in advance and no cut rounds: the program's first solution is
    what the deadline path must judge."""
    from legend.planner import formulation, milp

    monkeypatch.setattr(formulation, "MAX_THETA_ROWS", 0)
    monkeypatch.setattr(milp, "MAX_CUT_ROUNDS", 0)


def _crowded() -> tuple[Fleet, Topology]:
    fleet = Fleet(devices=tuple(_device(i, tflops=1.0, up=25.0) for i in range(4)))
    return fleet, _ap(fleet, 6.0, 1e4, "staggered")


def test_staggered_deadline_keeps_the_warm_start_when_the_rows_do_not_converge(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of cut rounds with a solution whose uploads overrun the deadline, the planner
    returns its warm start (which meets it) as a feasible plan without a bound."""
    import numpy as np

    from legend.planner import milp

    _cutless(monkeypatch)
    real = milp._decoupled

    def cheapest(ctx):  # the warm start: every device on its cheapest configuration
        cat = ctx.cat
        j = min(range(len(cat)), key=lambda j: (int(cat.depth[j]), sum(cat.ranks[j])))
        return np.full(len(ctx.fc), j, dtype=np.int64), None, real(ctx)[2]

    monkeypatch.setattr(milp, "_decoupled", cheapest)
    fleet, topo = _crowded()
    deadline_s = 1.0
    opts = PlannerOptions(objective="deadline", deadline_s=deadline_s, solver="highs")
    plan = plan_round(fleet, SPEC, JOB, opts, topology=topo)
    assert plan.status == "FEASIBLE" and plan.objective_bound is None
    assert "did not converge" in caplog.text
    assert {(d.layers, d.ranks) for d in plan.devices} == {((5,), (2,))}
    assert plan.round_time_s <= deadline_s * (1 + 1e-6)
    assert validate_plan(plan, fleet, SPEC, JOB, deadline_s=deadline_s, topology=topo) == []


def test_staggered_deadline_without_a_warm_start_names_the_fixes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from legend.planner import milp
    from legend.planner.errors import SolverError

    _cutless(monkeypatch)
    monkeypatch.setattr(milp, "_start", lambda ctx, m, choice: m)
    fleet, topo = _crowded()
    opts = PlannerOptions(objective="deadline", deadline_s=1.0, solver="highs")
    with pytest.raises(SolverError, match=r"time_limit_s.*contention = \"together\""):
        plan_round(fleet, SPEC, JOB, opts, topology=topo)
