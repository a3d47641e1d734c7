"""``legend report plan|whatif|run``: write a report directory (HTML, Markdown, CSV, PNG).

Only light modules load at import time; pandas, matplotlib and the planner's solvers load
inside the commands. Bad input raises :class:`~legend.reports.errors.ReportInputError`
(exit status 2), with the file and what is missing.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from legend.planner.cli import native_stdout_to_stderr
from legend.reports.errors import ReportInputError

if TYPE_CHECKING:
    from legend.planner.profiles import Fleet
    from legend.planner.topology import Topology

__all__ = ["report_app"]

report_app = typer.Typer(
    name="report",
    help="Reports people would rather look at than read: plan, what-if and run comparisons.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

OutOption = Annotated[Path, typer.Option("--out", help="Directory to write the report into.")]
TopologyOption = Annotated[
    Path | None,
    typer.Option("--topology", help="Network topology (TOML/JSON): the links the fleet shares."),
]


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ReportInputError(
            f"`{option}` must be comma-separated numbers like 0.25,0.5,1,2,4, got {text!r}"
        ) from None
    return values


def _topology(path: Path | None, fleet: Fleet | None) -> Topology | None:
    """The topology file read against the fleet (errors name the node or link, exit 2)."""
    if path is None:
        return None
    if fleet is None:
        raise ReportInputError(f"--topology {path} needs the fleet it routes: pass --fleet")
    from legend.planner.topology import load_topology

    return load_topology(path, fleet)


# What a report folder holds (an earlier report there may be replaced; nothing else).
REPORT_ENTRIES = ("report.html", "report.md", "report.json", "tables", "figures")
# Bounds of the what-if sweeps (each point is a plan of the whole, scaled fleet).
MAX_SCALE = 1e6
MAX_SWEEP_POINTS = 50
MAX_SCALED_DEVICES = 1_000_000


def _inputs(what: str, first: Path, *options: tuple[str, Path | None]) -> None:
    from legend.models.paths import check_input_file

    check_input_file(first, what)
    for option, given in options:
        if given is not None:
            check_input_file(given, option)


def _report_dir(out: Path, *inputs: Path | None) -> None:
    from legend.models.paths import check_output_dir

    check_output_dir(out, "--out", inputs=inputs, owned=REPORT_ENTRIES)


def _write(report: object, out: Path, kind: str, started: float) -> None:
    from legend.models.paths import writing
    from legend.reports.render import Report, write_report

    assert isinstance(report, Report)
    with writing(out, "--out"):
        written = write_report(report, out)
    _done(kind, written, started)


def _done(kind: str, written: object, started: float) -> None:
    from legend.reports.render import WrittenReport

    assert isinstance(written, WrittenReport)
    print(
        f"{kind} report -> {written.html} and {written.markdown} "
        f"({len(written.tables)} tables, {len(written.figures)} figures, "
        f"{time.perf_counter() - started:.1f} s)"
    )


@report_app.command("plan")
def plan_command(
    plan: Annotated[Path, typer.Argument(help="A plan JSON written by `legend plan`.")],
    out: OutOption,
    fleet: Annotated[
        Path | None,
        typer.Option(help="The fleet the plan was made for: adds classes, capacities, slack."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model (default: the plan's) for recomputing costs.")
    ] = None,
    job: Annotated[
        Path | None,
        typer.Option(help="Job parameters (TOML/JSON, [job] or [train] table) behind the plan."),
    ] = None,
    per_device_limit: Annotated[
        int, typer.Option(help="Above this many devices, plots aggregate by device class.")
    ] = 60,
    topology: TopologyOption = None,
) -> None:
    """Report one plan: costs, timeline, memory, bytes, links and binding constraints."""
    from legend.planner.profiles import load_fleet
    from legend.reports.plan_report import (
        build_plan_report,
        check_plan_inputs,
        check_plan_values,
        load_job_params,
        load_plan,
    )

    started = time.perf_counter()
    _inputs("plan", plan, ("--fleet", fleet), ("--job", job), ("--topology", topology))
    _report_dir(out, plan, fleet, job, topology)
    loaded, raw = load_plan(plan)
    check_plan_values(loaded, str(plan))
    fleet_data = load_fleet(fleet) if fleet is not None else None
    job_data = load_job_params(job) if job is not None else None
    topo = _topology(topology, fleet_data)
    if fleet_data is not None:
        for warning in check_plan_inputs(
            loaded, fleet_data, str(plan), job=job_data, raw=raw, model=model, topology=topo
        ):
            print(f"warning: {warning}", file=sys.stderr)
    with native_stdout_to_stderr():  # solver banners of re-plans (links) off stdout
        report = build_plan_report(
            loaded,
            fleet=fleet_data,
            job=job_data,
            model=model,
            raw=raw,
            source=str(plan),
            per_device_limit=per_device_limit,
            topology=topo,
        )
    _write(report, out, "plan", started)


@report_app.command("whatif")
def whatif_command(
    fleet: Annotated[Path, typer.Option(help="Fleet file (.csv, .toml or .json).")],
    model: Annotated[str, typer.Option(help="Model preset, model directory or config.json.")],
    out: OutOption,
    solver: Annotated[
        str | None,
        typer.Option(help="Planner for every point (default greedy; auto with --topology)."),
    ] = None,
    objective: Annotated[
        str, typer.Option(help="progress, rate, deadline or min-time.")
    ] = "progress",
    deadline_s: Annotated[
        float | None, typer.Option(help="Deadline for objective 'deadline'.")
    ] = None,
    time_limit_s: Annotated[float, typer.Option(help="Per-plan solver time limit.")] = 5.0,
    bandwidth_scales: Annotated[str, typer.Option(help="Bandwidth factors.")] = "0.25,0.5,1,2,4",
    fleet_scales: Annotated[str, typer.Option(help="Fleet size factors.")] = "0.5,1,2",
    deadline_points: Annotated[
        int, typer.Option(help="Points of the deadline sweep (0: none).")
    ] = 8,
    models: Annotated[
        str, typer.Option(help="Models to swap in (comma-separated; empty: skip).")
    ] = "all-MiniLM-L6-v2,roberta-large,llama-2-7b",
    job: Annotated[Path | None, typer.Option(help="Job parameters (TOML/JSON).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override the job's batch size.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Override the job's sequence length.")] = None,
    local_steps: Annotated[int | None, typer.Option(help="Override local steps.")] = None,
    ranks: Annotated[str | None, typer.Option(help="Rank grid, e.g. 2,4,8,16.")] = None,
    target_modules: Annotated[str | None, typer.Option(help="qv, attention or all.")] = None,
    weight_precision: Annotated[
        str | None, typer.Option(help="fp32, fp16, bf16, int8 or 4bit.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    topology: TopologyOption = None,
    double_link: Annotated[
        list[str] | None,
        typer.Option(
            "--double-link",
            help="With --topology: re-plan with this link at twice its capacity (repeatable; "
            "'all': each link in turn).",
        ),
    ] = None,
) -> None:
    """Sweep bandwidth, fleet size, deadline, model and link capacity with the planner."""
    from legend.models.spec import get_model_spec
    from legend.planner.api import PlannerOptions
    from legend.planner.cli import check_finite
    from legend.planner.profiles import JobParams, load_fleet, parse_rank_grid
    from legend.reports.plan_report import load_job_params
    from legend.reports.whatif import WhatIfSettings, build_whatif_report, run_whatif

    started = time.perf_counter()
    _inputs("--fleet", fleet, ("--job", job), ("--topology", topology))
    _report_dir(out, fleet, job, topology)
    check_finite("--time-limit-s", time_limit_s)
    check_finite("--deadline-s", deadline_s)
    if not 0 <= deadline_points <= MAX_SWEEP_POINTS:
        raise ReportInputError(
            f"--deadline-points must be in 0..{MAX_SWEEP_POINTS} (0: no deadline sweep), "
            f"got {deadline_points}"
        )
    base = load_job_params(job) if job is not None else JobParams()
    changes: dict[str, object] = {}
    for name, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("local_steps", local_steps),
        ("target_modules", target_modules),
        ("weight_precision", weight_precision),
    ):
        if value is not None:
            changes[name] = value
    if ranks is not None:
        changes["ranks"] = parse_rank_grid(ranks)
    params = base.with_(**changes) if changes else base
    loaded = load_fleet(fleet)
    topo = _topology(topology, loaded)
    options = PlannerOptions(
        solver=solver or ("greedy" if topo is None else "auto"),
        objective=objective,
        deadline_s=deadline_s,
        time_limit_s=time_limit_s,
    )
    scales = {
        "--bandwidth-scales": _floats(bandwidth_scales, "--bandwidth-scales"),
        "--fleet-scales": _floats(fleet_scales, "--fleet-scales"),
    }
    for option, values in scales.items():
        if len(values) > MAX_SWEEP_POINTS:
            raise ReportInputError(
                f"{option} lists {len(values)} values; at most {MAX_SWEEP_POINTS}"
            )
        for v in values:
            if not (math.isfinite(v) and 0 < v <= MAX_SCALE):
                raise ReportInputError(
                    f"{option}: {v:g} is out of range; each factor must be > 0 and <= {MAX_SCALE:g}"
                )
    biggest = max(scales["--fleet-scales"], default=1.0) * len(loaded)
    if biggest > MAX_SCALED_DEVICES:
        raise ReportInputError(
            f"--fleet-scales {max(scales['--fleet-scales']):g} x {len(loaded)} devices of "
            f"{fleet} is {biggest:,.0f} devices; the what-if plans at most "
            f"{MAX_SCALED_DEVICES:,} (lower the factor)"
        )
    settings = WhatIfSettings(
        bandwidth_scales=scales["--bandwidth-scales"],
        fleet_scales=scales["--fleet-scales"],
        deadline_points=deadline_points,
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
        double_links=tuple(double_link or ()),
    )
    spec = get_model_spec(model, target_modules=params.target_modules)
    with native_stdout_to_stderr():
        result = run_whatif(
            loaded, spec, params, options, settings, progress=progress, topology=topo
        )
    _write(build_whatif_report(result), out, "what-if", started)


@report_app.command("run")
def run_command(
    runs: Annotated[list[Path], typer.Argument(help="Run directories written by `legend run`.")],
    out: OutOption,
    target: Annotated[
        float | None,
        typer.Option(help="Target accuracy (default: the lowest final accuracy of the runs)."),
    ] = None,
    per_device_limit: Annotated[
        int, typer.Option(help="Rows shown of per-device and per-round tables.")
    ] = 60,
) -> None:
    """Compare runs: accuracy vs simulated time and bytes, time-to-target, calibration."""
    from legend.reports.run_report import build_run_report, load_run

    started = time.perf_counter()
    _report_dir(out, *runs)
    if target is not None and not (math.isfinite(target) and 0 < target <= 1):
        raise ReportInputError(f"--target must be an accuracy in (0, 1], got {target!r}")
    loaded = [load_run(r) for r in runs]
    report = build_run_report(loaded, target=target, per_device_limit=per_device_limit)
    _write(report, out, "run", started)
