"""The catalogue MILP: structure, hand-solved answers, decoding, warm start, and agreement of
the sweep and every MILP backend with an exhaustive oracle for every objective and option."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ip_oracle import close, solve_exhaustively
from strategies import FLEET3, OBJECTIVES, TINY, program, tiny_job, violations
from strategies import device_2gb as device

from legend.models.errors import InputError
from legend.planner.api import PlannerOptions, PlanningProblem, plan_round
from legend.planner.backends import BACKENDS, satisfies
from legend.planner.catalog import build_catalogue, fleet_costs
from legend.planner.errors import PlannerInputError
from legend.planner.formulation import decode, decode_columns, formulate, round_time_of
from legend.planner.plan import validate_plan
from legend.planner.profiles import Fleet, JobParams

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
    plan = plan_round(fleet, TINY, job, PlannerOptions(objective="rate", layer_weights="uniform"))
    layers = (0, 1, 2, 3)
    t = PlanningProblem.create(fleet, TINY, job).costs.evaluate(fleet.devices[0], layers, (8,) * 4)
    assert plan.device("only").layers == layers
    assert plan.objective_value == pytest.approx(50 * 4 * math.log2(9) / t.time_s, rel=1e-7)


# -- structure -----------------------------------------------------------------------------


def test_one_choose_one_row_per_device_and_named_coupling_rows() -> None:
    options = PlannerOptions(
        server_mbps=4.0, coverage_layers=3, coverage_share=0.6, use_classes=False
    )
    problem = PlanningProblem.create(FLEET3, TINY, tiny_job(), options)
    milp = program(problem)
    names = milp.row_names
    assert [n for n in names if n.startswith("C3[")] == ["C3[0]", "C3[1]", "C3[2]"]
    assert "C7" in names
    # coverage rows for the layers that need depth 2 and 3 (the output layer needs none)
    assert [n for n in names if n.startswith("C8")] == ["C8[2]", "C8[1]"]
    assert milp.round_time is not None and milp.index[milp.round_time].kind == "T"
    # every count variable is a column of the catalogue of its device
    assert {k.kind for k in milp.index} == {"m", "T"}
    assert milp.matrix.shape == (len(names), milp.num_vars)


def test_deadline_program_has_constant_round_time_and_filtered_columns() -> None:
    problem = PlanningProblem.create(FLEET3, TINY, tiny_job())
    milp = program(problem, 0.05)
    assert milp.round_time is None and milp.deadline_s == 0.05
    assert np.all(milp.units.time_s <= 0.05 * (1 + 1e-9))
    with pytest.raises(PlannerInputError, match="not both"):
        program(problem, 0.05, utility_floor=1.0)


def test_identical_devices_share_one_unit_with_counts() -> None:
    twins = Fleet(
        devices=(*FLEET3.devices, device("fast-2", tflops=0.5, uplink_mbps=20.0, num_samples=120))
    )
    problem = PlanningProblem.create(twins, TINY, tiny_job())
    milp = program(problem)
    assert len(milp.units) == 3 and [len(m) for m in milp.units.groups.members] == [2, 1, 1]
    by_device = program(
        PlanningProblem.create(twins, TINY, tiny_job(), PlannerOptions(use_classes=False))
    )
    assert len(by_device.units) == 4
    # the counts of a class are general integers bounded by its size
    counts = [k for k, key in enumerate(milp.index) if key.kind == "m" and key.owner == 0]
    assert np.all(milp.upper[counts] == 2) and np.all(milp.integer[counts])


def test_decode_and_encode_round_trip() -> None:
    problem = PlanningProblem.create(FLEET3, TINY, tiny_job())
    cat, fc = build_catalogue(problem), fleet_costs(problem)
    choice = np.asarray([len(cat) - 1, 0, 3])
    milp = formulate(problem, cat, fc, None, start=choice)
    assert milp.start is not None and satisfies(milp, milp.start)
    assert list(decode_columns(milp, milp.start)) == list(choice)
    configs = decode(milp, milp.start)
    assert configs[1] == cat.configuration(0)
    slowest = max(
        problem.costs.evaluate(d, *c).time_s for d, c in zip(FLEET3.devices, configs, strict=True)
    )
    assert round_time_of(milp, milp.start) == pytest.approx(slowest, rel=1e-12)


def test_warm_start_encodes_last_plan() -> None:
    problem = PlanningProblem.create(FLEET3, TINY, tiny_job())
    last = plan_round(FLEET3, TINY, tiny_job())
    warm = PlanningProblem.create(FLEET3, TINY, tiny_job(), warm_start=last)
    milp = program(warm)
    assert milp.start is not None and satisfies(milp, milp.start)
    assert decode(milp, milp.start) == tuple((d.layers, d.ranks) for d in last.devices)
    assert program(problem).start is None


def test_bad_option_combinations_name_the_field() -> None:
    with pytest.raises(PlannerInputError, match="coverage_layers"):
        PlanningProblem.create(
            FLEET3, TINY, tiny_job(), PlannerOptions(coverage_layers=9, coverage_share=0.5)
        )
    with pytest.raises(PlannerInputError, match="min_participants"):
        PlanningProblem.create(
            FLEET3, TINY, tiny_job(), PlannerOptions(allow_dropping=True, min_participants=4)
        )
    with pytest.raises(PlannerInputError, match="server_mbps"):
        PlannerOptions(server_mbps=float("inf"))
    with pytest.raises(InputError, match="rank 128 is wider"):
        PlanningProblem.create(FLEET3, TINY, tiny_job((2, 128, 1024)))
    with pytest.raises(PlannerInputError, match="unknown solver"):
        PlannerOptions(solver="magic")
    # coverage of the output layer alone is no constraint (every participant trains it)
    with pytest.raises(PlannerInputError, match="`coverage_layers` = 1 constrains nothing"):
        PlannerOptions(coverage_layers=1, coverage_share=0.5, allow_dropping=True)
    assert PlannerOptions(coverage_layers=1, coverage_share=0.0).coverage_layers == 1


# -- agreement with the exhaustive oracle --------------------------------------------------

OPTION_SETS = {
    "plain": {},
    "non-monotone": {"monotone_ranks": False},
    "min-depth": {"min_depth": 2},
    "server-link": {"server_mbps": 4.0},
    "coverage": {"coverage_layers": 3, "coverage_share": 0.6},
    "dropping": {"allow_dropping": True, "min_participants": 2},
}


SOLVERS = ("auto", *BACKENDS)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("objective", ["rate", "deadline", "min-time"])
@pytest.mark.parametrize("option_set", sorted(OPTION_SETS))
def test_matches_oracle(objective: str, option_set: str, solver: str) -> None:
    fleet = FLEET3 if option_set != "non-monotone" else Fleet(devices=FLEET3.devices[:2])
    job = tiny_job()
    options = PlannerOptions(
        solver=solver,
        mip_gap=1e-7,
        use_classes=False,
        **OBJECTIVES[objective],
        **OPTION_SETS[option_set],
    )
    problem = PlanningProblem.create(fleet, TINY, job, options)
    truth = solve_exhaustively(problem)
    assert truth is not None
    plan = plan_round(fleet, TINY, job, options)
    assert plan.status in ("OPTIMAL", "FEASIBLE")
    coupled = option_set in ("server-link", "coverage", "dropping")
    expected = solver
    if solver == "auto":
        # participation floors alone: the sweep with an exact cover (not under min-time)
        floors = option_set == "dropping" and objective != "min-time"
        expected = "cover-sweep" if floors else ("highs" if coupled else "sweep")
    assert plan.solver == expected
    tol = max(plan.mip_gap or 0.0, 1e-6)
    assert close(plan.objective_value, truth.objective, tol), (plan.objective_value, truth)
    assert violations(plan, fleet, job, options) == []
