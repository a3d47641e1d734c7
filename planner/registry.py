"""The planner's solvers by name, without import side effects.

:data:`SOLVERS` maps each name of :data:`~legend.planner.types.SOLVER_NAMES` to the
function that plans a :class:`~legend.planner.types.PlanningProblem`; the module that holds
it is imported only when that solver runs, so importing the planner loads no solver
library.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from types import MappingProxyType

from legend.planner.errors import PlannerInputError
from legend.planner.types import EXACT_BACKENDS, SOLVER_NAMES, PlanningProblem, SolverOutcome

__all__ = ["SOLVERS", "get_solver"]

Solver = Callable[[PlanningProblem], SolverOutcome]


def _exact(name: str) -> Solver:
    def solve(problem: PlanningProblem) -> SolverOutcome:
        from legend.planner.solvers import solve_problem

        return solve_problem(problem, name)

    solve.__name__ = f"solve_{name.replace('-', '_')}"
    solve.__doc__ = f"Exact planner, solver {name!r} (docs/planner.md)."
    return solve


def _lazy(module: str, function: str) -> Solver:
    def solve(problem: PlanningProblem) -> SolverOutcome:
        fn: Solver = getattr(import_module(module), function)
        return fn(problem)

    solve.__name__ = function
    return solve


SOLVERS: Mapping[str, Solver] = MappingProxyType(
    {
        **{name: _exact(name) for name in ("auto", "sweep", "lagrangian", *EXACT_BACKENDS)},
        "greedy": _lazy("legend.planner.greedy", "solve_greedy"),
        "brute-force": _lazy("legend.planner.bruteforce", "solve_bruteforce"),
    }
)
assert set(SOLVERS) == set(SOLVER_NAMES)


def get_solver(name: str) -> Solver:
    """The solver called ``name``; a clear error naming the choices otherwise."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise PlannerInputError(
            f"unknown solver {name!r}; expected one of {', '.join(SOLVER_NAMES)}"
        ) from None
