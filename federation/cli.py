"""The ``legend`` command line.

Commands live next to the code they drive and are registered here:

- ``legend plan``       -> :mod:`legend.planner.cli`
- ``legend calibrate``  -> :mod:`legend.federation.calibrate`
- ``legend run``        -> :mod:`legend.federation.run_cli`
- ``legend report ...`` -> :mod:`legend.reports.cli`

Every command module imports only light modules at import time (no torch, peft or flwr);
heavy imports happen inside the command. This module is the console script's entry point and
the one module of ``legend.federation`` that imports ``legend.reports`` (the layer above it):
it assembles every command, so it sits above every layer (the import-graph test names it).
Errors derived from :class:`~legend.models.errors.LegendError` print one line and exit with
their ``exit_code`` (2 bad input, 3 infeasible, 4 solver failure); no traceback.
"""

from __future__ import annotations

import sys

import click
import typer

from legend.federation.calibrate import calibrate_command
from legend.federation.run_cli import run_command
from legend.models.errors import LegendError
from legend.planner.cli import plan_command
from legend.reports.cli import report_app

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


app.command("plan")(plan_command)
app.command("calibrate")(calibrate_command)
app.command("run")(run_command)
app.add_typer(report_app, name="report")


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
