"""Errors of :mod:`legend.federation`; the CLI maps ``exit_code`` to the process status."""

from __future__ import annotations

from legend.models.errors import InputError, LegendError

__all__ = ["FederationError", "FederationInputError"]


class FederationError(LegendError):
    """Root of every federation error."""


class FederationInputError(FederationError, InputError):
    """Bad federation input (a plan, an adapter state, a data file). Exit status 2."""
