"""Solver backends for the planner's MILP (:class:`~legend.planner.formulation.MILP`).

=================  ==============================================================
``highs``          HiGHS through ``highspy`` directly (the default for coupled programs)
``pulp-highs``     PuLP's in-process HiGHS interface (through ``highspy``)
``pulp-cbc``       PuLP's bundled CBC, run as a subprocess (``PULP_CBC_CMD``)
``cvxpy-highs``    CVXPY with its HiGHS interface
=================  ==============================================================

Each adapter only translates the program and reads back values, its native status (one
table per adapter maps it to ours: ``OPTIMAL, FEASIBLE, INFEASIBLE, UNBOUNDED, NOT_SOLVED,
ERROR``) and the best bound the solver proved, from which the relative MIP gap
``|bound - objective| / |objective|`` is computed. PuLP says "Optimal" after a time-limit
stop; its ``sol_status`` tells the truth (``LpSolutionIntegerFeasible``), so the tables key
on both. The ``highs`` adapter runs HiGHS in a worker process and stops it when it overruns
its time limit by :data:`OVERRUN_GRACE_S` (HiGHS can run far past its own limit on large
programs), so no solve outlives its limit by more than that.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from importlib import metadata
from typing import Any

import numpy as np

from legend.planner.formulation import MILP

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "CVXPY_STATUS",
    "HIGHS_STATUS",
    "OVERRUN_GRACE_S",
    "PULP_STATUS",
    "MilpResult",
    "SolveLimits",
    "satisfies",
    "solve_milp",
]

# Seconds a HiGHS solve may run past its time limit before it is cancelled.
OVERRUN_GRACE_S = 2.0


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

    @classmethod
    def of(
        cls,
        status: str,
        native_status: str,
        solver_version: str,
        values: np.ndarray | None = None,
        objective: float | None = None,
        bound: float | None = None,
    ) -> MilpResult:
        """A result from its status and solver text; without values unless it found some."""
        return cls(
            status=status,
            values=values,
            objective=objective,
            bound=bound,
            native_status=native_status,
            solver_version=solver_version,
        )


#: Options handed to every HiGHS solve of the ``highs`` backend (in its worker process too):
#: HiGHS's own defaults except these, measured by ``benchmarks/solver_options.py`` on the
#: planning problems of the time-to-accuracy runs (docs/planner.md, "HiGHS options"): no
#: restart of the root after presolve reductions (the slowest plans under the staggered
#: contention model restarted the root eight times), and no RINS or RENS sub-MIP heuristics
#: (70% of a slow staggered plan's solve; the warm start already supplies the incumbent).
HIGHS_OPTIONS: dict[str, bool | int | float | str] = {
    "mip_allow_restart": False,
    "mip_heuristic_run_rins": False,
    "mip_heuristic_run_rens": False,
}


@dataclass(frozen=True, kw_only=True)
class SolveLimits:
    """When a backend stops: its time limit, its relative and absolute gaps, its threads,
    and further HiGHS options (``highs`` backend)."""

    time_limit_s: float
    mip_gap: float
    abs_gap: float | None = None
    threads: int | None = None
    highs_options: tuple[tuple[str, bool | int | float | str], ...] = ()

    @property
    def seconds(self) -> float:
        """The time limit handed to a solver (a solver takes no limit of zero)."""
        return max(self.time_limit_s, 0.01)


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
            lowBound=float(milp.lower[j]) if math.isfinite(milp.lower[j]) else None,
            upBound=float(milp.upper[j]) if math.isfinite(milp.upper[j]) else None,
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


def _pulp_values(variables: list[Any], milp: MILP) -> np.ndarray:
    # PuLP leaves a variable that appears in no row and not in the objective unset: any
    # value within its bounds is optimal, so take the one closest to 0
    default = np.clip(0.0, milp.lower, milp.upper)
    return np.asarray(
        [v.varValue if v.varValue is not None else default[j] for j, v in enumerate(variables)]
    )


def _solve_pulp_cbc(milp: MILP, limits: SolveLimits) -> MilpResult:
    start = time.perf_counter()
    res = _solve_pulp_cbc_once(milp, limits)
    left = limits.time_limit_s - (time.perf_counter() - start)
    broken = res.values is not None and not satisfies(milp, res.values)
    if milp.start is not None and (res.status in ("ERROR", "INFEASIBLE", "NOT_SOLVED") or broken):
        # The bundled CBC 2.10.3 can crash (SIGSEGV) when a MIP start meets a time limit
        # that interrupts its preprocessing, and can call a program with a MIP start
        # infeasible that is not; retry once without the start.
        res = _solve_pulp_cbc_once(
            replace(milp, start=None), replace(limits, time_limit_s=max(left, 0.01))
        )
        res = replace(res, native_status=res.native_status + " (retried without warm start)")
    return res


def _solve_pulp_cbc_once(milp: MILP, limits: SolveLimits) -> MilpResult:
    import pulp

    prob, variables = _build_pulp(milp)
    if milp.start is not None:
        # PuLP refuses a start outside the bounds; rounding can leave one a hair outside
        start = np.clip(milp.start, milp.lower, milp.upper)
        for var, value in zip(variables, start, strict=True):
            var.setInitialValue(float(value))
    fd, log_path = tempfile.mkstemp(prefix="legend-cbc-", suffix=".log")
    os.close(fd)
    try:
        solver = pulp.PULP_CBC_CMD(
            msg=False,
            timeLimit=limits.seconds,
            gapRel=limits.mip_gap,
            gapAbs=limits.abs_gap,
            threads=limits.threads,
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
            why = " (preprocessing stopped: Pre-processing says infeasible)" if cut_short else ""
            return MilpResult.of(
                "NOT_SOLVED" if cut_short else "ERROR",
                str(exc).split(",")[0] + why,
                f"pulp {pulp.__version__} / CBC",
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
        values = _pulp_values(variables, milp)
        objective = float(milp.objective @ values)
        found = re.search(r"(?:Upper|Lower) bound:\s*(-?[\d.eE+-]+)", log)
        if found:
            bound = float(found.group(1))
        elif status == "OPTIMAL":
            # CBC prints no bound when it proves optimality; it stopped within its gap.
            within = "tolerance" in (result.group(1) if result else "")
            slack = max(limits.mip_gap * abs(objective), limits.abs_gap or 0.0) if within else 0.0
            bound = objective + slack if milp.sense == "max" else objective - slack
    cbc = f"pulp {pulp.__version__} / CBC {version.group(1) if version else '?'}"
    return MilpResult.of(status, native, cbc, values, objective, bound)


def _solve_pulp_highs(milp: MILP, limits: SolveLimits) -> MilpResult:
    import highspy
    import pulp

    start = milp.start

    class _HiGHS(pulp.HiGHS):  # type: ignore[misc,name-defined]
        """PuLP's in-process HiGHS plus a warm start (PuLP passes none to it)."""

        def callSolver(self, lp: Any) -> None:
            if start is not None:
                sol = highspy.HighsSolution()
                # PuLP passes only the variables that appear in a row or the objective
                width = int(lp.solverModel.getNumCol())
                col = [0.0] * width
                for j, var in enumerate(variables):
                    index = getattr(var, "index", None)
                    if isinstance(index, int) and 0 <= index < width:
                        col[index] = float(start[j])
                sol.col_value = col
                sol.value_valid = True
                lp.solverModel.setSolution(sol)
            super().callSolver(lp)

    prob, variables = _build_pulp(milp)
    solver = _HiGHS(
        msg=False,
        timeLimit=limits.seconds,
        gapRel=limits.mip_gap,
        gapAbs=limits.abs_gap,
        threads=limits.threads,
    )
    version = f"pulp {pulp.__version__} / HiGHS {_dist_version('highspy')}"
    try:
        prob.solve(solver)
    except Exception as exc:  # highspy raises plain exceptions on model errors
        return MilpResult.of("ERROR", f"{type(exc).__name__}: {exc}", version)
    highs = prob.solverModel
    status = _pulp_status(prob.status, prob.sol_status)
    native = f"{highs.getModelStatus().name} / sol_status {prob.sol_status}"
    values = objective = bound = None
    if status in ("OPTIMAL", "FEASIBLE"):
        values = _pulp_values(variables, milp)
        objective = float(milp.objective @ values)
        dual = float(highs.getInfo().mip_dual_bound)
        # PuLP hands HiGHS the negated objective of a maximisation.
        bound = -dual if milp.sense == "max" else dual
    if _optimal_beyond_gap(status, milp, objective, bound, limits):
        log.debug("pulp-highs: optimal status with a gap beyond the limits; solving without it")
        return _solve_pulp_highs(replace(milp, start=None), limits)
    return MilpResult.of(status, native, version, values, objective, bound)


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


