"""``legend plan``: plan one round for a fleet file and write the plan as JSON.

The contract (other tools rely on it; ``docs/cli.md`` has the details)::

    legend plan --fleet FLEET --model MODEL --out PLAN.json
                [--objective rate|deadline|min-time] [--deadline-s S]
                [--solver auto|sweep|highs|pulp-highs|pulp-cbc|cvxpy-highs|greedy|brute-force]
                [--ranks 2,4,8,16] [--time-limit-s S] [--format table|json]

Exit status 0 with the plan written, 2 for bad input, 3 when no plan exists (the message
names every blocked device, the constraint and by how much), 4 when the solver fails.
Errors are raised as :class:`~legend.models.errors.LegendError` subclasses; the ``legend``
entry point prints them as one line and exits with their ``exit_code``.

This module imports no solver library, torch or transformers at import time.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from legend.planner.errors import PlannerInputError
from legend.planner.types import DEFAULT_OBJECTIVE, DEFAULT_SECONDS_PER_MB

if TYPE_CHECKING:
    from rich.console import RenderableType

    from legend.planner.plan import Plan
    from legend.planner.profiles import Fleet

__all__ = ["check_finite", "native_stdout_to_stderr", "plan_command", "plan_table"]

FORMATS = ("table", "json")
TARGET_PRESETS = ("qv", "attention", "all")


def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        raise PlannerInputError(
            f"{option} {value!r} is not supported; expected one of {', '.join(allowed)}"
        )
    return value


def plan_command(
    fleet: Annotated[
        Path, typer.Option("--fleet", help="Fleet file (.csv, .toml or .json), one device a row.")
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model", help="Model preset (e.g. all-MiniLM-L6-v2), model directory or config.json."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the plan (JSON).")],
    objective: Annotated[
        str,
        typer.Option(
            "--objective",
            help="progress (default: the progress model's expected progress per priced "
            "second), rate (max fixed utility per second), deadline (max utility within "
            "--deadline-s) or min-time (shortest round reaching the utility floor).",
        ),
    ] = DEFAULT_OBJECTIVE,
    deadline_s: Annotated[
        float | None,
        typer.Option("--deadline-s", help="Round deadline in seconds (objective deadline)."),
    ] = None,
    solver: Annotated[
        str,
        typer.Option(
            "--solver",
            help="auto (default: the exact sweep, or the MILP on HiGHS when coupling rows are "
            "active), sweep, highs, pulp-highs, pulp-cbc, cvxpy-highs, greedy or brute-force.",
        ),
    ] = "auto",
    ranks: Annotated[
        str, typer.Option("--ranks", help="Rank grid, strictly increasing, e.g. 2,4,8,16.")
    ] = "2,4,8,16",
    time_limit_s: Annotated[
        float, typer.Option("--time-limit-s", help="MILP time limit in seconds.")
    ] = 60.0,
    mip_gap: Annotated[
        float, typer.Option("--mip-gap", help="Relative gap at which the MILP stops.")
    ] = 1e-4,
    coverage_layers: Annotated[
        int,
        typer.Option("--coverage-layers", help="C8: the top layers that must be covered."),
    ] = 0,
    coverage_share: Annotated[
        float,
        typer.Option(
            "--coverage-share", help="C8: share of the round's samples each must be trained on."
        ),
    ] = 0.0,
    layer_weights: Annotated[
        str,
        typer.Option(
            "--layer-weights",
            help="Utility layer weights: auto (the model's measured prior under progress), "
            "prior, linear or uniform.",
        ),
    ] = "auto",
    rank_gains: Annotated[
        str,
        typer.Option(
            "--rank-gains",
            help="Utility of a rank: auto (the measured prior under progress), prior or log2.",
        ),
    ] = "auto",
    saturation: Annotated[
        str,
        typer.Option(
            "--saturation",
            help="progress: how a rank slot's progress grows with the devices training it: "
            "auto (the measured coverage response, where stored), prior, none (additive), or "
            "comma-separated numbers: the response at 1, 2, ... mean-sized devices.",
        ),
    ] = "auto",
    seconds_per_mb: Annotated[
        str,
        typer.Option(
            "--seconds-per-mb",
            help="progress: the price of traffic, seconds of round time one MB is worth, or "
            "auto: what the median device's uplink spends carrying it.",
        ),
    ] = str(DEFAULT_SECONDS_PER_MB),
    server_overhead_s: Annotated[
        float,
        typer.Option(
            "--server-overhead-s", help="progress: seconds the server adds to every round."
        ),
    ] = 0.0,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Solver threads (default: the solver's).")
    ] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="What to print: table (summary) or json (the plan).")
    ] = "table",
    target_modules: Annotated[
        str,
        typer.Option("--target-modules", help="Adapted modules per layer: qv, attention or all."),
    ] = "qv",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Local batch size.")] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Sequence length in tokens.")] = 64,
    local_steps: Annotated[
        int,
        typer.Option(
            "--local-steps", help="Local steps per round (a fleet row's local_steps wins)."
        ),
    ] = 10,
    bytes_per_param: Annotated[
        int,
        typer.Option("--bytes-per-param", help="Bytes per transferred parameter (4 fp32, 2 fp16)."),
    ] = 4,
    weight_precision: Annotated[
        str,
        typer.Option(
            "--weight-precision", help="Frozen weights in memory: fp32, fp16, bf16, int8, 4bit."
        ),
    ] = "fp32",
    cache_prefix: Annotated[
        bool,
        typer.Option(
            "--cache-prefix",
            help="Devices keep their frozen layers' output and run forward only from the "
            "lowest adapted layer (a fleet row's prefix_built=false: still to compute it).",
        ),
    ] = False,
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help="Host timings from `legend calibrate` (JSON)."),
    ] = None,
    server_mbps: Annotated[
        float | None,
        typer.Option("--server-mbps", help="Capacity of the server's link, Mbit/s."),
    ] = None,
    topology: Annotated[
        Path | None,
        typer.Option("--topology", help="Network topology (TOML/JSON): links the devices share."),
    ] = None,
    allow_dropping: Annotated[
        bool,
        typer.Option("--allow-dropping", help="Let the planner leave devices out of the round."),
    ] = False,
    min_depth: Annotated[
        int, typer.Option("--min-depth", help="Minimum number of adapted layers per device.")
    ] = 1,
    min_participants: Annotated[
        int,
        typer.Option("--min-participants", help="With --allow-dropping: at least this many."),
    ] = 0,
    min_sample_share: Annotated[
        float,
        typer.Option(
            "--min-sample-share",
            help="With --allow-dropping: the participants hold at least this share of the "
            "fleet's samples (0-1).",
        ),
    ] = 0.0,
    utility_floor: Annotated[
        float | None,
        typer.Option("--utility-floor", help="min-time: absolute utility the plan must reach."),
    ] = None,
    utility_floor_share: Annotated[
        float,
        typer.Option(
            "--utility-floor-share",
            help="min-time without --utility-floor: share of the highest utility to reach.",
        ),
    ] = 0.5,
    monotone_ranks: Annotated[
        bool,
        typer.Option(
            "--monotone-ranks/--free-ranks",
            help="Ranks non-decreasing toward the output (default) or free.",
        ),
    ] = True,
) -> None:
    """Plan one round: choose every device's LoRA depth and per-layer ranks."""
    # Light imports only; the solver libraries load inside the chosen backend.
    from legend.models.paths import check_input_file, check_output_file, writing
    from legend.models.spec import get_model_spec
    from legend.planner.api import PlannerOptions, plan_round
    from legend.planner.costs import Calibration
    from legend.planner.profiles import JobParams, load_fleet, parse_rank_grid

    output_format = _choice(output_format, FORMATS, "--format")
    target_modules = _choice(target_modules, TARGET_PRESETS, "--target-modules")
    check_finite("--server-mbps", server_mbps)
    check_finite("--deadline-s", deadline_s)
    check_finite("--time-limit-s", time_limit_s)
    check_finite("--utility-floor", utility_floor, positive=False)
    check_finite("--utility-floor-share", utility_floor_share)
    check_input_file(fleet, "--fleet")
    for option, given in (("--calibration", calibration), ("--topology", topology)):
        if given is not None:
            check_input_file(given, option)
    model_path = Path(model)
    check_output_file(
        out,
        "--out",
        inputs=(fleet, calibration, topology, model_path if model_path.exists() else None),
    )
    loaded = load_fleet(fleet)
    spec = get_model_spec(model, target_modules=target_modules)
    grid = parse_rank_grid(ranks)
    spec.check_ranks(grid, what="--ranks")
    job = JobParams(
        batch_size=batch_size,
        seq_len=seq_len,
        local_steps=local_steps,
        bytes_per_param=bytes_per_param,
        weight_precision=weight_precision,
        target_modules=target_modules,
        ranks=grid,
        cache_prefix=cache_prefix,
    )
    if utility_floor is not None and not utility_floor > 0:
        raise PlannerInputError(f"--utility-floor must be > 0, got {utility_floor!r}")
    if min_participants < 0:
        raise PlannerInputError(f"--min-participants must be >= 0, got {min_participants!r}")
    options = PlannerOptions(
        objective=objective,
        deadline_s=deadline_s,
        solver=solver,
        time_limit_s=time_limit_s,
        mip_gap=mip_gap,
        coverage_layers=coverage_layers,
        coverage_share=coverage_share,
        layer_weights=layer_weights,
        rank_gains=rank_gains,
        saturation=_saturation_arg(saturation),
        seconds_per_mb=_price_arg(seconds_per_mb),
        server_overhead_s=server_overhead_s,
        threads=threads,
        monotone_ranks=monotone_ranks,
        min_depth=min_depth,
        allow_dropping=allow_dropping,
        server_mbps=server_mbps,
        min_participants=min_participants,
        min_sample_share=min_sample_share,
        utility_floor=utility_floor,
        utility_floor_share=utility_floor_share,
    )
    calib = Calibration.load(calibration) if calibration is not None else None
    topo = None
    if topology is not None:
        from legend.planner.topology import load_topology

        topo = load_topology(topology, loaded)
    if calib is not None and calib.model != spec.name:
        raise PlannerInputError(
            f"calibration file {calibration} was measured for model {calib.model!r}, not "
            f"{spec.name!r}; re-run `legend calibrate --model {spec.name}`"
        )

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    with (
        Progress(
            SpinnerColumn(),
            TextColumn(f"Planning {len(loaded)} devices with {solver} ({objective})"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as progress,
        native_stdout_to_stderr(),
    ):
        progress.add_task("plan", total=None)
        plan = plan_round(loaded, spec, job, options, calibration=calib, topology=topo)
    with writing(out, "--out"):
        plan.save(out)

    if output_format == "json":
        sys.stdout.write(plan.to_json() + "\n")
    else:
        console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
        console.print(plan_table(plan, loaded))
        console.print(f"plan written to {out}")


def check_finite(option: str, value: float | None, *, positive: bool = True) -> None:
    """A number flag must be finite (and > 0 unless ``positive`` is false)."""
    if value is None:
        return
    if not math.isfinite(value) or (positive and value <= 0):
        raise PlannerInputError(
            f"{option} must be a finite number{' > 0' if positive else ''}, got {value!r}"
        )


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Send what solver libraries print on file descriptor 1 (banners, logs) to stderr, so
    that stdout carries only the summary or the plan JSON."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (embedded interpreters)
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def plan_table(plan: Plan, fleet: Fleet) -> RenderableType:
    """A rich renderable summarising ``plan`` for ``fleet``: header lines and a table."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    gap = "-" if plan.mip_gap is None else f"{plan.mip_gap:.2e}"
    value = (
        f"{plan.objective_value:.6g} utility/s"
        if plan.objective == "rate"
        else f"{plan.objective_value:.6g} progress per priced s"
        if plan.objective == "progress"
        else f"{plan.objective_value:.6g}" + (" utility" if plan.objective == "deadline" else " s")
    )
    participants = sum(1 for d in plan.devices if d.participates)
    header = Text.assemble(
        ("solver ", "bold"),
        f"{plan.solver} ({plan.solver_version})   ",
        ("status ", "bold"),
        f"{plan.status}   ",
        ("objective ", "bold"),
        f"{plan.objective} = {value}\n",
        ("round time ", "bold"),
        f"{plan.round_time_s:.3f} s   ",
        ("gap ", "bold"),
        f"{gap}   ",
        ("solve time ", "bold"),
        f"{plan.solve_time_s:.3f} s   ",
        ("participants ", "bold"),
        f"{participants}/{len(plan.devices)}   ",
        ("upload ", "bold"),
        _bytes(plan.total_upload_bytes),
    )
    table = Table(show_lines=False, header_style="bold")
    for name, justify in (
        ("device", "left"),
        ("class", "left"),
        ("depth", "right"),
        ("layers", "left"),
        ("ranks", "left"),
        ("time s", "right"),
        ("upload", "right"),
        ("memory / capacity GB", "right"),
        ("waiting s", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for dp in plan.devices:
        device = fleet[dp.device_id]
        if dp.participates:
            layers = f"{dp.layers[0]}-{dp.layers[-1]}" if len(dp.layers) > 1 else str(dp.layers[0])
            table.add_row(
                dp.device_id,
                device.device_class or "-",
                str(dp.depth),
                layers,
                _ranks(dp.ranks),
                f"{dp.predicted_time_s:.3f}",
                _bytes(dp.predicted_upload_bytes),
                f"{dp.predicted_memory_bytes / 1e9:.3f} / {device.memory_gb:.3g}",
                f"{max(plan.round_time_s - dp.predicted_time_s, 0.0):.3f}",
            )
        else:
            table.add_row(
                dp.device_id, device.device_class or "-", "0", "-", "-", "-", "-", "-", "-"
            )
    return Group(header, table)


def _ranks(ranks: tuple[int, ...]) -> str:
    """Ranks from the lowest adapted layer up, runs compressed: ``4,8x2,16x3``."""
    parts: list[str] = []
    for rank, group in itertools.groupby(ranks):
        count = len(list(group))
        parts.append(f"{rank}x{count}" if count > 1 else str(rank))
    return ",".join(parts)


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _price_arg(text: str) -> float | str:
    """``--seconds-per-mb``: a number of seconds, or ``auto``."""
    from legend.planner.types import AUTO_PRICE

    if text == AUTO_PRICE:
        return text
    try:
        return float(text)
    except ValueError:
        raise PlannerInputError(
            f"--seconds-per-mb must be a number of seconds (e.g. 0.008) or {AUTO_PRICE}, "
            f"got {text!r}"
        ) from None


def _saturation_arg(text: str) -> str | tuple[float, ...]:
    """``--saturation``: a keyword, or comma-separated numbers (the response at 1, 2, ...)."""
    from legend.planner.types import SATURATIONS

    if text in SATURATIONS:
        return text
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise PlannerInputError(
            f"--saturation must be {', '.join(SATURATIONS)} or comma-separated numbers (the "
            f"response at 1, 2, ... mean-sized devices, e.g. 1,1.5,1.8), got {text!r}"
        ) from None
