"""Error root shared by every legend package.

Each package derives its own root from :class:`LegendError`; bad user input is always
also a :class:`ValueError` (through :class:`InputError`). The command line maps an
error to its process exit status through ``exit_code``.
"""

from __future__ import annotations


class LegendError(Exception):
    """Root of every error legend raises on purpose."""

    exit_code: int = 1


class InputError(LegendError, ValueError):
    """Bad user input: a file, a field or an argument. Exit status 2."""

    exit_code = 2


class ModelError(LegendError):
    """Root of errors raised by :mod:`legend.models`."""


class ModelInputError(ModelError, InputError):
    """An unknown model name, an unreadable config or bad target modules."""


class PathError(LegendError, ValueError):
    """A path a command cannot read or write (missing, a folder where a file is expected,
    not writable, or an output that is one of the command's inputs). Exit status 2."""

    exit_code = 2
