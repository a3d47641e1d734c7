"""The integer program: structure, hand-solved answers, decoding, warm start, and agreement
with an exhaustive oracle for every objective and optional constraint."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ip_oracle import close, solve_exhaustively
from strategies import TINY, tiny_job

from legend.planner.api import PlannerOptions, PlanningProblem, plan_round
from legend.planner.errors import PlannerInputError
from legend.planner.formulation import MILP, VarKey, decode, formulate, round_time_of
from legend.planner.plan import validate_plan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams


def device(name: str, **kw: float) -> DeviceProfile:
    base = dict(tflops=0.05, memory_gb=2.0, uplink_mbps=10.0, downlink_mbps=50.0, num_samples=100)
    base.update(kw)
    return DeviceProfile(device_id=name, **base)  # type: ignore[arg-type]


FLEET3 = Fleet(
    devices=(
        device("fast", tflops=0.5, uplink_mbps=20.0, num_samples=120),
        device("slow", tflops=0.02, uplink_mbps=2.0, downlink_mbps=10.0, num_samples=300),
        device("mid", tflops=0.1, uplink_mbps=5.0, num_samples=60),
    )
)


def in_rows(milp: MILP, values: np.ndarray, tol: float = 1e-7) -> bool:
    act = milp.matrix @ values
    return bool(
        np.all(act >= milp.row_lower - tol * (1 + np.abs(milp.row_lower)))
        and np.all(act <= milp.row_upper + tol * (1 + np.abs(milp.row_upper)))
    )


def encode(milp: MILP, problem: PlanningProblem, configs) -> np.ndarray:
    """Values of the per-device program for given configurations (T = slowest)."""
    k_of = {r: k for k, r in enumerate(problem.job.ranks)}
    pos = {key: j for j, key in enumerate(milp.index)}
    v = np.zeros(milp.num_vars)
    t, slowest = 0.0, None
    for i, (layers, ranks) in enumerate(configs):
        if not layers:
            continue
        v[pos[VarKey("z", i)]] = 1.0
        for layer, rank in zip(layers, ranks, strict=True):
            v[pos[VarKey("x", i, layer, k_of[rank])]] = 1.0
        ti = problem.costs.evaluate(problem.fleet.devices[i], layers, ranks).time_s
        if ti > t:
            t, slowest = ti, i
    if milp.round_time is not None:
        v[milp.round_time] = t
    if VarKey("h", 0) in pos and slowest is not None:
        v[pos[VarKey("h", slowest)]] = 1.0
    return v


# -- known answers -------------------------------------------------------------------------


def test_deadline_known_answer_by_hand() -> None:
    """Uniform layer weights, ranks (2, 4): the big device takes every layer at rank 4; the
    slow one's deadline admits only its smallest configuration (top layer, rank 2), so
    U = 100 * 4 * log2(5) + 300 * log2(3)."""
    job = JobParams(batch_size=8, seq_len=32, local_steps=3, ranks=(2, 4))
    big = device("big", tflops=1.0, uplink_mbps=100.0, downlink_mbps=100.0, num_samples=100)
    slow = device("slow", tflops=0.005, uplink_mbps=1.0, downlink_mbps=5.0, num_samples=300)
    fleet = Fleet(devices=(big, slow))
    problem = PlanningProblem.create(fleet, TINY, job)
    costs = problem.costs
    smallest = costs.evaluate(slow, (3,), (2,)).time_s
    next_up = min(
        costs.evaluate(slow, (3,), (4,)).time_s, costs.evaluate(slow, (2, 3), (2, 2)).time_s
    )
    deadline = (smallest + next_up) / 2
    assert costs.evaluate(big, (0, 1, 2, 3), (4, 4, 4, 4)).time_s < deadline
    options = PlannerOptions(objective="deadline", deadline_s=deadline, layer_weights="uniform")
    plan = plan_round(fleet, TINY, job, options)
    assert plan.status == "OPTIMAL"
    assert plan.device("big").layers == (0, 1, 2, 3)
    assert plan.device("big").ranks == (4, 4, 4, 4)
    assert plan.device("slow").layers == (3,)
    assert plan.device("slow").ranks == (2,)
    expected = 100 * 4 * math.log2(5) + 300 * math.log2(3)
    assert plan.objective_value == pytest.approx(expected, rel=1e-9)
    assert validate_plan(plan, fleet, TINY, job, deadline_s=deadline) == []


def test_rate_known_answer_single_rank() -> None:
    """One device, one rank: U(d) = n d g(r) and T(d) = a + b d, so U/T grows with d and the
    best rate takes every layer; the rate is U(L) / T(L)."""
    job = JobParams(batch_size=8, seq_len=32, local_steps=3, ranks=(8,))
    fleet = Fleet(devices=(device("only", num_samples=50),))
    plan = plan_round(fleet, TINY, job, PlannerOptions(layer_weights="uniform"))
    layers = (0, 1, 2, 3)
    t = PlanningProblem.create(fleet, TINY, job).costs.evaluate(fleet.devices[0], layers, (8,) * 4)
    assert plan.device("only").layers == layers
    assert plan.objective_value == pytest.approx(50 * 4 * math.log2(9) / t.time_s, rel=1e-7)


# -- structure -----------------------------------------------------------------------------


def test_rows_and_variables_are_named_after_the_constraints() -> None:
    options = PlannerOptions(
        allow_dropping=True,
        min_participants=2,
        server_mbps=50.0,
        coverage_layers=2,
        coverage_share=0.5,
        min_depth=2,
    )
    problem = PlanningProblem.create(FLEET3, TINY, tiny_job(), options)
    milp = formulate(problem, use_classes=False)
    N, L, K = 3, TINY.num_layers, 3
    assert len(milp.rows_named("C1")) == N * L
    assert len(milp.rows_named("C2")) == N * (L - 1)
    assert len(milp.rows_named("C3")) == N
    assert len(milp.rows_named("C3min")) == N
    assert len(milp.rows_named("C4")) == N * (L - 1)
    assert len(milp.rows_named("C5")) == N
    assert len(milp.rows_named("C6")) == N
    assert milp.rows_named("C7") and milp.rows_named("C9")
    assert len(milp.rows_named("C8")) == 2
    kinds = [key.kind for key in milp.index]
    assert kinds.count("x") == N * L * K and kinds.count("z") == N and kinds.count("T") == 1
    assert milp.index[milp.round_time or 0] == VarKey("T")
    # every x variable's name spells its meaning
    for name, key in zip(milp.var_names, milp.index, strict=True):
        if key.kind == "x":
            assert name == f"x_{key.owner}_{key.a}_{key.b}"
    # z free with dropping; fixed to 1 without
    z = [j for j, key in enumerate(milp.index) if key.kind == "z"]
    assert np.all(milp.lower[z] == 0)
    fixed = formulate(PlanningProblem.create(FLEET3, TINY, tiny_job()), use_classes=False)
    z = [j for j, key in enumerate(fixed.index) if key.kind == "z"]
    assert np.all(fixed.lower[z] == 1)
    assert not fixed.rows_named("C4") or PlannerOptions().monotone_ranks
    no_c4 = formulate(
        PlanningProblem.create(FLEET3, TINY, tiny_job(), PlannerOptions(monotone_ranks=False)),
        use_classes=False,
    )
    assert no_c4.rows_named("C4") == []


def test_deadline_program_has_constant_round_time() -> None:
    problem = PlanningProblem.create(
        FLEET3, TINY, tiny_job(), PlannerOptions(objective="deadline", deadline_s=5.0)
    )
    milp = formulate(problem, 5.0, use_classes=False)
    assert milp.round_time is None and milp.sense == "max"
    # C5 is written relative to the deadline
    assert np.allclose(milp.row_upper[milp.rows_named("C5")], 1.0, rtol=1e-4)
    with pytest.raises(PlannerInputError, match="not both"):
        formulate(problem, 5.0, utility_floor=1.0)


def test_decode_and_encode_round_trip() -> None:
    problem = PlanningProblem.create(FLEET3, TINY, tiny_job(), PlannerOptions(allow_dropping=True))
    milp = formulate(problem, use_classes=False)
    configs = (((1, 2, 3), (2, 4, 8)), ((), ()), ((3,), (8,)))
    values = encode(milp, problem, configs)
    assert in_rows(milp, values)
    assert decode(milp, values) == configs
    expected_t = max(
        problem.costs.evaluate(problem.fleet.devices[i], *configs[i]).time_s for i in (0, 2)
    )
    assert round_time_of(milp, values) == pytest.approx(expected_t)
    assert milp.utility_value(values) == pytest.approx(
        problem.utility(0, *configs[0]) + problem.utility(2, *configs[2])
    )


def test_rows_reject_broken_configurations() -> None:
    """A gap in the layer block (C2) and ranks decreasing toward the output (C4) violate rows."""
    problem = PlanningProblem.create(FLEET3, TINY, tiny_job())
    milp = formulate(problem, use_classes=False)
    ok = (((2, 3), (4, 8)), ((3,), (2,)), ((3,), (2,)))
    assert in_rows(milp, encode(milp, problem, ok))
    gap = (((1, 3), (4, 8)), ((3,), (2,)), ((3,), (2,)))
    assert not in_rows(milp, encode(milp, problem, gap))
    decreasing = (((2, 3), (8, 4)), ((3,), (2,)), ((3,), (2,)))
    assert not in_rows(milp, encode(milp, problem, decreasing))


def test_warm_start_encodes_last_plan() -> None:
    job = tiny_job()
    first = plan_round(FLEET3, TINY, job)
    problem = PlanningProblem.create(FLEET3, TINY, job, PlannerOptions(), warm_start=first)
    milp = formulate(problem, use_classes=False)
    assert milp.start is not None
    assert in_rows(milp, milp.start)
    assert decode(milp, milp.start) == tuple((d.layers, d.ranks) for d in first.devices)
    again = plan_round(FLEET3, TINY, job, warm_start=first)
    assert again.objective_value == pytest.approx(first.objective_value, rel=1e-6)


def test_bad_option_combinations_name_the_field() -> None:
    with pytest.raises(PlannerInputError, match="coverage_layers"):
        formulate(
            PlanningProblem.create(
                FLEET3, TINY, tiny_job(), PlannerOptions(coverage_layers=9, coverage_share=0.5)
            )
        )
    with pytest.raises(PlannerInputError, match="min_participants"):
        formulate(
            PlanningProblem.create(
                FLEET3, TINY, tiny_job(), PlannerOptions(allow_dropping=True, min_participants=4)
            )
        )


# -- agreement with the exhaustive oracle --------------------------------------------------

OPTION_SETS = {
    "plain": {},
    "non-monotone": {"monotone_ranks": False},
    "min-depth": {"min_depth": 2},
    "server-link": {"server_mbps": 4.0},
    "coverage": {"coverage_layers": 3, "coverage_share": 0.6},
    "dropping": {"allow_dropping": True, "min_participants": 2},
}


def objective_options(objective: str) -> dict[str, object]:
    if objective == "deadline":
        return {"objective": "deadline", "deadline_s": 0.06}
    if objective == "min-time":
        return {"objective": "min-time", "utility_floor_share": 0.7}
    return {"objective": "rate"}


@pytest.mark.parametrize("objective", ["rate", "deadline", "min-time"])
@pytest.mark.parametrize("option_set", sorted(OPTION_SETS))
def test_matches_oracle(objective: str, option_set: str) -> None:
    fleet = FLEET3 if option_set != "non-monotone" else Fleet(devices=FLEET3.devices[:2])
    job = tiny_job()
    options = PlannerOptions(
        mip_gap=1e-7, use_classes=False, **objective_options(objective), **OPTION_SETS[option_set]
    )
    problem = PlanningProblem.create(fleet, TINY, job, options)
    truth = solve_exhaustively(problem)
    assert truth is not None
    plan = plan_round(fleet, TINY, job, options)
    assert plan.status in ("OPTIMAL", "FEASIBLE")
    tol = max(plan.mip_gap or 0.0, 1e-6)
    assert close(plan.objective_value, truth.objective, tol), (plan.objective_value, truth)
    violations = validate_plan(
        plan,
        fleet,
        TINY,
        job,
        deadline_s=options.deadline_s,
        monotone_ranks=options.monotone_ranks,
        min_depth=options.min_depth,
        require_all=not options.allow_dropping,
        server_mbps=options.server_mbps,
    )
    assert violations == []
