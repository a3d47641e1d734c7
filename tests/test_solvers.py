"""Conformance suite every MILP backend runs, status tables, time limits, infeasibility.

HiGHS (highspy, the default MILP backend) and PuLP are hard dependencies: these tests import
their libraries at module level so that they fail, never skip, when one is missing.
"""

from __future__ import annotations

import time

import highspy  # noqa: F401  (hard dependency of the default solver)
import pulp  # noqa: F401
import pytest
from ip_oracle import close, solve_exhaustively
from strategies import FLEET3, OBJECTIVES, TINY, program, random_fleet, tiny_job
from strategies import device_2gb as device

from legend.models.spec import get_model_spec
from legend.planner.api import (
    DEFAULT_SOLVER,
    SOLVERS,
    PlannerOptions,
    PlanningProblem,
    SolverOutcome,
    make_plan,
    plan_round,
)
from legend.planner.backends import (
    BACKENDS,
    CVXPY_STATUS,
    HIGHS_STATUS,
    PULP_STATUS,
    satisfies,
    solve_milp,
)
from legend.planner.errors import InfeasibleError, PlannerError, SolverError
from legend.planner.plan import STATUSES, validate_plan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams

FLEET = FLEET3


def test_default_solver_is_registered_and_exact() -> None:
    assert DEFAULT_SOLVER == "auto" and DEFAULT_SOLVER in SOLVERS
    assert set(BACKENDS) <= set(SOLVERS)
    plan = plan_round(FLEET, TINY, tiny_job())
    # no coupling row: the sweep solves it, exactly
    assert plan.solver == "sweep" and plan.status == "OPTIMAL" and plan.mip_gap == 0.0
    coupled = plan_round(FLEET, TINY, tiny_job(), PlannerOptions(server_mbps=20.0))
    assert coupled.solver == "highs" and coupled.status == "OPTIMAL"


# -- conformance: every backend, every objective --------------------------------------------


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_conformance(backend: str, objective: str) -> None:
    job = tiny_job()
    options = PlannerOptions(solver=backend, mip_gap=1e-6, **OBJECTIVES[objective])
    truth = solve_exhaustively(PlanningProblem.create(FLEET, TINY, job, options))
    assert truth is not None
    plan = plan_round(FLEET, TINY, job, options)
    assert plan.status == "OPTIMAL"
    assert plan.solver == backend and plan.solver_version
    assert plan.mip_gap is not None and 0 <= plan.mip_gap <= 1e-6 + 1e-9
    assert close(plan.objective_value, truth.objective, max(plan.mip_gap, 1e-6))
    assert validate_plan(plan, FLEET, TINY, job, deadline_s=options.deadline_s) == []


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_backends_agree_within_reported_gap(objective: str) -> None:
    job = tiny_job((2, 4, 8, 16))
    spec = get_model_spec("tiny-llama")
    fleet = Fleet(devices=(*FLEET.devices, device("extra", tflops=0.2, num_samples=80)))
    plans = {
        b: plan_round(
            fleet,
            spec,
            job,
            PlannerOptions(solver=b, mip_gap=1e-3, server_mbps=20.0, **OBJECTIVES[objective]),
        )
        for b in BACKENDS
    }
    values = [p.objective_value for p in plans.values()]
    worst_gap = max(p.mip_gap or 0.0 for p in plans.values())
    assert max(values) - min(values) <= (worst_gap + 1e-6) * max(abs(v) for v in values)
    for p in plans.values():
        assert validate_plan(p, fleet, spec, job, server_mbps=20.0) == []


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_reports_infeasible_program(backend: str) -> None:
    """A program that no plan satisfies (the server link cannot carry even the smallest
    configurations within the deadline) reads back INFEASIBLE from every solver."""
    options = PlannerOptions(objective="deadline", deadline_s=0.06, server_mbps=0.01)
    problem = PlanningProblem.create(FLEET, TINY, tiny_job(), options)
    milp = program(problem, 0.06)
    res = solve_milp(milp, backend, time_limit_s=30.0)
    assert res.status == "INFEASIBLE"
    assert res.values is None
    with pytest.raises(InfeasibleError, match="server link"):
        plan_round(FLEET, TINY, tiny_job(), options.with_(solver=backend))


# -- status tables ------------------------------------------------------------------------


