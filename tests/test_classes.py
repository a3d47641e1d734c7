"""Device classes: grouping, bucketing, the configuration catalogue, Pareto fronts, and
agreement of the class program with the per-device program on every objective."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import TINY, tiny_job

from legend.planner.api import PlannerOptions, PlanningProblem, plan_round, rank_gain
from legend.planner.classes import (
    bucket_down,
    class_pareto_configs,
    enumerate_configurations,
    group_devices,
    polish_configurations,
    resolve_use_classes,
)
from legend.planner.errors import InfeasibleError, PlannerInputError
from legend.planner.formulation import decode, formulate
from legend.planner.plan import validate_plan
from legend.planner.profiles import DeviceProfile, Fleet
from legend.planner.solvers import solve_milp


def device(name: str, **kw: float) -> DeviceProfile:
    base = dict(tflops=0.05, memory_gb=2.0, uplink_mbps=10.0, downlink_mbps=50.0, num_samples=100)
    base.update(kw)
    return DeviceProfile(device_id=name, **base)  # type: ignore[arg-type]


TYPES = (
    dict(tflops=0.5, uplink_mbps=20.0, num_samples=120),
    dict(tflops=0.02, uplink_mbps=2.0, downlink_mbps=10.0, num_samples=300),
    dict(tflops=0.1, uplink_mbps=5.0, num_samples=60),
)


def typed_fleet(kinds: list[int]) -> Fleet:
    return Fleet(
        devices=tuple(device(f"d{i}", **TYPES[k]) for i, k in enumerate(kinds))  # type: ignore[arg-type]
    )


# -- grouping and bucketing ----------------------------------------------------------------


@given(
    value=st.floats(min_value=1e-3, max_value=1e4, allow_nan=False),
    ratio=st.sampled_from([1.1, 1.25, 1.5, 2.0]),
)
def test_bucket_down_is_a_grid_edge_at_or_below(value: float, ratio: float) -> None:
    edge = bucket_down(value, ratio)
    assert edge <= value
    assert edge * ratio > value * (1 - 1e-12)
    k = math.log(edge) / math.log(ratio)
    assert abs(k - round(k)) < 1e-9


def test_bucket_ratio_must_exceed_one() -> None:
    with pytest.raises(PlannerInputError, match="class_bucket_ratio"):
        bucket_down(3.0, 1.0)
    with pytest.raises(PlannerInputError, match="class_bucket_ratio"):
        PlannerOptions(class_bucket_ratio=0.9)


def test_exact_classes_group_equal_profiles_in_fleet_order() -> None:
    fleet = typed_fleet([0, 1, 0, 2, 1, 0])
    classes = group_devices(PlanningProblem.create(fleet, TINY, tiny_job()))
    assert [c.members for c in classes] == [(0, 2, 5), (1, 4), (3,)]
    assert [c.samples for c in classes] == [120, 300, 60]


def test_bucketed_classes_round_profiles_down_and_order_members_by_samples() -> None:
    fleet = Fleet(
        devices=(
            device("a", tflops=0.11, memory_gb=2.1, num_samples=50),
            device("b", tflops=0.12, memory_gb=2.2, num_samples=90),
            device("c", tflops=0.5, memory_gb=2.3, num_samples=70),
        )
    )
    options = PlannerOptions(class_bucket_ratio=2.0)
    problem = PlanningProblem.create(fleet, TINY, tiny_job(), options)
    classes = group_devices(problem, bucket_ratio=2.0)
    assert [c.members for c in classes] == [(1, 0), (2,)]
    first = classes[0]
    assert first.profile.tflops <= 0.11 and first.profile.memory_gb <= 2.1
    assert first.samples == 70
    assert resolve_use_classes(problem) is True


def test_automatic_choice() -> None:
    many = PlanningProblem.create(typed_fleet([0, 1, 2] * 4), TINY, tiny_job())
    assert resolve_use_classes(many) is True
    distinct = PlanningProblem.create(typed_fleet([0, 1, 2]), TINY, tiny_job())
    assert resolve_use_classes(distinct) is False


# -- catalogue and Pareto fronts -----------------------------------------------------------


@pytest.mark.parametrize("monotone", [True, False])
def test_catalogue_is_the_best_rank_vector_per_depth_and_rank_sum(monotone: bool) -> None:
    job = tiny_job((2, 4, 8))
    problem = PlanningProblem.create(
        typed_fleet([0]), TINY, job, PlannerOptions(monotone_ranks=monotone)
    )
    catalog = enumerate_configurations(problem)
    w = problem.layer_weights
    L = TINY.num_layers
    best: dict[tuple[int, int], float] = {}
    for d in range(1, L + 1):
        for ranks in itertools.product(job.ranks, repeat=d):
            if monotone and any(b < a for a, b in itertools.pairwise(ranks)):
                continue
            u = sum(w[L - d + i] * rank_gain(r) for i, r in enumerate(ranks))
            key = (d, sum(ranks))
            best[key] = max(best.get(key, -1.0), u)
    got = {
        (int(d), int(s)): float(u)
        for d, s, u in zip(catalog.depth, catalog.rank_sum, catalog.utility_per_sample, strict=True)
    }
    assert got.keys() == best.keys()
    for key, u in best.items():
        assert got[key] == pytest.approx(u, rel=1e-12)
    for j in range(len(catalog)):
        layers, ranks = catalog.configuration(j)
        assert sum(ranks) == catalog.rank_sum[j] and len(layers) == catalog.depth[j]
        u = sum(w[layer] * rank_gain(r) for layer, r in zip(layers, ranks, strict=True))
        assert u == pytest.approx(catalog.utility_per_sample[j])


def test_pareto_front_keeps_exactly_the_undominated_configurations() -> None:
    problem = PlanningProblem.create(typed_fleet([1]), TINY, tiny_job((2, 4, 8)))
    catalog = enumerate_configurations(problem)
    (cls,) = group_devices(problem)
    front = class_pareto_configs(problem, cls, catalog, deadline_s=None)
    # times and utilities of every fitting catalogue entry, from the cost model itself
    dev = problem.fleet.devices[0]
    pts = []
    for j in range(len(catalog)):
        cost = problem.costs.evaluate(dev, *catalog.configuration(j))
        if cost.memory_bytes <= dev.memory_bytes:
            pts.append((j, cost.time_s, float(catalog.utility_per_sample[j])))
    kept = set(front.index.tolist())

    def dominated(t: float, u: float, j0: int) -> bool:
        return any(
            t2 <= t * (1 + 1e-12) and u2 >= u - 1e-12 and (t2 < t or u2 > u)
            for j, t2, u2 in pts
            if j != j0
        )

    for j, t, u in pts:
        assert (j in kept) == (not dominated(t, u, j)), (j, t, u)
    for j, t in zip(front.index, front.time_s, strict=True):
        assert t == pytest.approx(problem.costs.evaluate(dev, *catalog.configuration(j)).time_s)


# -- class program vs per-device program --------------------------------------------------

AGREE_CASES = {
    "rate": {},
    "deadline": {"objective": "deadline", "deadline_s": 0.06},
    "min-time": {"objective": "min-time", "utility_floor_share": 0.7},
    "rate+link": {"server_mbps": 6.0},
    "deadline+link": {"objective": "deadline", "deadline_s": 0.06, "server_mbps": 6.0},
    "rate+coverage": {"coverage_layers": 3, "coverage_share": 0.6},
    "min-time+coverage": {
        "objective": "min-time",
        "coverage_layers": 3,
        "coverage_share": 0.6,
    },
    "rate+dropping": {"allow_dropping": True, "min_participants": 4},
    "deadline+dropping": {
        "objective": "deadline",
        "deadline_s": 0.02,
        "allow_dropping": True,
        "min_participants": 2,
    },
}


@pytest.mark.parametrize("case", sorted(AGREE_CASES))
def test_class_program_agrees_with_per_device_program(case: str) -> None:
    fleet = typed_fleet([0, 1, 0, 2, 1, 0])
    job = tiny_job()
    base = PlannerOptions(mip_gap=1e-7, **AGREE_CASES[case])
    per_device = plan_round(fleet, TINY, job, base.with_(use_classes=False))
    by_class = plan_round(fleet, TINY, job, base.with_(use_classes=True))
    assert per_device.status == by_class.status == "OPTIMAL"
    tol = max(per_device.mip_gap or 0, by_class.mip_gap or 0, 1e-6)
    assert by_class.objective_value == pytest.approx(per_device.objective_value, rel=tol)
    for plan in (per_device, by_class):
        assert (
            validate_plan(
                plan,
                fleet,
                TINY,
                job,
                deadline_s=base.deadline_s,
                require_all=not base.allow_dropping,
                server_mbps=base.server_mbps,
            )
            == []
        )
    problem = PlanningProblem.create(fleet, TINY, job, base.with_(use_classes=True))
    assert formulate(problem).kind == "class"


def test_expansion_is_deterministic() -> None:
    fleet = typed_fleet([0, 1, 0, 2, 1, 0] * 3)
    options = PlannerOptions(server_mbps=40.0, use_classes=True)
    a = plan_round(fleet, TINY, tiny_job(), options)
    b = plan_round(fleet, TINY, tiny_job(), options)
    assert [(d.layers, d.ranks) for d in a.devices] == [(d.layers, d.ranks) for d in b.devices]


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(min_value=0, max_value=10_000))
def test_bucketed_plans_are_feasible_for_every_member(seed: int) -> None:
    """Rounding profiles down keeps every member within deadline and memory, and the plan's
    true objective never beats the exact per-device optimum."""
    rng = np.random.default_rng(seed)
    devices = tuple(
        device(
            f"d{i}",
            tflops=float(rng.uniform(0.02, 0.5)),
            memory_gb=float(rng.uniform(0.05, 2.0)),
            uplink_mbps=float(rng.uniform(1, 20)),
            downlink_mbps=float(rng.uniform(5, 50)),
            num_samples=int(rng.integers(20, 300)),
        )
        for i in range(6)
    )
    fleet = Fleet(devices=devices)
    job = tiny_job()
    deadline = 0.08
    for objective in ("deadline", "rate"):
        options = PlannerOptions(
            objective=objective,
            deadline_s=deadline if objective == "deadline" else None,
            allow_dropping=True,
            mip_gap=1e-4,
        )
        try:
            exact = plan_round(fleet, TINY, job, options.with_(use_classes=False))
        except InfeasibleError:
            continue
        bucketed = plan_round(fleet, TINY, job, options.with_(class_bucket_ratio=1.5))
        violations = validate_plan(
            bucketed,
            fleet,
            TINY,
            job,
            deadline_s=deadline if objective == "deadline" else None,
            require_all=False,
        )
        assert violations == []
        assert bucketed.objective_value <= exact.objective_value * (1 + 2e-4)


def test_polishing_raises_utility_within_the_deadline() -> None:
    rng = np.random.default_rng(7)
    fleet = Fleet(
        devices=tuple(
            device(
                f"d{i}",
                tflops=float(rng.uniform(0.02, 0.5)),
                uplink_mbps=float(rng.uniform(1, 20)),
                num_samples=int(rng.integers(20, 300)),
            )
            for i in range(12)
        )
    )
    job = tiny_job()
    deadline = 0.05
    options = PlannerOptions(objective="deadline", deadline_s=deadline, class_bucket_ratio=2.0)
    problem = PlanningProblem.create(fleet, TINY, job, options)
    milp = formulate(problem, deadline)
    assert milp.kind == "class"
    res = solve_milp(milp, "pulp-highs", time_limit_s=30.0)
    assert res.values is not None
    raw = decode(milp, res.values)
    polished = polish_configurations(problem, raw, deadline)
    plan = plan_round(fleet, TINY, job, options)
    assert tuple((d.layers, d.ranks) for d in plan.devices) == polished
    assert validate_plan(plan, fleet, TINY, job, deadline_s=deadline) == []

    def totals(configs):  # (utility, round time) on the true profiles
        t = max(problem.costs.evaluate(fleet.devices[i], *c).time_s for i, c in enumerate(configs))
        return sum(problem.utility(i, *c) for i, c in enumerate(configs)), t

    (u_raw, t_raw), (u_pol, t_pol) = totals(raw), totals(polished)
    assert t_raw <= deadline and t_pol <= deadline * (1 + 1e-12)
    assert u_pol > u_raw  # rounding down by up to 2x leaves room on the true profiles
    for (layers_raw, _), (layers_pol, _) in zip(raw, polished, strict=True):
        assert len(layers_pol) >= len(layers_raw)


def test_bucketing_that_blocks_a_class_is_explained() -> None:
    problem = PlanningProblem.create(typed_fleet([0]), TINY, tiny_job())
    layers, ranks = (TINY.num_layers - 1,), (2,)
    need_gb = problem.costs.evaluate(problem.fleet.devices[0], layers, ranks).memory_bytes / 1e9
    # Just above the need: the device fits, its profile rounded down by 2x does not.
    fleet = Fleet(devices=(device("edge", memory_gb=need_gb * 1.01),))
    with pytest.raises(InfeasibleError, match="class_bucket_ratio"):
        plan_round(fleet, TINY, tiny_job(), PlannerOptions(class_bucket_ratio=2.0))
    assert plan_round(fleet, TINY, tiny_job()).status == "OPTIMAL"
