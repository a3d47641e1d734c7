"""Exact solver backends for the planner's integer program.

Three backends translate the backend-neutral :class:`~legend.planner.formulation.MILP`:

=================  ==============================================================
``pulp-highs``     PuLP's in-process HiGHS interface (through ``highspy``)
``pulp-cbc``       PuLP's bundled CBC, run as a subprocess (``PULP_CBC_CMD``)
``cvxpy-highs``    CVXPY with its HiGHS interface
=================  ==============================================================

Each adapter only translates the program and reads back values, its native status (one
table per adapter maps it to ours: ``OPTIMAL, FEASIBLE, INFEASIBLE, UNBOUNDED, NOT_SOLVED,
ERROR``) and the best bound the solver proved, from which the relative MIP gap
``|bound - objective| / |objective|`` is computed. PuLP says "Optimal" after a time-limit
stop; its ``sol_status`` tells the truth (``LpSolutionIntegerFeasible``), so the tables key
on both. The objectives (O1, O2, O3 with Dinkelbach) are driven by :func:`solve_problem`,
shared by every backend.

O3 (``rate``, ``max U / T``) by Dinkelbach
------------------------------------------
Start at ``lambda_0 = 0``; at step ``k`` solve ``F(lambda_k) = max U - lambda_k T`` (a
MILP with ``T`` a variable), take its solution's ratio ``rho_k = U_k / T_k`` (``T_k`` the
round time the solution implies) and set ``lambda_{k+1} = rho_k``. ``F`` is convex,
decreasing and ``F(rho*) = 0``, so the ratios increase and reach the optimum ``rho*`` after
finitely many steps when the subproblems are solved exactly (the feasible set is finite);
in practice 3-6 steps. Every subproblem gets the relative gap ``mip_gap`` and the absolute
gap ``mip_gap * lambda_k * T_lb`` (``T_lb`` a proven lower bound on the round time), so
that a solver's bound ``F_ub >= F(lambda)`` proves, for every plan,
``U / T <= lambda + F_ub / T_lb``. Iteration stops when a step improves the ratio by less
than ``1e-9`` relative (then ``F_ub <= mip_gap lambda T_lb`` up to the solver's tolerance)
or at the time limit, and the reported gap is ``(lambda + F_ub / T_lb - rho) / rho`` from
the last step: a proven relative gap on the ratio, not an estimate.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any

import numpy as np

from legend.planner.api import Configuration, PlanningProblem, SolverOutcome, register_solver
from legend.planner.classes import (
    decoupled_best_rate,
    polish_configurations,
    resolve_use_classes,
)
from legend.planner.diagnose import blocked_devices, explain_infeasibility
from legend.planner.errors import InfeasibleError, SolverError
from legend.planner.formulation import MILP, decode, formulate, round_time_of

__all__ = [
    "BACKENDS",
    "CVXPY_STATUS",
    "PULP_STATUS",
    "MilpResult",
    "satisfies",
    "solve_milp",
    "solve_problem",
]

# Dinkelbach: stop when a step improves the ratio by less than this (relative).
DINKELBACH_RTOL = 1e-9
DINKELBACH_MAX_STEPS = 50


@dataclass(frozen=True, kw_only=True)
class MilpResult:
    """What a backend read back from its solver (objective and bound in the MILP's sense)."""

    status: str
    values: np.ndarray | None
    objective: float | None
    bound: float | None
    native_status: str
    solver_version: str

    @property
    def gap(self) -> float | None:
        return _rel_gap(self.objective, self.bound)


def _rel_gap(objective: float | None, bound: float | None) -> float | None:
    if objective is None or bound is None or not math.isfinite(bound):
        return None
    diff = abs(bound - objective)
    if diff <= 1e-9 * max(1.0, abs(objective)):
        return 0.0
    return diff / max(abs(objective), 1e-9)


# -- PuLP ----------------------------------------------------------------------------------

# (LpProblem.status, LpProblem.sol_status) -> ours. PuLP reports status 1 ("Optimal") after
# a time-limit stop with an incumbent; sol_status 2 (integer feasible) tells it apart.
PULP_STATUS: dict[tuple[int, int], str] = {
    (1, 1): "OPTIMAL",
    (1, 2): "FEASIBLE",
    (0, 2): "FEASIBLE",
    (1, 0): "NOT_SOLVED",
    (0, 0): "NOT_SOLVED",
    (-1, -1): "INFEASIBLE",
    # CBC 2.10 reports "Infeasible" when the time limit interrupts its preprocessing
    # ("Pre-processing says infeasible or unbounded") with no solution status: not a proof.
    (-1, 0): "NOT_SOLVED",
    (-2, -2): "UNBOUNDED",
    (-2, 0): "NOT_SOLVED",
    (-3, 0): "ERROR",
    (-3, -3): "ERROR",
}


def _pulp_status(status: int, sol_status: int) -> str:
    return PULP_STATUS.get((status, sol_status), "ERROR")


def _build_pulp(milp: MILP) -> tuple[Any, list[Any]]:
    import pulp

    sense = pulp.LpMaximize if milp.sense == "max" else pulp.LpMinimize
    prob = pulp.LpProblem("legend_plan", sense)
    variables = [
        pulp.LpVariable(
            f"v{j}",
            lowBound=float(milp.lower[j]),
            upBound=float(milp.upper[j]),
            cat=pulp.LpInteger if milp.integer[j] else pulp.LpContinuous,
        )
        for j in range(milp.num_vars)
    ]
    nz = np.flatnonzero(milp.objective)
    prob.setObjective(
        pulp.LpAffineExpression([(variables[j], float(milp.objective[j])) for j in nz])
    )
    A = milp.matrix
    for r, name in enumerate(milp.row_names):
        lo, hi = float(milp.row_lower[r]), float(milp.row_upper[r])
        start, end = A.indptr[r], A.indptr[r + 1]
        expr = pulp.LpAffineExpression(
            [
                (variables[c], float(v))
                for c, v in zip(A.indices[start:end], A.data[start:end], strict=True)
            ]
        )
        safe = re.sub(r"[^A-Za-z0-9]", "_", name)
        if lo == hi:
            prob.addConstraint(pulp.LpConstraint(expr, pulp.LpConstraintEQ, safe, lo))
            continue
        if math.isfinite(lo):
            prob.addConstraint(pulp.LpConstraint(expr, pulp.LpConstraintGE, safe + "_lo", lo))
        if math.isfinite(hi):
            prob.addConstraint(pulp.LpConstraint(expr, pulp.LpConstraintLE, safe, hi))
    return prob, variables


def _pulp_values(variables: list[Any]) -> np.ndarray:
    return np.asarray([v.varValue if v.varValue is not None else 0.0 for v in variables])


def _solve_pulp_cbc(
    milp: MILP,
    *,
    time_limit_s: float,
    mip_gap: float,
    abs_gap: float | None,
    threads: int | None,
) -> MilpResult:
    start = time.perf_counter()
    res = _solve_pulp_cbc_once(
        milp, time_limit_s=time_limit_s, mip_gap=mip_gap, abs_gap=abs_gap, threads=threads
    )
    left = time_limit_s - (time.perf_counter() - start)
    if res.status == "ERROR" and milp.start is not None:
        # The bundled CBC 2.10.3 can crash (SIGSEGV) when a MIP start meets a time limit
        # that interrupts its preprocessing; retry once without the start.
        res = _solve_pulp_cbc_once(
            replace(milp, start=None),
            time_limit_s=max(left, 0.01),
            mip_gap=mip_gap,
            abs_gap=abs_gap,
            threads=threads,
        )
        res = replace(res, native_status=res.native_status + " (retried without warm start)")
    return res


def _solve_pulp_cbc_once(
    milp: MILP,
    *,
    time_limit_s: float,
    mip_gap: float,
    abs_gap: float | None,
    threads: int | None,
) -> MilpResult:
    import pulp

    prob, variables = _build_pulp(milp)
    if milp.start is not None:
        for var, value in zip(variables, milp.start, strict=True):
            var.setInitialValue(float(value))
    fd, log_path = tempfile.mkstemp(prefix="legend-cbc-", suffix=".log")
    os.close(fd)
    try:
        solver = pulp.PULP_CBC_CMD(
            msg=False,
            timeLimit=max(time_limit_s, 0.01),
            gapRel=mip_gap,
            gapAbs=abs_gap,
            threads=threads,
            warmStart=milp.start is not None,
            logPath=log_path,
        )
        try:
            prob.solve(solver)
        except pulp.PulpSolverError as exc:
            with open(log_path, encoding="utf-8", errors="replace") as fh:
                log = fh.read()
            # CBC 2.10 gives up in preprocessing when the time limit interrupts it and
            # writes a solution file PuLP cannot read: inconclusive, not a failure.
            cut_short = "Pre-processing says infeasible" in log
            return MilpResult(
                status="NOT_SOLVED" if cut_short else "ERROR",
                values=None,
                objective=None,
                bound=None,
                native_status=str(exc).split(",")[0]
                + (" (preprocessing stopped: Pre-processing says infeasible)" if cut_short else ""),
                solver_version=f"pulp {pulp.__version__} / CBC",
            )
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            log = fh.read()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(log_path)
    status = _pulp_status(prob.status, prob.sol_status)
    version = re.search(r"Version:\s*(\S+)", log)
    result = re.search(r"Result - (.*)", log)
    native = f"{pulp.LpStatus[prob.status]} / sol_status {prob.sol_status}" + (
        f" ({result.group(1).strip()})" if result else ""
    )
    values = objective = bound = None
    if status in ("OPTIMAL", "FEASIBLE"):
        values = _pulp_values(variables)
        objective = float(milp.objective @ values)
        found = re.search(r"(?:Upper|Lower) bound:\s*(-?[\d.eE+-]+)", log)
        if found:
            bound = float(found.group(1))
        elif status == "OPTIMAL":
            # CBC prints no bound when it proves optimality; it stopped within its gap.
            within = "tolerance" in (result.group(1) if result else "")
            slack = max(mip_gap * abs(objective), abs_gap or 0.0) if within else 0.0
            bound = objective + slack if milp.sense == "max" else objective - slack
    return MilpResult(
        status=status,
        values=values,
        objective=objective,
        bound=bound,
        native_status=native,
        solver_version=f"pulp {pulp.__version__} / CBC {version.group(1) if version else '?'}",
    )


def _solve_pulp_highs(
    milp: MILP,
    *,
    time_limit_s: float,
    mip_gap: float,
    abs_gap: float | None,
    threads: int | None,
) -> MilpResult:
    import highspy
    import pulp

    start = milp.start

    class _HiGHS(pulp.HiGHS):  # type: ignore[misc,name-defined]
        """PuLP's in-process HiGHS plus a warm start (PuLP passes none to it)."""

        def callSolver(self, lp: Any) -> None:
            if start is not None:
                sol = highspy.HighsSolution()
                col = [0.0] * len(variables)
                for j, var in enumerate(variables):
                    col[var.index] = float(start[j])
                sol.col_value = col
                sol.value_valid = True
                lp.solverModel.setSolution(sol)
            super().callSolver(lp)

    prob, variables = _build_pulp(milp)
    solver = _HiGHS(
        msg=False,
        timeLimit=max(time_limit_s, 0.01),
        gapRel=mip_gap,
        gapAbs=abs_gap,
        threads=threads,
    )
    version = f"pulp {pulp.__version__} / HiGHS {_dist_version('highspy')}"
    try:
        prob.solve(solver)
    except Exception as exc:  # highspy raises plain exceptions on model errors
        return MilpResult(
            status="ERROR",
            values=None,
            objective=None,
            bound=None,
            native_status=f"{type(exc).__name__}: {exc}",
            solver_version=version,
        )
    highs = prob.solverModel
    status = _pulp_status(prob.status, prob.sol_status)
    native = f"{highs.getModelStatus().name} / sol_status {prob.sol_status}"
    values = objective = bound = None
    if status in ("OPTIMAL", "FEASIBLE"):
        values = _pulp_values(variables)
        objective = float(milp.objective @ values)
        dual = float(highs.getInfo().mip_dual_bound)
        # PuLP hands HiGHS the negated objective of a maximisation.
        bound = -dual if milp.sense == "max" else dual
    return MilpResult(
        status=status,
        values=values,
        objective=objective,
        bound=bound,
        native_status=native,
        solver_version=version,
    )


# -- CVXPY ---------------------------------------------------------------------------------

CVXPY_STATUS: dict[str, str] = {
    "optimal": "OPTIMAL",
    "optimal_inaccurate": "FEASIBLE",
    "user_limit": "FEASIBLE",  # a time-limit stop; NOT_SOLVED when it has no values
    "infeasible": "INFEASIBLE",
    "infeasible_inaccurate": "INFEASIBLE",
    "infeasible_or_unbounded": "INFEASIBLE",
    "unbounded": "UNBOUNDED",
    "unbounded_inaccurate": "UNBOUNDED",
    "solver_error": "ERROR",
}


def _solve_cvxpy_highs(
    milp: MILP,
    *,
    time_limit_s: float,
    mip_gap: float,
    abs_gap: float | None,
    threads: int | None,
) -> MilpResult:
    import cvxpy as cp

    version = f"cvxpy {cp.__version__} / HiGHS {_dist_version('highspy')}"
    ints = np.flatnonzero(milp.integer)
    conts = np.flatnonzero(~milp.integer)
    A = milp.matrix.tocsc()
    parts: list[tuple[Any, np.ndarray]] = []
    if len(ints):
        parts.append(
            (
                cp.Variable(len(ints), integer=True, bounds=[milp.lower[ints], milp.upper[ints]]),
                ints,
            )
        )
    if len(conts):
        parts.append(
            (cp.Variable(len(conts), bounds=[milp.lower[conts], milp.upper[conts]]), conts)
        )

    def affine(rows: np.ndarray) -> Any:
        return sum(A[rows][:, cols] @ var for var, cols in parts)

    lo, hi = milp.row_lower, milp.row_upper
    eq = np.flatnonzero(lo == hi)
    le = np.flatnonzero((lo != hi) & np.isfinite(hi))
    ge = np.flatnonzero((lo != hi) & np.isfinite(lo))
    constraints = []
    if len(eq):
        constraints.append(affine(eq) == lo[eq])
    if len(le):
        constraints.append(affine(le) <= hi[le])
    if len(ge):
        constraints.append(affine(ge) >= lo[ge])
    obj = sum(milp.objective[cols] @ var for var, cols in parts)
    problem = cp.Problem(cp.Maximize(obj) if milp.sense == "max" else cp.Minimize(obj), constraints)
    opts: dict[str, Any] = {"time_limit": max(time_limit_s, 0.01), "mip_rel_gap": mip_gap}
    if abs_gap is not None:
        opts["mip_abs_gap"] = abs_gap
    if threads is not None:
        opts["threads"] = threads
    try:
        problem.solve(solver=cp.HIGHS, **opts)
    except cp.error.SolverError as exc:
        return MilpResult(
            status="ERROR",
            values=None,
            objective=None,
            bound=None,
            native_status=str(exc),
            solver_version=version,
        )
    native = str(problem.status)
    status = CVXPY_STATUS.get(native, "ERROR")
    values = objective = bound = None
    if status in ("OPTIMAL", "FEASIBLE"):
        if any(var.value is None for var, _ in parts):
            status = "NOT_SOLVED"
        else:
            values = np.zeros(milp.num_vars)
            for var, cols in parts:
                values[cols] = np.asarray(var.value, dtype=float)
            objective = float(milp.objective @ values)
            info: Any = problem.solver_stats.extra_stats
            if info is not None and int(info.primal_solution_status) != 2:
                # kSolutionStatusFeasible == 2: HiGHS stopped without an incumbent.
                return MilpResult(
                    status="NOT_SOLVED",
                    values=None,
                    objective=None,
                    bound=None,
                    native_status=native + " (no incumbent)",
                    solver_version=version,
                )
            dual = float(info.mip_dual_bound) if info is not None else float("nan")
            if math.isfinite(dual):
                bound = -dual if milp.sense == "max" else dual
    return MilpResult(
        status=status,
        values=values,
        objective=objective,
        bound=bound,
        native_status=native,
        solver_version=version,
    )


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


Backend = Callable[..., MilpResult]
BACKENDS: dict[str, Backend] = {
    "pulp-highs": _solve_pulp_highs,
    "pulp-cbc": _solve_pulp_cbc,
    "cvxpy-highs": _solve_cvxpy_highs,
}


def solve_milp(
    milp: MILP,
    backend: str,
    *,
    time_limit_s: float = 60.0,
    mip_gap: float = 1e-4,
    abs_gap: float | None = None,
    threads: int | None = None,
) -> MilpResult:
    """Solve one program with one backend; never raises for solver outcomes.

    Values a solver returns are checked against the rows, bounds and integrality; a "solution"
    that violates them (e.g. a relaxation left behind by a time-limit stop) is NOT_SOLVED.
    """
    res = BACKENDS[backend](
        milp, time_limit_s=time_limit_s, mip_gap=mip_gap, abs_gap=abs_gap, threads=threads
    )
    if res.values is not None and not satisfies(milp, res.values):
        return replace(
            res,
            status="NOT_SOLVED",
            values=None,
            objective=None,
            bound=None,
            native_status=res.native_status + " (returned values violate the program)",
        )
    return res


def satisfies(milp: MILP, values: np.ndarray, tol: float = 1e-5) -> bool:
    """Whether ``values`` satisfy every row, bound and integrality of ``milp``."""
    v = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(v)):
        return False
    if np.any(v < milp.lower - tol) or np.any(v > milp.upper + tol):
        return False
    ints = v[milp.integer]
    if np.any(np.abs(ints - np.rint(ints)) > tol):
        return False
    act = milp.matrix @ v
    lo_ok = act >= milp.row_lower - tol * (1 + np.abs(milp.row_lower))
    hi_ok = act <= milp.row_upper + tol * (1 + np.abs(milp.row_upper))
    return bool(np.all(lo_ok & hi_ok))