def _solve_cvxpy_highs(milp: MILP, limits: SolveLimits) -> MilpResult:
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
    opts: dict[str, Any] = {"time_limit": limits.seconds, "mip_rel_gap": limits.mip_gap}
    if limits.abs_gap is not None:
        opts["mip_abs_gap"] = limits.abs_gap
    if limits.threads is not None:
        opts["threads"] = limits.threads
    try:
        problem.solve(solver=cp.HIGHS, **opts)
    except cp.error.SolverError as exc:
        return MilpResult.of("ERROR", str(exc), version)
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
                return MilpResult.of("NOT_SOLVED", native + " (no incumbent)", version)
            dual = float(info.mip_dual_bound) if info is not None else float("nan")
            if math.isfinite(dual):
                bound = -dual if milp.sense == "max" else dual
    return MilpResult.of(status, native, version, values, objective, bound)


@cache
def _dist_version(name: str) -> str:
    """An installed distribution's version ("?" if not installed); read once per process
    (reading package metadata takes a millisecond, a share of a small plan's time)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def legend_version() -> str:
    """``"legend <version>"``: the solver version of the planners written in legend."""
    version = _dist_version("legend")
    return "legend" if version == "?" else f"legend {version}"


# -- HiGHS through highspy -----------------------------------------------------------------

# HighsModelStatus name -> ours (time/iteration limits: FEASIBLE with an incumbent, else
# NOT_SOLVED; decided from the primal solution status).
HIGHS_STATUS: dict[str, str] = {
    "kOptimal": "OPTIMAL",
    "kInfeasible": "INFEASIBLE",
    "kUnbounded": "UNBOUNDED",
    "kUnboundedOrInfeasible": "INFEASIBLE",
    "kTimeLimit": "FEASIBLE",
    "kIterationLimit": "FEASIBLE",
    "kSolutionLimit": "FEASIBLE",
    "kInterrupt": "FEASIBLE",
    "kObjectiveBound": "FEASIBLE",
    "kObjectiveTarget": "FEASIBLE",
    "kNotset": "NOT_SOLVED",
    "kModelEmpty": "OPTIMAL",
    "kLoadError": "ERROR",
    "kModelError": "ERROR",
    "kPresolveError": "ERROR",
    "kSolveError": "ERROR",
    "kPostsolveError": "ERROR",
    "kUnknown": "NOT_SOLVED",
    "kMemoryLimit": "NOT_SOLVED",
}


def _solve_highs(milp: MILP, limits: SolveLimits) -> MilpResult:
    """HiGHS in a worker process, stopped by the parent when it overruns its time limit
    by :data:`OVERRUN_GRACE_S` (HiGHS does not always honour its own limit, nor an
    interrupt, on large programs). The worker (``python -m legend.planner.highs_worker``) is
    started once and reused; a worker stopped for overrunning is replaced at the next solve.
    """
    if os.name != "posix":  # no select() on pipes: run in this process
        return _highs_here(milp, limits)
    return _WORKER.solve(milp, limits)


class _HighsWorker:
    """One HiGHS worker process per planner process, fed length-prefixed pickles."""

    def __init__(self) -> None:
        self.proc: Any = None

    def _start(self) -> Any:
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "legend.planner.highs_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            atexit.register(self.stop)
        return self.proc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def solve(self, milp: MILP, limits: SolveLimits) -> MilpResult:
        import pickle
        import select

        limit_s = limits.seconds + OVERRUN_GRACE_S
        proc = self._start()
        data = pickle.dumps((milp, limits), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            proc.stdin.write(len(data).to_bytes(8, "little") + data)
            proc.stdin.flush()
        except OSError as exc:
            self.stop()
            return _failed(f"the HiGHS worker could not take the program: {exc}")
        ready, _, _ = select.select([proc.stdout], [], [], limit_s)
        if not ready:
            self.stop()
            return MilpResult.of(
                "NOT_SOLVED",
                f"stopped: still running {limit_s:.3g} s after it started",
                f"highspy {_dist_version('highspy')}",
            )
        try:
            size = int.from_bytes(_read(proc.stdout, 8), "little")
            result: MilpResult = pickle.loads(_read(proc.stdout, size))
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self.stop()
            return _failed(f"the HiGHS worker ended without a result: {exc}")
        return result


def _read(stream: Any, size: int) -> bytes:
    chunks = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            raise EOFError("the stream ended early")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


_WORKER = _HighsWorker()


def _failed(why: str) -> MilpResult:
    return MilpResult.of("ERROR", why, f"highspy {_dist_version('highspy')}")


# the thread count HiGHS's process-wide scheduler was started with ("unset": not yet)
_scheduler_threads: int | str | None = "unset"


def _use_threads(threads: int | None) -> None:
    """HiGHS starts one scheduler per process with the first solve's thread count, and a
    later solve that asks for another count fails (model status ``kNotset``); restart the
    scheduler when the count changes."""
    global _scheduler_threads
    import highspy

    if _scheduler_threads != "unset" and _scheduler_threads != threads:
        highspy.Highs.resetGlobalScheduler(True)
    _scheduler_threads = threads


def _highs_here(milp: MILP, limits: SolveLimits) -> MilpResult:
    import highspy

    version = f"highspy {_dist_version('highspy')}"
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(limits.seconds))
    h.setOptionValue("mip_rel_gap", float(limits.mip_gap))
    if limits.abs_gap is not None:
        h.setOptionValue("mip_abs_gap", float(limits.abs_gap))
    if limits.threads is not None:
        h.setOptionValue("threads", int(limits.threads))
    for name, value in limits.highs_options:
        h.setOptionValue(name, value)
    _use_threads(limits.threads)
    a = milp.matrix.tocsc()
    lp = highspy.HighsLp()
    lp.num_col_ = milp.num_vars
    lp.num_row_ = a.shape[0]
    lp.col_cost_ = np.asarray(milp.objective, dtype=float)
    lp.col_lower_ = np.asarray(milp.lower, dtype=float)
    lp.col_upper_ = np.where(np.isfinite(milp.upper), milp.upper, highspy.kHighsInf)
    lp.row_lower_ = np.where(np.isfinite(milp.row_lower), milp.row_lower, -highspy.kHighsInf)
    lp.row_upper_ = np.where(np.isfinite(milp.row_upper), milp.row_upper, highspy.kHighsInf)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = a.indptr.astype(np.int32)
    lp.a_matrix_.index_ = a.indices.astype(np.int32)
    lp.a_matrix_.value_ = a.data.astype(float)
    lp.a_matrix_.num_col_ = milp.num_vars
    lp.a_matrix_.num_row_ = a.shape[0]
    lp.sense_ = highspy.ObjSense.kMaximize if milp.sense == "max" else highspy.ObjSense.kMinimize
    lp.integrality_ = [
        highspy.HighsVarType.kInteger if flag else highspy.HighsVarType.kContinuous
        for flag in milp.integer
    ]
    h.passModel(lp)
    if milp.start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = [float(x) for x in milp.start]
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    finished = True
    status_name = h.getModelStatus().name
    info = h.getInfo()
    feasible = int(info.primal_solution_status) == 2  # kSolutionStatusFeasible
    status = HIGHS_STATUS.get(status_name, "ERROR")
    if status == "FEASIBLE" and not feasible:
        status = "NOT_SOLVED"
    if status == "OPTIMAL" and not feasible and milp.num_vars:
        status = "NOT_SOLVED"
    native = status_name + ("" if finished else " (cancelled after the time limit)")
    values = objective = bound = None
    if status in ("OPTIMAL", "FEASIBLE"):
        values = np.asarray(h.getSolution().col_value, dtype=float)
        objective = float(milp.objective @ values)
        if int(milp.integer.sum()):
            dual = float(info.mip_dual_bound)
        else:
            dual = objective if status == "OPTIMAL" else float("nan")
        bound = dual if math.isfinite(dual) else None
    if _optimal_beyond_gap(status, milp, objective, bound, limits):
        log.debug("highs: optimal status with a gap beyond the limits; solving without the start")
        return _highs_here(replace(milp, start=None), limits)
    return MilpResult.of(status, native, version, values, objective, bound)


def _optimal_beyond_gap(
    status: str, milp: MILP, objective: float | None, bound: float | None, limits: SolveLimits
) -> bool:
    """Whether HiGHS answered a program with a warm start "optimal" while its own bound is
    further from the objective than both gaps allow (with slack for its tolerances).

    HiGHS (1.x, presolve on) can do so with the warm start as its solution although a solve
    without the start finds a better one: a Dinkelbach step then proves nothing, and the
    adapters that hand it a start (``highs``, ``pulp-highs``) solve again without it."""
    if status != "OPTIMAL" or milp.start is None or objective is None or bound is None:
        return False
    if not math.isfinite(bound):
        return False
    gap = (bound - objective) if milp.sense == "max" else (objective - bound)
    allowed = max(limits.mip_gap * max(abs(bound), abs(objective)), limits.abs_gap or 0.0)
    return gap > 10 * allowed + 1e-9


Backend = Callable[[MILP, SolveLimits], MilpResult]
BACKENDS: dict[str, Backend] = {
    "highs": _solve_highs,
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
        milp,
        SolveLimits(
            time_limit_s=time_limit_s,
            mip_gap=mip_gap,
            abs_gap=abs_gap,
            threads=threads,
            highs_options=tuple(HIGHS_OPTIONS.items()),
        ),
    )
    if res.values is not None and not satisfies(milp, res.values):
        why = res.native_status + " (returned values violate the program)"
        return MilpResult.of("NOT_SOLVED", why, res.solver_version)
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