def test_status_tables_map_to_our_statuses() -> None:
    assert set(PULP_STATUS.values()) <= set(STATUSES)
    assert set(CVXPY_STATUS.values()) <= set(STATUSES)
    assert set(HIGHS_STATUS.values()) <= set(STATUSES)
    assert HIGHS_STATUS["kTimeLimit"] == "FEASIBLE"  # NOT_SOLVED when it has no incumbent
    # PuLP says "Optimal" (status 1) after a time-limit stop; sol_status 2 tells the truth.
    assert PULP_STATUS[(1, 1)] == "OPTIMAL"
    assert PULP_STATUS[(1, 2)] == "FEASIBLE"
    assert PULP_STATUS[(-1, -1)] == "INFEASIBLE"
    assert PULP_STATUS[(0, 0)] == "NOT_SOLVED"
    # CBC's "Infeasible" after a time-limit stop in preprocessing carries no solution status
    assert PULP_STATUS[(-1, 0)] == "NOT_SOLVED"
    assert CVXPY_STATUS["user_limit"] == "FEASIBLE"
    assert CVXPY_STATUS["infeasible"] == "INFEASIBLE"
    assert CVXPY_STATUS["solver_error"] == "ERROR"


# -- time limits --------------------------------------------------------------------------


def large_distinct_fleet(n: int) -> Fleet:
    devices = []
    for i in range(n):
        devices.append(
            DeviceProfile(
                device_id=f"d{i}",
                tflops=0.5 + 0.37 * (i % 17),
                memory_gb=6.0 + 0.9 * (i % 13),
                uplink_mbps=5.0 + 3.1 * (i % 11),
                downlink_mbps=20.0 + 7.0 * (i % 7),
                num_samples=100 + 37 * (i % 19),
            )
        )
    return Fleet(devices=tuple(devices))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_time_limit_is_honoured(backend: str) -> None:
    """A per-device program with thousands of columns, coupled by the server link, and a
    0.2 s limit stops: it returns a FEASIBLE plan with its proven gap, an OPTIMAL one, or
    raises SolverError."""
    spec = get_model_spec("roberta-large")
    job = JobParams(ranks=(2, 4, 8, 16, 32))
    fleet = large_distinct_fleet(30)
    options = PlannerOptions(
        solver=backend, time_limit_s=0.2, use_classes=False, mip_gap=0.0, server_mbps=50.0
    )
    start = time.perf_counter()
    try:
        plan = plan_round(fleet, spec, job, options)
    except SolverError as exc:
        assert "time limit" in str(exc)
    else:
        assert plan.status in ("OPTIMAL", "FEASIBLE")
        if plan.status == "FEASIBLE":
            assert plan.mip_gap is None or plan.mip_gap >= 0
        assert validate_plan(plan, fleet, spec, job, server_mbps=50.0) == []
    # formulation and translation are outside the solver's clock; the solve itself stops
    assert time.perf_counter() - start < 30.0


def test_time_limit_stop_with_warm_start_reports_feasible_and_gap() -> None:
    """Warm-started from last round's plan (every device at its smallest configuration), a
    hard per-device program stopped after 0.2 s returns FEASIBLE (PuLP itself says "Optimal")
    with the incumbent at least as good as the start and a gap read from the solver's bound
    (``None`` only when the solver had proven no bound yet), never a silent 0."""
    spec = get_model_spec("roberta-large")
    job = JobParams(ranks=(2, 4, 8, 16, 32))
    fleet = large_distinct_fleet(40)
    options = PlannerOptions(objective="deadline", deadline_s=30.0, server_mbps=200.0)
    L = spec.num_layers
    smallest = tuple(((L - 1,), (2,)) for _ in fleet.devices)
    base = PlanningProblem.create(fleet, spec, job, options)
    last = make_plan(base, SolverOutcome(configurations=smallest, status="FEASIBLE", solver="test"))
    problem = PlanningProblem.create(fleet, spec, job, options, warm_start=last)
    milp = program(problem, 30.0)
    assert milp.start is not None and satisfies(milp, milp.start)
    start_value = float(milp.objective @ milp.start)
    for backend in ("highs", "pulp-highs", "pulp-cbc"):
        res = solve_milp(milp, backend, time_limit_s=0.2, mip_gap=0.0)
        if backend == "pulp-cbc" and res.status == "NOT_SOLVED":
            # CBC 2.10.3 may give up in preprocessing at such a short limit, or crash with a
            # MIP start (the adapter then retries without it): inconclusive, never wrong.
            assert res.values is None and res.objective is None
            continue
        assert res.status in ("OPTIMAL", "FEASIBLE"), res.native_status
        assert res.objective is not None and res.objective >= start_value - 1e-6
        if res.status == "FEASIBLE":
            assert res.gap is None or res.gap > 0
        else:
            assert res.gap is not None and res.gap <= 1e-6


# -- infeasibility diagnosis --------------------------------------------------------------