# -- the objectives ------------------------------------------------------------------------


class _Clock:
    def __init__(self, limit_s: float) -> None:
        self.end = time.perf_counter() + limit_s
        self.limit_s = limit_s

    def left(self) -> float:
        return self.end - time.perf_counter()


def _checked(
    problem: PlanningProblem,
    milp: MILP,
    backend: str,
    clock: _Clock,
    *,
    abs_gap: float | None = None,
    what: str,
    utility_floor: float | None = None,
    max_utility: float | None = None,
) -> MilpResult:
    opts = problem.options
    left = clock.left()
    if left <= 0:
        raise SolverError(
            f"{backend}: the time limit of {clock.limit_s:g} s ran out before {what}; "
            "raise time_limit_s"
        )
    res = solve_milp(
        milp,
        backend,
        time_limit_s=left,
        mip_gap=opts.mip_gap,
        abs_gap=abs_gap,
        threads=opts.threads,
    )
    if res.status in ("OPTIMAL", "FEASIBLE"):
        return res
    if res.status == "INFEASIBLE":
        raise InfeasibleError(
            "no plan satisfies the constraints",
            explain_infeasibility(
                problem, milp.deadline_s, utility_floor=utility_floor, max_utility=max_utility
            ),
        )
    if res.status == "NOT_SOLVED":
        raise SolverError(
            f"{backend} stopped at the time limit of {clock.limit_s:g} s without a feasible "
            f"plan ({what}; solver status {res.native_status}); raise time_limit_s, or plan "
            "per device class (use_classes, class_bucket_ratio)"
        )
    raise SolverError(f"{backend} failed while {what}: status {res.status} ({res.native_status})")


