"""Errors of a Flower run (importing this module does not import Flower)."""

from __future__ import annotations

from legend.federation.errors import FederationError, FederationInputError

__all__ = ["FlowerEngineError", "FlowerInputError", "FlowerNodeError"]


class FlowerEngineError(FederationError):
    """A Flower run that could not be carried out (unreachable SuperLink, failed run)."""


class FlowerInputError(FlowerEngineError, FederationInputError):
    """Bad input to a Flower run: an address, a node config, a message. Exit status 2."""


class FlowerNodeError(FlowerInputError):
    """One or more SuperNodes whose device identity or profile cannot be used."""
