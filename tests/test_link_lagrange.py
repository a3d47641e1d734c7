"""The per-link Lagrangian planner (legend.planner.linklagrange) against the MILP on small
topologies: its bound is never below the MILP's optimum, its plan is within the proven gap
of it, and its plans pass validate_plan with the round time the plan reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import device

from legend.models.spec import get_model_spec
from legend.planner import linklagrange
from legend.planner.api import PlannerOptions, PlanningProblem, make_plan, plan_round
from legend.planner.catalog import build_catalogue, fleet_costs
from legend.planner.plan import validate_plan
from legend.planner.profiles import Fleet, JobParams
from legend.planner.topology import Topology

SPEC = get_model_spec("all-MiniLM-L6-v2")
JOB = JobParams(ranks=(2, 4, 8))


def _setup(profiles, groups, share):
    keys = ("tflops", "uplink_mbps", "downlink_mbps", "num_samples")
    devices = tuple(
        device(f"d{i}", memory_gb=8.0, **dict(zip(keys, row, strict=True)))
        for i, row in enumerate(profiles)
    )
    fleet = Fleet(devices=devices)
    nodes, links = [], []
    for g, members in enumerate(groups):
        nodes.append({"id": f"ap-{g}", "kind": "access_point"})
        links.append(
            {
                "a": f"ap-{g}",
                "b": "server",
                "up_mbps": share * sum(profiles[i][1] for i in members),
                "down_mbps": share * sum(profiles[i][2] for i in members),
            }
        )
        for i in members:
            links.append(
                {
                    "a": f"d{i}",
                    "b": f"ap-{g}",
                    "up_mbps": profiles[i][1],
                    "down_mbps": profiles[i][2],
                }
            )
    topo = Topology.from_dict({"nodes": nodes, "links": links}, fleet)
    return fleet, topo


def _compare(fleet, topo, objective, deadline=None):
    opts = dict(objective=objective, mip_gap=1e-4, time_limit_s=30)
    if deadline is not None:
        opts["deadline_s"] = deadline
    problem = PlanningProblem.create(
        fleet, SPEC, JOB, PlannerOptions(solver="auto", **opts), topology=topo
    )
    assert linklagrange.applies(problem)
    out = linklagrange.solve_link_lagrangian(
        problem, build_catalogue(problem), fleet_costs(problem)
    )
    plan = make_plan(problem, out)
    assert plan.solver == "link-lagrangian"
    assert validate_plan(plan, fleet, SPEC, JOB, topology=topo, deadline_s=deadline) == []
    # the value the planner proved its gap for is the plan's own objective
    assert plan.objective_value == pytest.approx(out.objective_value, rel=1e-9)
    ref = plan_round(fleet, SPEC, JOB, PlannerOptions(solver="highs", **opts), topology=topo)
    assert ref.status == "OPTIMAL"
    opt = ref.objective_value
    assert plan.objective_bound is not None and plan.mip_gap is not None
    # the bound is never below the optimum, the plan never above it
    assert plan.objective_bound >= opt * (1 - 1e-6)
    assert plan.objective_value <= opt * (1 + 1e-6)
    assert plan.objective_value >= plan.objective_bound / (1 + plan.mip_gap) * (1 - 1e-9)
    return plan, ref


def test_two_links_rate_matches_the_milp():
    profiles = [(0.3, 20, 50, 300), (2.0, 40, 80, 500), (5.0, 100, 200, 400),
                (0.5, 10, 30, 200), (3.0, 60, 120, 600), (1.0, 25, 60, 350)]  # fmt: skip
    fleet, topo = _setup(profiles, [[0, 1, 2], [3, 4, 5]], 0.4)
    plan, ref = _compare(fleet, topo, "rate")
    assert plan.objective_value >= ref.objective_value * (1 - 0.005)


def test_three_links_deadline_matches_the_milp():
    profiles = [(0.3, 20, 50, 300), (2.0, 40, 80, 500), (5.0, 100, 200, 400),
                (0.5, 10, 30, 200), (3.0, 60, 120, 600), (1.0, 25, 60, 350),
                (8.0, 200, 400, 800)]  # fmt: skip
    fleet, topo = _setup(profiles, [[0, 1], [2, 3, 4], [5, 6]], 0.3)
    free = plan_round(fleet, SPEC, JOB, PlannerOptions(objective="rate"), topology=topo)
    _compare(fleet, topo, "deadline", deadline=free.round_time_s * 0.95)


def _profiles(most: int):
    """Devices as (tflops, uplink Mbit/s, downlink Mbit/s, samples)."""
    return st.lists(
        st.tuples(
            st.sampled_from([0.3, 1.0, 4.0]),
            st.sampled_from([10.0, 40.0, 150.0]),
            st.sampled_from([30.0, 100.0]),
            st.integers(100, 800),
        ),
        min_size=4,
        max_size=most,
    )


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _profiles(5),
    st.sampled_from([0.25, 0.5]),
)
def test_random_small_topologies_rate(profiles, share):
    half = len(profiles) // 2
    fleet, topo = _setup(profiles, [list(range(half)), list(range(half, len(profiles)))], share)
    _compare(fleet, topo, "rate")


def test_auto_keeps_the_milp_for_small_topologies():
    profiles = [(0.3, 20, 50, 300), (2.0, 40, 80, 500), (5.0, 100, 200, 400)]
    fleet, topo = _setup(profiles, [[0, 1, 2]], 0.4)
    plan = plan_round(fleet, SPEC, JOB, PlannerOptions(), topology=topo)
    assert plan.solver == "highs"


def test_not_applicable_with_coverage_or_min_time():
    profiles = [(0.3, 20, 50, 300), (2.0, 40, 80, 500), (5.0, 100, 200, 400)]
    fleet, topo = _setup(profiles, [[0, 1, 2]], 0.4)
    for opts in (
        PlannerOptions(objective="min-time", utility_floor_share=0.5),
        PlannerOptions(coverage_layers=2, coverage_share=0.5),
    ):
        problem = PlanningProblem.create(fleet, SPEC, JOB, opts, topology=topo)
        assert not linklagrange.applies(problem)


def _plain_h(linked, t, p):
    """``h_e(p_e, t)`` per link by a plain loop over the candidate ``D`` of each link."""
    out = []
    for e in range(linked.E):
        rows = [r for r in range(len(linked.rows)) if linked.link[r] == e]
        q = p[e] * linked.kappa[e]
        cands = sorted({float(o) for r in rows for o in linked.OO[r] if o <= t * (1 + 1e-12)})
        best = -math.inf
        for d in cands:
            total = p[e] * (t - d)
            for r in rows:
                vals = [
                    linked.V[r, k] - q * linked.BB[r, k]
                    for k in range(linked.W)
                    if linked.OO[r, k] <= d and linked.TAU[r, k] <= t * (1 + 1e-12)
                ]
                total += max(vals, default=-math.inf)
            best = max(best, total)
        out.append(best)
    return np.asarray(out)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _profiles(7),
    st.sampled_from([0.25, 0.5]),
    st.floats(1.0, 1.6),
    st.lists(st.floats(0.0, 3.0), min_size=3, max_size=3),
)
def test_link_bounds_match_a_plain_loop(profiles, share, stretch, prices):
    """The merged evaluation of every link's ``h_e`` (only the rises of each device's best
    priced column, merged per link by ``o``) equals the plain maximum over ``D``, and the
    chosen columns reach it."""
    third = len(profiles) // 3
    groups = [list(range(third + 1)), list(range(third + 1, len(profiles)))]
    fleet, topo = _setup(profiles, groups, share)
    problem = PlanningProblem.create(
        fleet, SPEC, JOB, PlannerOptions(objective="rate"), topology=topo
    )
    solver = linklagrange._Solver(problem, build_catalogue(problem), fleet_costs(problem))
    model = solver.model
    linked = linklagrange._Linked(model, solver._slowest_bound())
    solver.linked, solver.free = linked, None
    t_lo = solver._t_lo()
    linked.prepare(t_lo)
    t = t_lo * stretch
    # prices around the value per second of link time
    p = np.asarray(prices[: linked.E]) * float(model.u.max()) / max(linked.kappa.max(), 1e-12)
    ev, pos = linked.evaluate(t, p, choice=True)
    plain = _plain_h(linked, t, p)
    # what the rate bound on an interval of round times rests on: h_e(p, T) - p T does
    # not decrease with T
    later, _ = linked.evaluate(t * 1.07, p)
    fin = np.isfinite(ev.h)
    assert (
        later.h[fin] - p[fin] * t * 1.07 >= (ev.h - p * t)[fin] - 1e-9 * np.abs(ev.h[fin])
    ).all()
    assert np.allclose(ev.h, plain, rtol=1e-9, atol=1e-9 * np.abs(plain).max(initial=1.0))
    assert pos is not None
    for e in range(linked.E):
        if not np.isfinite(ev.h[e]):
            continue
        rows = np.flatnonzero(linked.link == e)
        q = p[e] * linked.kappa[e]
        assert (pos[rows] >= 0).all()
        o = linked.OO[rows, pos[rows]]
        assert (o <= ev.d_star[e] * (1 + 1e-12)).all()
        assert (linked.TAU[rows, pos[rows]] <= t * (1 + 1e-12)).all()
        got = (linked.V[rows, pos[rows]] - q * linked.BB[rows, pos[rows]]).sum()
        assert got + p[e] * (t - ev.d_star[e]) == pytest.approx(ev.h[e], rel=1e-9)
        b = linked.BB[rows, pos[rows]].sum()
        assert ev.slack[e] == pytest.approx(t - ev.d_star[e] - linked.kappa[e] * b, rel=1e-9)