def _decoded(
    problem: PlanningProblem, milp: MILP, values: np.ndarray, deadline_s: float | None = None
) -> tuple[Configuration, ...]:
    """Configurations of a solution; under bucketing, polished on the true profiles."""
    configs = decode(milp, values)
    if milp.kind == "class" and problem.options.class_bucket_ratio is not None:
        configs = polish_configurations(problem, configs, deadline_s)
    return configs


def solve_problem(problem: PlanningProblem, backend: str) -> SolverOutcome:
    """Plan ``problem`` exactly with ``backend`` (a key of :data:`BACKENDS`).

    Raises
    ------
    InfeasibleError
        No plan exists; the message names each blocked device or the fleet-wide constraint.
    SolverError
        The solver failed, or stopped at the time limit without a feasible plan.
    """
    opts = problem.options
    clock = _Clock(opts.time_limit_s)
    deadline = opts.deadline_s if opts.objective == "deadline" else None
    if not opts.allow_dropping:
        blocks = blocked_devices(problem, deadline)
        if blocks:
            raise InfeasibleError(
                "no plan: some devices cannot run even their smallest configuration",
                tuple(str(b) for b in blocks),
            )
    use_classes = resolve_use_classes(problem)

    if opts.objective == "deadline":
        milp = formulate(problem, deadline, use_classes=use_classes)
        res = _checked(problem, milp, backend, clock, what="maximising utility")
        assert res.values is not None
        return SolverOutcome(
            configurations=_decoded(problem, milp, res.values, deadline),
            status=res.status,
            solver=backend,
            solver_version=res.solver_version,
            mip_gap=res.gap,
            objective_value=milp.utility_value(res.values),
            deadline_s=deadline,
        )

    if opts.objective == "min-time":
        max_utility = None
        gaps: list[float | None] = []
        statuses = []
        if opts.utility_floor is not None:
            floor = opts.utility_floor
        else:
            base = formulate(problem, None, use_classes=use_classes)
            r0 = _checked(problem, base, backend, clock, what="finding the highest utility")
            assert r0.values is not None
            max_utility = base.utility_value(r0.values)
            floor = opts.utility_floor_share * max_utility
        milp = formulate(problem, None, utility_floor=floor, use_classes=use_classes)
        try:
            res = _checked(
                problem,
                milp,
                backend,
                clock,
                what="minimising the round time",
                utility_floor=floor,
                max_utility=max_utility,
            )
        except InfeasibleError:
            if max_utility is not None:
                raise
            # An absolute floor: find the highest utility to say by how much it is missed.
            base = formulate(problem, None, use_classes=use_classes)
            r0 = _checked(problem, base, backend, clock, what="finding the highest utility")
            assert r0.values is not None
            raise InfeasibleError(
                "no plan satisfies the constraints",
                explain_infeasibility(
                    problem, None, utility_floor=floor, max_utility=base.utility_value(r0.values)
                ),
            ) from None
        assert res.values is not None
        gaps.append(res.gap)
        statuses.append(res.status)
        return SolverOutcome(
            configurations=_decoded(problem, milp, res.values),
            status="OPTIMAL" if all(s == "OPTIMAL" for s in statuses) else "FEASIBLE",
            solver=backend,
            solver_version=res.solver_version,
            mip_gap=res.gap,
            objective_value=round_time_of(milp, res.values),
            deadline_s=round_time_of(milp, res.values),
        )

    return _dinkelbach(problem, backend, clock, use_classes)


