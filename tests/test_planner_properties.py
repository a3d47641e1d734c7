"""Properties every planner backend must have, on fleets built by construction.

Backends: the three exact IP backends, the greedy and the brute-force oracle, all through
the public :func:`~legend.planner.api.plan_round`. Instances are tiny (tiny-bert, 1-3
devices, 2-3 ranks) so that the oracle can enumerate them.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from ip_oracle import close, solve_exhaustively
from strategies import TINY, device, fleets, objectives, rank_grids, tiny_job, violations

from legend.planner.api import (
    PlannerOptions,
    PlanningProblem,
    SolverOutcome,
    make_plan,
    plan_round,
)
from legend.planner.errors import InfeasibleError, PlannerInputError, SolverError
from legend.planner.plan import Plan, validate_plan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams

IP_BACKENDS = ("auto", "highs", "pulp-highs", "pulp-cbc", "cvxpy-highs")
ALL_BACKENDS = (*IP_BACKENDS, "greedy", "brute-force")
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def smallest_time(fleet: Fleet, job: JobParams) -> float:
    """The round time below which some device cannot run its smallest configuration."""
    problem = PlanningProblem.create(fleet, TINY, job)
    L = TINY.num_layers
    return max(problem.costs.evaluate(d, (L - 1,), (job.ranks[0],)).time_s for d in fleet.devices)


def options_for(
    objective: str, fleet: Fleet, job: JobParams, slack: float, **kw: object
) -> PlannerOptions:
    deadline = smallest_time(fleet, job) * slack if objective == "deadline" else None
    return PlannerOptions(objective=objective, deadline_s=deadline, **kw)  # type: ignore[arg-type]


def solve(fleet: Fleet, job: JobParams, options: PlannerOptions, solver: str) -> Plan:
    return plan_round(fleet, TINY, job, options.with_(solver=solver))


def tolerance(plan: Plan) -> float:
    return (plan.mip_gap or 0.0) + 1e-6


@st.composite
def instances(draw: st.DrawFn, max_size: int = 3):  # type: ignore[no-untyped-def]
    ranks = draw(rank_grids)
    job = tiny_job(ranks=ranks)
    fleet = draw(fleets(job=job, max_size=max_size))
    objective = draw(objectives)
    slack = draw(st.floats(min_value=1.0, max_value=4.0))
    return fleet, job, objective, slack


@st.composite
def constraint_options(draw: st.DrawFn) -> dict[str, object]:
    """The optional constraints: C3 minimum depth, C4, dropping with C9 and C9s, C7 and C8."""
    dropping = draw(st.booleans())
    # 1 layer would constrain nothing (every participant trains the output layer): refused
    coverage_layers = draw(st.sampled_from([0, *range(2, TINY.num_layers + 1)]))
    return {
        "monotone_ranks": draw(st.booleans()),
        "min_depth": draw(st.integers(min_value=1, max_value=2)),
        "allow_dropping": dropping,
        "min_participants": draw(st.integers(min_value=0, max_value=2)) if dropping else 0,
        "min_sample_share": draw(st.sampled_from([0.0, 0.5, 0.9])) if dropping else 0.0,
        "server_mbps": draw(st.sampled_from([None, None, 0.05, 0.2, 1.0, 5.0])),
        "coverage_layers": coverage_layers,
        "coverage_share": draw(st.sampled_from([0.0, 0.3, 0.8])) if coverage_layers else 0.0,
    }


def _outcome(fleet: Fleet, job: JobParams, options: PlannerOptions, solver: str):  # type: ignore[no-untyped-def]
    """The plan, or ``None`` when there is none. A plan in which nobody trains (which an
    IP backend may return when dropping is allowed) counts as none. Instances too large for
    the enumerating oracle are not drawn again."""
    try:
        plan = solve(fleet, job, options, solver)
    except InfeasibleError:
        return None
    except PlannerInputError as exc:
        assume("would enumerate" not in str(exc))
        raise
    return plan if plan.participants else None


@SETTINGS
@given(instance=instances(), solver=st.sampled_from(ALL_BACKENDS))
def test_every_plan_validates(instance, solver: str) -> None:  # type: ignore[no-untyped-def]
    fleet, job, objective, slack = instance
    options = options_for(objective, fleet, job, slack)
    plan = solve(fleet, job, options, solver)
    assert plan.status in ("OPTIMAL", "FEASIBLE")
    assert validate_plan(plan, fleet, TINY, job, deadline_s=options.deadline_s) == []
    assert [d.device_id for d in plan.devices] == list(fleet.device_ids)


@SETTINGS
@given(instance=instances(), solver=st.sampled_from(ALL_BACKENDS), extra=constraint_options())
def test_every_plan_meets_the_optional_constraints(instance, solver: str, extra) -> None:  # type: ignore[no-untyped-def]
    fleet, job, objective, slack = instance
    extra = {**extra, "min_participants": min(extra["min_participants"], len(fleet))}
    options = options_for(objective, fleet, job, slack, **extra)
    told, plan = _told_outcome(fleet, job, options, solver)
    if not told or plan is None:
        return  # the constraints admit no plan (checked against the oracle elsewhere)
    _assert_rows_hold(plan, fleet, job, options)


def _assert_rows_hold(plan: Plan, fleet: Fleet, job: JobParams, options: PlannerOptions) -> None:
    """``plan`` meets every row ``options`` sets: :func:`validate_plan`'s, the participant
    minimum and coverage."""
    assert violations(plan, fleet, job, options) == []
    participants = [d for d in plan.devices if d.participates]
    assert len(participants) >= max(1, options.min_participants)
    if options.min_sample_share:
        samples = {d.device_id: d.num_samples for d in fleet.devices}
        held = sum(samples[d.device_id] for d in participants)
        assert held >= options.min_sample_share * sum(samples.values()) * (1 - 1e-9)
    if options.coverage_layers and options.coverage_share:
        samples = {d.device_id: d.num_samples for d in fleet.devices}
        total = sum(samples[d.device_id] for d in participants)
        covered = sum(
            samples[d.device_id] for d in participants if d.depth >= options.coverage_layers
        )
        assert covered >= options.coverage_share * total * (1 - 1e-9)


def _told_outcome(fleet: Fleet, job: JobParams, options: PlannerOptions, solver: str):  # type: ignore[no-untyped-def]
    """``(True, plan or None)`` as :func:`_outcome`, or ``(False, None)`` where the solver
    could not tell. CBC may stop with "infeasible" after preprocessing without proving it;
    the backend then reports a solver failure rather than infeasibility. Accept that only
    from CBC, and only where the oracle agrees that no plan exists."""
    try:
        return True, _outcome(fleet, job, options, solver)
    except SolverError:
        assert solver == "pulp-cbc", f"{solver} failed"
        assert _outcome(fleet, job, options, "brute-force") is None
        return False, None


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    instance=instances(),
    share=st.floats(min_value=0.1, max_value=1.0),
    extra=st.one_of(st.just({}), constraint_options()),
)
def test_ip_backends_agree_with_the_oracle(instance, share: float, extra) -> None:  # type: ignore[no-untyped-def]
    fleet, job, objective, slack = instance
    if extra.get("min_participants", 0) > len(fleet):
        extra = {**extra, "min_participants": len(fleet)}
    options = options_for(objective, fleet, job, slack, utility_floor_share=share, **extra)
    exact = _outcome(fleet, job, options, "brute-force")
    for backend in IP_BACKENDS:
        told, plan = _told_outcome(fleet, job, options, backend)
        if not told:
            continue
        if exact is None:
            assert plan is None, f"{backend} found a plan the oracle says cannot exist"
            continue
        assert plan is not None, f"{backend} found no plan; the oracle found one"
        assert plan.status in ("OPTIMAL", "FEASIBLE")
        tol = tolerance(plan)
        if objective == "min-time":
            # Minimisation: never below the optimum, within the gap above it.
            assert plan.objective_value >= exact.objective_value * (1 - 1e-6)
            assert plan.objective_value <= exact.objective_value * (1 + tol)
        else:
            assert plan.objective_value <= exact.objective_value * (1 + 1e-6)
            assert plan.objective_value >= exact.objective_value * (1 - tol)


@SETTINGS
@given(instance=instances(max_size=5), share=st.floats(min_value=0.1, max_value=1.0))
def test_ip_is_never_worse_than_the_greedy(instance, share: float) -> None:  # type: ignore[no-untyped-def]
    fleet, job, objective, slack = instance
    options = options_for(objective, fleet, job, slack)
    if objective == "min-time":
        # An absolute floor the greedy reaches, so both solve the same problem.
        reach = solve(
            fleet, job, PlannerOptions(objective="deadline", deadline_s=1e9), "greedy"
        ).utility
        options = options.with_(utility_floor=share * reach)
    greedy = solve(fleet, job, options, "greedy")
    exact = solve(fleet, job, options, "auto")
    tol = tolerance(exact)
    if objective == "min-time":
        assert exact.objective_value <= greedy.objective_value * (1 + tol)
    else:
        assert exact.objective_value >= greedy.objective_value * (1 - tol)


def _scaled(fleet: Fleet, index: int, **factors: float) -> Fleet:
    devices = list(fleet.devices)
    d = devices[index].to_dict()
    for name, factor in factors.items():
        d[name] = d[name] * factor
    devices[index] = DeviceProfile(**d)
    return Fleet(devices=tuple(devices))


@SETTINGS
@given(
    instance=instances(),
    data=st.data(),
    resource=st.sampled_from(["memory_gb", "uplink_mbps", "downlink_mbps", "tflops"]),
    factor=st.floats(min_value=1.0, max_value=10.0),
)
def test_more_resources_never_lower_the_optimum(
    instance, data, resource: str, factor: float
) -> None:  # type: ignore[no-untyped-def]
    fleet, job, objective, slack = instance
    index = data.draw(st.integers(min_value=0, max_value=len(fleet) - 1))
    options = options_for(objective, fleet, job, slack)
    if objective == "min-time":
        reach = solve(
            fleet, job, PlannerOptions(objective="deadline", deadline_s=1e9), "brute-force"
        ).utility
        options = options.with_(utility_floor=0.5 * reach)
    richer = _scaled(fleet, index, **{resource: factor})
    before = solve(fleet, job, options, "brute-force")
    after = solve(richer, job, options, "brute-force")
    if objective == "min-time":
        assert after.objective_value <= before.objective_value * (1 + 1e-9)
    else:
        assert after.objective_value >= before.objective_value * (1 - 1e-9)


@SETTINGS
@given(
    instance=instances(),
    solver=st.sampled_from(("greedy", "brute-force", "pulp-highs")),
    perm_seed=st.randoms(use_true_random=False),
)
def test_permuting_devices_permutes_the_plan(instance, solver: str, perm_seed) -> None:  # type: ignore[no-untyped-def]
    fleet, job, objective, slack = instance
    order = list(range(len(fleet)))
    perm_seed.shuffle(order)
    permuted = Fleet(devices=tuple(fleet.devices[i] for i in order))
    options = options_for(objective, fleet, job, slack)
    plan = solve(fleet, job, options, solver)
    other = solve(permuted, job, options, solver)
    tol = tolerance(plan) + tolerance(other)
    assert math.isclose(plan.objective_value, other.objective_value, rel_tol=tol)
    back = {dp.device_id: (dp.layers, dp.ranks) for dp in other.devices}
    configs = tuple(back[d.device_id] for d in fleet.devices)
    if solver == "greedy":
        # Deterministic per device: exactly the same configurations, permuted.
        assert configs == tuple((dp.layers, dp.ranks) for dp in plan.devices)
    else:
        # Exact solvers may break ties differently: the permuted plan, put back in the
        # original order, must be an equally good valid plan of the original problem (so
        # when the optimum is unique it is the same plan).
        problem = PlanningProblem.create(fleet, TINY, job, options.with_(solver=solver))
        outcome = SolverOutcome(configurations=configs, status="OPTIMAL", solver=solver)
        restored = make_plan(problem, outcome)
        assert validate_plan(restored, fleet, TINY, job, deadline_s=options.deadline_s) == []
        assert math.isclose(restored.objective_value, plan.objective_value, rel_tol=tol)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fleet=fleets(job=tiny_job(), max_size=3, feasible=False),
    solver=st.sampled_from(ALL_BACKENDS),
    objective=st.sampled_from(["rate", "min-time"]),
)
def test_infeasible_fleets_are_explained_per_device(
    fleet: Fleet, solver: str, objective: str
) -> None:
    job = tiny_job()
    blocked = [
        d.device_id
        for d in fleet.devices
        if d.memory_gb * 1e9
        < PlanningProblem.create(fleet, TINY, job)
        .costs.evaluate(d, (TINY.num_layers - 1,), (job.ranks[0],))
        .memory_bytes
    ]
    assert blocked
    with pytest.raises(InfeasibleError) as info:
        solve(fleet, job, PlannerOptions(objective=objective), solver)
    message = str(info.value)
    for device_id in blocked:
        assert repr(device_id) in message
    assert "memory" in message and "short by" in message
    assert info.value.exit_code == 3


# -- known answers at the edges ----------------------------------------------------------


def _edge_fleet(memory_gb: float, n: int = 2) -> Fleet:
    slow = {"tflops": 0.005, "uplink_mbps": 0.5, "downlink_mbps": 2.0, "num_samples": 10}
    return Fleet(devices=tuple(device(f"dev-{i}", memory_gb=memory_gb, **slow) for i in range(n)))


@pytest.mark.parametrize("backend", IP_BACKENDS)
def test_memory_just_above_the_smallest_configuration(backend: str) -> None:
    """Memory 2.5 kB above the smallest configuration's need: only that configuration fits
    (the next rank needs 8 kB more), so the plan is known."""
    job = tiny_job(ranks=(2, 4))
    fleet = _edge_fleet(0.010379)
    expected = solve(fleet, job, PlannerOptions(), "brute-force")
    assert [(d.layers, d.ranks) for d in expected.devices] == [((3,), (2,))] * 2
    plan = solve(fleet, job, PlannerOptions(), backend)
    assert [(d.layers, d.ranks) for d in plan.devices] == [((3,), (2,))] * 2


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_deadline_equal_to_the_smallest_configuration_time(backend: str) -> None:
    """A deadline exactly at the slowest device's smallest configuration admits that plan."""
    job = tiny_job(ranks=(2, 4))
    slow = {"tflops": 0.005, "uplink_mbps": 1.0, "downlink_mbps": 10.0, "num_samples": 10}
    fleet = Fleet(
        devices=tuple(
            device(f"dev-{i}", memory_gb=0.015625, local_steps=1, **slow) for i in range(2)
        )
    )
    deadline = smallest_time(fleet, job)
    plan = solve(fleet, job, PlannerOptions(objective="deadline", deadline_s=deadline), backend)
    assert [(d.layers, d.ranks) for d in plan.devices] == [((3,), (2,))] * 2


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nobody_able_to_train_is_explained_not_a_crash(backend: str) -> None:
    """With dropping allowed, a server link and a minimum depth nobody can reach within the
    deadline, the answer is "no plan" naming the device (or a plan in which nobody trains),
    never a solver failure."""
    job = tiny_job(ranks=(2, 4))
    fleet = _edge_fleet(0.015625, n=1)
    deadline = smallest_time(fleet, job)  # one layer fits, two do not
    options = PlannerOptions(
        objective="deadline",
        deadline_s=deadline,
        min_depth=2,
        allow_dropping=True,
        server_mbps=0.05,
    )
    try:
        plan = solve(fleet, job, options, backend)
    except InfeasibleError as exc:
        assert "dev-0" in str(exc)
    else:
        assert not plan.participants


