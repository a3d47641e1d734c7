"""Errors of :mod:`legend.reports`; the CLI maps ``exit_code`` to the process status."""

from __future__ import annotations

from legend.models.errors import InputError, LegendError

__all__ = ["ReportError", "ReportInputError"]


class ReportError(LegendError):
    """Root of every report error."""


class ReportInputError(ReportError, InputError):
    """A plan, fleet or run directory a report cannot use; names the file and the fix. Exit 2."""