def _dinkelbach(
    problem: PlanningProblem, backend: str, clock: _Clock, use_classes: bool
) -> SolverOutcome:
    opts = problem.options
    milp = formulate(problem, None, use_classes=use_classes)
    t_lb = milp.time_lower_bound_s
    # Start from the rate of the decoupled problem (exact without C7/C8/C9, an upper bound
    # otherwise); it is "unverified" until a plan of this program reaches it.
    start = decoupled_best_rate(problem)
    lam = start / milp.utility_scale if start is not None else 0.0
    verified = start is None
    best: tuple[float, np.ndarray, float] | None = None  # ratio, values, T
    last: MilpResult | None = None
    ratio_ub = math.inf
    converged = False
    for step in range(DINKELBACH_MAX_STEPS):
        if step > 0 and clock.left() <= 0:
            break
        abs_gap = opts.mip_gap * lam * t_lb if lam > 0 else None
        res = _checked(
            problem,
            milp.with_rate(lam),
            backend,
            clock,
            abs_gap=abs_gap,
            what=f"Dinkelbach step {step + 1} (lambda={lam:.6g})",
        )
        assert res.values is not None
        last = res
        u = float(milp.utility @ res.values)  # scaled utility
        t = round_time_of(milp, res.values)
        ratio = u / t if t > 0 else 0.0
        if best is None or ratio > best[0]:
            best = (ratio, res.values, t)
        if lam > 0 and t_lb > 0 and res.bound is not None:
            # every plan has U - lam T <= bound, so U / T <= lam + bound / T_lb
            ratio_ub = min(ratio_ub, lam + max(res.bound, 0.0) / t_lb)
        if (
            lam > 0
            and ratio <= lam * (1 + DINKELBACH_RTOL)
            and (verified or ratio >= lam * (1 - DINKELBACH_RTOL))
        ):
            converged = True
            break
        lam, verified = best[0], True
    assert best is not None and last is not None
    ratio, values, t = best
    gap = None if not math.isfinite(ratio_ub) or ratio <= 0 else max(0.0, ratio_ub - ratio) / ratio
    optimal = (
        converged and last.status == "OPTIMAL" and gap is not None and gap <= opts.mip_gap + 1e-9
    )
    return SolverOutcome(
        configurations=_decoded(problem, milp, values),
        status="OPTIMAL" if optimal else "FEASIBLE",
        solver=backend,
        solver_version=last.solver_version,
        mip_gap=gap,
        objective_value=ratio * milp.utility_scale,
        deadline_s=t,
    )


def _register(name: str) -> None:
    @register_solver(name)
    def _solve(problem: PlanningProblem) -> SolverOutcome:
        return solve_problem(problem, name)

    _solve.__name__ = f"solve_{name.replace('-', '_')}"
    _solve.__doc__ = f"Exact planner with the {name} backend."


for _name in BACKENDS:
    _register(_name)

# The other planners register themselves on import.
from legend.planner import bruteforce, greedy  # noqa: E402, F401