def test_memory_block_names_device_need_and_shortfall() -> None:
    fleet = Fleet(devices=(FLEET.devices[0], device("phone-3", memory_gb=0.01)))
    with pytest.raises(InfeasibleError) as info:
        plan_round(fleet, TINY, tiny_job())
    (reason,) = info.value.reasons
    assert reason.startswith("device 'phone-3': memory: smallest configuration needs ")
    assert "device has 0.01 GB (short by " in reason
    assert info.value.exit_code == 3
    assert isinstance(info.value, PlannerError)


def test_deadline_block_names_device_and_excess() -> None:
    options = PlannerOptions(objective="deadline", deadline_s=0.001)
    with pytest.raises(InfeasibleError) as info:
        plan_round(FLEET, TINY, tiny_job(), options)
    assert len(info.value.reasons) == 3
    assert all(": deadline: smallest configuration takes " in r for r in info.value.reasons)
    assert "device 'slow'" in str(info.value) and "(over by " in str(info.value)


def test_dropping_leaves_blocked_devices_out_instead_of_failing() -> None:
    fleet = Fleet(devices=(FLEET.devices[0], device("phone-3", memory_gb=0.01)))
    plan = plan_round(fleet, TINY, tiny_job(), PlannerOptions(allow_dropping=True))
    assert plan.device("phone-3").layers == ()
    assert plan.device("fast").layers
    with pytest.raises(InfeasibleError, match="min participants: only 1 device"):
        plan_round(
            fleet,
            TINY,
            tiny_job(),
            PlannerOptions(allow_dropping=True, min_participants=2),
        )


def test_coverage_infeasibility_is_explained() -> None:
    # Under this deadline the slow device (most samples) cannot reach depth 3.
    options = PlannerOptions(
        objective="deadline", deadline_s=0.03, coverage_layers=4, coverage_share=0.9
    )
    with pytest.raises(InfeasibleError, match="coverage: devices holding"):
        plan_round(FLEET, TINY, tiny_job(), options)


def test_utility_floor_infeasibility_is_explained() -> None:
    options = PlannerOptions(objective="min-time", utility_floor=1e12)
    with pytest.raises(InfeasibleError, match="utility floor: 1e\\+12 exceeds the highest"):
        plan_round(FLEET, TINY, tiny_job(), options)


def test_highs_stops_near_its_time_limit_on_the_contended_per_device_program() -> None:
    """The per-device program of 30 phones behind one access point, objective min-time: the
    case where HiGHS once ran far past its limit. It now returns (a plan, or SolverError)
    within the limit plus the cancellation grace and the formulation."""
    from pathlib import Path

    from legend.planner.backends import OVERRUN_GRACE_S
    from legend.planner.profiles import load_fleet
    from legend.planner.topology import load_topology

    root = Path(__file__).resolve().parents[1]
    fleet = load_fleet(root / "examples/fleet_ap30.csv")
    topo = load_topology(root / "examples/topology_ap30.toml", fleet)
    spec = get_model_spec("all-MiniLM-L6-v2")
    options = PlannerOptions(
        objective="min-time", solver="highs", time_limit_s=1.0, use_classes=False, mip_gap=0.0
    )
    start = time.perf_counter()
    try:
        plan = plan_round(fleet, spec, JobParams(), options, topology=topo)
    except SolverError as exc:
        assert "time limit" in str(exc)
    else:
        assert plan.status in ("OPTIMAL", "FEASIBLE")
        assert validate_plan(plan, fleet, spec, JobParams(), topology=topo) == []
    assert time.perf_counter() - start < 1.0 + OVERRUN_GRACE_S + 8.0


def test_time_limit_before_the_first_solve_keeps_the_warm_start() -> None:
    """When the time runs out before the MILP could improve on its warm start (the plan
    without coupling rows, when it satisfies them), that plan is returned as FEASIBLE with no
    proven gap, never an error and never a silent OPTIMAL."""
    options = PlannerOptions(server_mbps=20.0, solver="highs", time_limit_s=1e-6)
    plan = plan_round(FLEET, TINY, tiny_job(), options)
    assert plan.status == "FEASIBLE" and plan.mip_gap is None
    assert validate_plan(plan, FLEET, TINY, tiny_job(), server_mbps=20.0) == []
    free = plan_round(FLEET, TINY, tiny_job())
    assert [d.ranks for d in plan.devices] == [d.ranks for d in free.devices]


def test_lagrangian_without_any_column_within_the_deadline_is_infeasible() -> None:
    """No device finishes anything within the deadline: a clear InfeasibleError, not a
    crash of the bound's arrays."""
    options = PlannerOptions(
        solver="lagrangian",
        objective="deadline",
        deadline_s=1e-9,
        server_mbps=20.0,
        allow_dropping=True,
    )
    with pytest.raises(InfeasibleError, match="no plan"):
        plan_round(FLEET, TINY, tiny_job(), options)


