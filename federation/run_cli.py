"""``legend run CONFIG.toml``: run a federated job (registered by :mod:`legend.federation.cli`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["run_command"]


def run_command(
    config: Annotated[Path, typer.Argument(help="Job file (TOML), e.g. examples/quickstart.toml.")],
    method: Annotated[
        str | None,
        typer.Option(help="exact, greedy, uniform, hetlora, fedra, depth-only or rank-only."),
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Number of rounds.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/NAME-METHOD-sSEED).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this directory from its last round.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for data split, sampling and faults.")
    ] = None,
    engine: Annotated[
        str | None, typer.Option(help="inprocess (default), flower-sim or flower-deploy.")
    ] = None,
    superlink: Annotated[
        str | None, typer.Option(help="HOST:PORT of a running SuperLink (flower-deploy).")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress display.")] = False,
) -> None:
    """Run a federated fine-tuning job and write its run directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from legend.federation.job import JobError, load_job

    overrides: dict[str, object] = {}
    if method is not None:
        overrides["job__method"] = method
    if rounds is not None:
        overrides["job__rounds"] = rounds
    if seed is not None:
        overrides["job__seed"] = seed
    if engine is not None:
        overrides["job__engine"] = engine
    cfg = load_job(config, **overrides)
    if resume is not None and out is not None and resume != out:
        raise JobError("give either --out or --resume (the run directory to continue), not both")
    run_dir = resume or out or Path("runs") / f"{cfg.job.name}-{cfg.job.method}-s{cfg.job.seed}"
    try:
        result = _run(cfg, Path(run_dir), resume is not None, superlink, quiet)
    except OSError as exc:  # a disk that fills up or a folder removed under a running job
        from legend.federation.session import RunDirError

        where = exc.filename or run_dir
        kept = (Path(run_dir) / "checkpoints" / "state.json").is_file()
        raise RunDirError(
            f"{where} could not be read or written ({exc.strerror or exc})"
            + (f"; completed rounds stay in {run_dir} (--resume {run_dir})" if kept else "")
        ) from None
    s = result.summary
    acc = s["final_accuracy"]
    typer.echo(
        f"{s['method']}: {s['rounds']} rounds, final accuracy "
        f"{'n/a' if acc != acc else f'{acc:.4f}'}, simulated time {s['sim_time_s']:.1f} s "
        f"(device clock), host time {s['host_time_s']:.1f} s, "
        f"{s['total_bytes'] / 1e6:.2f} MB moved -> {result.out_dir}"
    )


def _run(cfg: Any, run_dir: Path, resume: bool, superlink: str | None, quiet: bool) -> Any:
    from legend.federation.job import JobError

    if cfg.job.engine == "inprocess":
        from legend.federation.runner import run_job

        return run_job(cfg, run_dir, resume=resume, show_progress=not quiet)
    try:
        from legend.federation import flower_engine
    except ModuleNotFoundError as exc:
        raise JobError(
            f"engine {cfg.job.engine!r} needs Flower: install legend with the `flower` extra"
        ) from exc
    from legend.federation.session import discard_failed_start, snapshot

    before = snapshot(run_dir)
    try:
        return flower_engine.run(
            cfg, run_dir, resume=resume, superlink=superlink, show_progress=not quiet
        )
    except BaseException:
        note = "" if resume else discard_failed_start(run_dir, before)
        if note:
            typer.echo(f"note: {note}", err=True)
        raise
