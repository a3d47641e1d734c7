"""Errors of :mod:`legend.planner`; the CLI maps ``exit_code`` to the process status."""

from __future__ import annotations

from legend.models.errors import InputError, LegendError

__all__ = [
    "FleetError",
    "InfeasibleError",
    "PlannerError",
    "PlannerInputError",
    "SolverError",
]


class PlannerError(LegendError):
    """Root of every planner error."""


class PlannerInputError(PlannerError, InputError):
    """Bad planner input (options, rank grid, deadline). Exit status 2."""


class FleetError(PlannerInputError):
    """A fleet file or profile that cannot be used; the message names file, row and field."""


class InfeasibleError(PlannerError):
    """No plan satisfies the constraints. Exit status 3.

    ``reasons`` holds one line per device that cannot run even its smallest configuration,
    naming the binding constraint and by how much it is exceeded.
    """

    exit_code = 3

    def __init__(self, message: str, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(message if not reasons else message + "\n  " + "\n  ".join(reasons))
        self.reasons = reasons


class SolverError(PlannerError):
    """The solver failed (crashed, unavailable, or stopped without a feasible plan). Exit 4."""

    exit_code = 4
