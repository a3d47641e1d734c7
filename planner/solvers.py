r"""The exact planner: the sweep where devices are independent, the MILP where they are not.

:func:`solve_problem` builds the catalogue (:mod:`legend.planner.catalog`), then

- without coupling rows (:func:`~legend.planner.sweep.coupling_rows` empty) and with the
  solver ``auto`` or ``sweep``: the exact sweep (:mod:`legend.planner.sweep`), ``OPTIMAL``
  with gap 0 by construction;
- with the participation floors (C9, C9s) as the only coupling rows and the solver
  ``auto``: the sweep with an exact covering program (:mod:`legend.planner.cover`), where
  its table is small enough (``cover-sweep``);
- with fleet-wide coupling rows only (C7, C8, C9, C9s) on more than
  :data:`LAGRANGIAN_MIN_DEVICES` devices and the solver ``auto``: Lagrangian bounds over
  the round time and repaired plans (:mod:`legend.planner.lagrange`), with a proven gap;
- with a topology's shared links (C10) as the only coupling rows and a MILP too large to
  build (more than :data:`~legend.planner.milp.MAX_COLUMNS` device-columns) and the solver
  ``auto``: per-link Lagrangian bounds over the round time and repaired plans
  (:mod:`legend.planner.linklagrange`), with a proven gap;
- otherwise, or when a MILP backend is named (``highs``, ``pulp-highs``, ``pulp-cbc``,
  ``cvxpy-highs``; :mod:`legend.planner.backends`): the multiple-choice MILP over catalogue
  columns (:mod:`legend.planner.formulation`), warm-started from the sweep's solution of
  the program without coupling rows when that solution also satisfies them.

The plan's ``solver`` field says which path solved it (``sweep``, ``cover-sweep``,
``lagrangian``, ``link-lagrangian`` or the backend's name).

O3 (``rate``, ``max U / T``) by Dinkelbach
------------------------------------------
Start at ``lambda_0``, the rate of the program without its coupling rows (an upper bound,
computed by the sweep); at step ``k`` solve ``F(lambda_k) = max U - lambda_k T`` (a MILP with
``T`` a variable), take its solution's ratio ``rho_k = U_k / T_k`` (``T_k`` the round time
the solution implies) and set ``lambda_{k+1} = rho_k``. ``F`` is convex, decreasing and
``F(rho*) = 0``, so the ratios increase and reach the optimum after finitely many steps
when the subproblems are solved exactly. Every subproblem gets the relative gap
``mip_gap`` and the absolute gap ``mip_gap * lambda_k * T_lb`` (``T_lb`` a proven lower
bound on the round time), so that a solver's bound ``F_ub >= F(lambda)`` proves, for every
plan, ``U / T <= lambda + F_ub / T_lb``. The reported gap is
``(lambda + F_ub / T_lb - rho) / rho`` from the last step: a proven relative gap on the
ratio. With a warm start of rate ``rho_0``, no optimal plan has ``T > U_max / rho_0``, so
slower columns are left out of the program.
"""

from __future__ import annotations

from collections.abc import Callable

from legend.planner.catalog import Catalogue, FleetCosts, build_catalogue, fleet_costs
from legend.planner.diagnose import blocked_devices, explain_infeasibility
from legend.planner.errors import InfeasibleError, PlannerInputError
from legend.planner.sweep import SweepResult, coupling_rows, sweep
from legend.planner.types import EXACT_BACKENDS, PlanningProblem, SolverOutcome

__all__ = ["LAGRANGIAN_MIN_DEVICES", "solve_problem"]

# Above this many devices, ``auto`` plans fleet-wide coupling rows with Lagrangian bounds
# (legend.planner.lagrange); at or below it, with the MILP and branch and bound.
LAGRANGIAN_MIN_DEVICES = 200


def solve_problem(problem: PlanningProblem, solver: str) -> SolverOutcome:
    """Plan ``problem`` exactly: ``solver`` is ``auto``, ``sweep`` or a MILP backend.

    Raises
    ------
    InfeasibleError
        No plan exists; the message names each blocked device or the fleet-wide constraint.
    SolverError
        The solver failed, or stopped at the time limit without a feasible plan.
    """
    opts = problem.options
    deadline = opts.deadline_s if opts.objective == "deadline" else None
    if not opts.allow_dropping:
        blocks = blocked_devices(problem, deadline)
        if blocks:
            raise InfeasibleError(
                "no plan: some devices cannot run even their smallest configuration",
                tuple(str(b) for b in blocks),
            )
    cat = build_catalogue(problem)
    fc = fleet_costs(problem)
    coupled = coupling_rows(problem)
    if solver in ("auto", "sweep") and not coupled:
        return _sweep_outcome(problem, cat, fc)
    if solver == "auto":
        from legend.planner import cover

        if cover.applies(problem, cat):
            return _sweep_outcome(problem, cat, fc, cover.solve_cover, "cover-sweep")
    if solver == "sweep":
        raise PlannerInputError(
            f"solver 'sweep' needs a program without coupling rows; active: {', '.join(coupled)}; "
            "use solver 'auto' or a MILP backend (highs, pulp-highs, pulp-cbc, cvxpy-highs)"
        )
    if solver in ("auto", "lagrangian"):
        from legend.planner import lagrange

        if solver == "lagrangian" and not lagrange.applies(problem):
            raise PlannerInputError(
                "solver 'lagrangian' plans fleet-wide coupling rows (server link, coverage, "
                "participants) for objectives progress, rate and deadline, not shared links "
                "or the saturating progress model (saturation); use 'auto' or a MILP backend"
            )
        if solver == "lagrangian" or (
            lagrange.applies(problem) and len(problem.fleet) > LAGRANGIAN_MIN_DEVICES
        ):
            return lagrange.solve_lagrangian(problem, cat, fc)
    if solver == "auto":
        from legend.planner import linklagrange
        from legend.planner.milp import MAX_COLUMNS

        if linklagrange.applies(problem) and len(fc) * len(cat) > MAX_COLUMNS:
            return linklagrange.solve_link_lagrangian(problem, cat, fc)
    backend = "highs" if solver == "auto" else solver
    if backend not in EXACT_BACKENDS:
        raise PlannerInputError(
            f"unknown MILP backend {backend!r}; expected one of {', '.join(EXACT_BACKENDS)}"
        )
    from legend.planner.milp import solve_milp_problem

    return solve_milp_problem(problem, cat, fc, backend)


def _sweep_outcome(
    problem: PlanningProblem,
    cat: Catalogue,
    fc: FleetCosts,
    method: Callable[[PlanningProblem, Catalogue, FleetCosts], SweepResult] = sweep,
    name: str = "sweep",
) -> SolverOutcome:
    try:
        res = method(problem, cat, fc)
    except InfeasibleError as exc:
        if exc.reasons:
            raise
        raise InfeasibleError(
            "no plan satisfies the constraints",
            explain_infeasibility(problem, problem.options.deadline_s),
        ) from None
    return SolverOutcome(
        configurations=tuple(cat.configuration(int(j)) for j in res.choice),
        status="OPTIMAL",
        solver=name,
        solver_version="legend",
        mip_gap=0.0,
        objective_value=res.objective_value,
        deadline_s=res.round_time_s,
        objective_bound=res.objective_value,
    )