@SETTINGS
@given(
    instance=instances(max_size=4),
    extra=constraint_options(),
    objective=st.sampled_from(["progress", "rate", "deadline"]),
)
def test_lagrangian_bound_holds_and_plan_is_within_its_gap(instance, extra, objective) -> None:  # type: ignore[no-untyped-def]
    """The Lagrangian planner's bound is never below the true optimum (the oracle), its plan
    never above it, the reported gap relates the two, and every plan validates."""
    fleet, job, _objective, slack = instance
    if extra.get("min_participants", 0) > len(fleet):
        extra = {**extra, "min_participants": len(fleet)}
    options = options_for(objective, fleet, job, slack, **extra)
    exact = _outcome(fleet, job, options, "brute-force")
    try:
        plan = _outcome(fleet, job, options, "lagrangian")
    except InfeasibleError:
        plan = None
    if exact is None:
        assert plan is None
        return
    if plan is None:
        # the repair may fail to find a plan on a tiny, tight instance; never a wrong one
        return
    assert plan.solver == "lagrangian"
    _assert_bounded(plan, exact.objective_value)
    assert violations(plan, fleet, job, options) == []


def _assert_bounded(plan: Plan, optimum: float) -> None:
    """A maximising plan is never above ``optimum``, its proven bound never below, and its
    reported gap relates the two."""
    assert plan.objective_bound is not None
    assert plan.objective_value <= optimum * (1 + 1e-6)
    assert plan.objective_bound >= optimum * (1 - 1e-6)
    if plan.mip_gap is not None:
        assert plan.objective_value * (1 + plan.mip_gap) >= plan.objective_bound * (1 - 1e-6)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    instance=instances(max_size=4),
    extra=constraint_options(),
    seconds_per_mb=st.sampled_from([0.0, 0.008, 0.5, 5.0, 50.0, 500.0]),
    overhead=st.sampled_from([0.0, 0.01, 0.1]),
)
def test_lagrangian_progress_agrees_with_the_oracles_and_the_milp(  # type: ignore[no-untyped-def]
    instance, extra, seconds_per_mb: float, overhead: float
) -> None:
    """Under ``progress`` with coupling rows (server link, coverage, participants) and the
    bytes priced, the Lagrangian planner's bound is never below the optimum both oracles
    enumerate, its plan never above it and meets every row, and the MILP on HiGHS and on
    PuLP finds the same optimum within its own proven gap."""
    fleet, job, _objective, _slack = instance
    extra = {**extra, "min_participants": min(extra["min_participants"], len(fleet))}
    options = PlannerOptions(
        objective="progress",
        seconds_per_mb=seconds_per_mb,
        server_overhead_s=overhead,
        **extra,  # type: ignore[arg-type]
    )
    exact = _outcome(fleet, job, options, "brute-force")
    truth = solve_exhaustively(PlanningProblem.create(fleet, TINY, job, options))
    if exact is None:
        assert truth is None
        assert _outcome(fleet, job, options, "lagrangian") is None
        return
    assert truth is not None and close(truth.objective, exact.objective_value, 1e-9)
    for backend in ("highs", "pulp-highs"):
        milp = _outcome(fleet, job, options, backend)
        assert milp is not None and milp.status in ("OPTIMAL", "FEASIBLE")
        assert milp.objective_value <= truth.objective * (1 + 1e-6)
        assert milp.objective_value >= truth.objective * (1 - tolerance(milp))
    plan = _outcome(fleet, job, options, "lagrangian")
    if plan is None:
        return  # the repair may fail to find a plan on a tiny, tight instance; never a wrong one
    assert plan.solver == "lagrangian"
    _assert_bounded(plan, truth.objective)
    _assert_rows_hold(plan, fleet, job, options)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    instance=instances(),
    seconds_per_mb=st.sampled_from([0.0, 0.5, 5.0, 50.0, 500.0]),
    overhead=st.sampled_from([0.0, 0.01, 0.1]),
    dropping=st.booleans(),
)
def test_priced_progress_sweep_and_milp_agree_with_the_oracle(  # type: ignore[no-untyped-def]
    instance, seconds_per_mb: float, overhead: float, dropping: bool
) -> None:
    """Under ``progress`` a device's best column depends on the ratio itself (its bytes are
    priced); the sweep's Dinkelbach steps and the MILP both reach the enumerated optimum."""
    fleet, job, _objective, _slack = instance
    options = PlannerOptions(
        objective="progress",
        seconds_per_mb=seconds_per_mb,
        server_overhead_s=overhead,
        allow_dropping=dropping,
    )
    exact = _outcome(fleet, job, options, "brute-force")
    for solver in ("sweep", "highs"):
        plan = _outcome(fleet, job, options, solver)
        if exact is None:
            assert plan is None
            continue
        assert plan is not None
        if solver == "sweep":
            assert plan.status == "OPTIMAL" and plan.mip_gap == 0.0
        assert plan.objective_value <= exact.objective_value * (1 + 1e-9)
        assert plan.objective_value >= exact.objective_value * (1 - tolerance(plan))
        assert validate_plan(plan, fleet, TINY, job, require_all=not dropping) == []
