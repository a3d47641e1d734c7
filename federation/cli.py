"""The ``legend`` command line.

Commands live next to the code they drive and are registered here:

- ``legend plan``       -> :mod:`legend.planner.cli`
- ``legend calibrate``  -> :mod:`legend.federation.calibrate`
- ``legend run``        -> :mod:`legend.federation.run_cli`
- ``legend report ...`` -> :mod:`legend.reports.cli`

Every command module imports only light modules at import time (no torch, peft or flwr);
heavy imports happen inside the command. Errors derived from
:class:`~legend.models.errors.LegendError` print one line and exit with their
``exit_code`` (2 bad input, 3 infeasible, 4 solver failure); no traceback.
"""

from __future__ import annotations

import importlib
import sys

import click
import typer

from legend.models.errors import LegendError

app = typer.Typer(
    name="legend",
    help="Federated LoRA fine-tuning on heterogeneous devices: plan, run and report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Federated LoRA fine-tuning on heterogeneous devices: plan, run and report."""


# (module, attribute, command name); a module may expose a function or a Typer sub-app.
_COMMANDS = (
    ("legend.planner.cli", "plan_command", "plan"),
    ("legend.federation.calibrate", "calibrate_command", "calibrate"),
    ("legend.federation.run_cli", "run_command", "run"),
    ("legend.reports.cli", "report_app", "report"),
)


def _register() -> None:
    for module_name, attribute, command in _COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # command not part of this installation
            raise
        obj = getattr(module, attribute, None)
        if obj is None:
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=command)
        else:
            app.command(command)(obj)


_register()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``legend`` console script; returns the exit status."""
    try:
        result = app(args=argv, standalone_mode=False)
    except LegendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