def test_auto_plans_a_large_coupled_progress_fleet_with_a_proven_gap() -> None:
    """Past LAGRANGIAN_MIN_DEVICES, ``auto`` plans coupled ``progress`` programs with the
    Lagrangian planner: a plan that meets every row, with a proven bound that the MILP's
    plan does not exceed and that is not below the MILP's bound by more than its gap."""
    from legend.planner.solvers import LAGRANGIAN_MIN_DEVICES

    fleet = random_fleet(
        LAGRANGIAN_MIN_DEVICES + 10,
        3,
        device,
        tflops=(0.005, 0.05),
        uplink_mbps=(0.5, 5.0),
        downlink_mbps=(2.0, 20.0),
        num_samples=(10, 100),
    )
    job = tiny_job()
    rows = {"server_mbps": 20.0, "coverage_layers": 2, "coverage_share": 0.5}
    options = PlannerOptions(
        objective="progress", seconds_per_mb=0.5, server_overhead_s=0.05, **rows
    )
    plan = plan_round(fleet, TINY, job, options)
    milp = plan_round(fleet, TINY, job, options.with_(solver="highs"))
    assert plan.solver == "lagrangian" and plan.objective_bound is not None
    assert plan.mip_gap is not None and plan.mip_gap <= 1e-3
    assert validate_plan(plan, fleet, TINY, job, server_mbps=20.0) == []
    pairs = list(zip(fleet.devices, plan.devices, strict=True))
    covered = sum(d.num_samples for d, p in pairs if p.depth >= 2)
    assert covered >= 0.5 * sum(d.num_samples for d in fleet.devices) * (1 - 1e-9)
    assert milp.objective_value <= plan.objective_bound * (1 + 1e-9)
    assert milp.objective_bound is not None
    assert plan.objective_value <= milp.objective_bound * (1 + 1e-9)


@pytest.mark.parametrize("solver", ["auto", "lagrangian", "pulp-cbc", "greedy", "brute-force"])
def test_min_sample_share_keeps_the_data_rich_slow_device(solver: str) -> None:
    """C9s: free to drop, every solver leaves the slow device (62.5% of the samples) out of
    a rate-optimal round; asked for half of the samples, it must take it in."""
    free = plan_round(
        FLEET,
        TINY,
        tiny_job(),
        PlannerOptions(objective="rate", allow_dropping=True, solver=solver),
    )
    assert not free.device("slow").participates
    options = PlannerOptions(
        objective="rate", allow_dropping=True, min_sample_share=0.5, solver=solver
    )
    plan = plan_round(FLEET, TINY, tiny_job(), options)
    assert plan.device("slow").participates
    held = sum(d.num_samples for d in FLEET.devices if plan.device(d.device_id).participates)
    assert held >= 0.5 * sum(d.num_samples for d in FLEET.devices)
    assert plan.round_time_s > free.round_time_s


def test_min_sample_share_infeasibility_is_explained() -> None:
    # with memory for nobody but 'fast' (25% of the samples), half cannot take part
    fleet = Fleet(
        devices=(
            FLEET.devices[0],
            device("slow", memory_gb=0.01, num_samples=300),
            device("mid", memory_gb=0.01, num_samples=60),
        )
    )
    options = PlannerOptions(allow_dropping=True, min_sample_share=0.5)
    for solver in ("auto", "greedy"):
        with pytest.raises(InfeasibleError, match=r"min sample share: .* hold 25\.0% of the"):
            plan_round(fleet, TINY, tiny_job(), options.with_(solver=solver))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"min_sample_share": 0.5}, "only applies with `allow_dropping` = true"),
        ({"allow_dropping": True, "min_sample_share": 1.5}, r"must be in \[0, 1\], got 1\.5"),
        ({"allow_dropping": True, "min_sample_share": float("nan")}, "must be in"),
    ],
)
def test_min_sample_share_is_checked(fields: dict[str, object], match: str) -> None:
    with pytest.raises(PlannerError, match=match):
        PlannerOptions(**fields)  # type: ignore[arg-type]


def test_highs_solves_after_the_thread_count_changes() -> None:
    """HiGHS keeps one scheduler per process, sized by the first solve; a later solve with
    another ``threads`` used to come back NOT_SOLVED (kNotset). Both the worker and the
    in-process path must solve every time."""
    from legend.planner.backends import SolveLimits, _highs_here

    milp = program(PlanningProblem.create(FLEET, TINY, tiny_job(), PlannerOptions()), 0.05)
    for threads in (None, 1, None, 2, 1):
        assert solve_milp(milp, "highs", threads=threads).status == "OPTIMAL", threads
        limits = SolveLimits(time_limit_s=30.0, mip_gap=1e-4, threads=threads)
        assert _highs_here(milp, limits).status == "OPTIMAL", threads
