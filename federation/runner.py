"""The in-process engine: many simulated devices on one machine (the embedded default).

The frozen base model is loaded once and shared; each device's adapter is installed on it,
trained and removed in turn. Each round's plan, the per-round and per-device records and a
checkpoint are written as soon as the round completes, so killing the run loses nothing
completed and ``--resume`` continues from the last completed round with the same result.

The run directory, records, checkpoints and resume are the run session's
(:mod:`legend.federation.session`), shared with the Flower engines.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from legend.federation.core import ClientCore, ClientReply
from legend.federation.job import JobConfig
from legend.federation.session import (
    DEVICE_COLUMNS,
    LINK_COLUMNS,
    ROUND_COLUMNS,
    Prepared,
    RunDirError,
    RunFailedError,
    RunResult,
    RunSession,
    discard_failed_start,
    load_job_data,
    prepare,
    prepare_run_dir,
    run_log,
)

__all__ = [
    "DEVICE_COLUMNS",
    "LINK_COLUMNS",
    "ROUND_COLUMNS",
    "RunDirError",
    "RunResult",
    "RunSession",
    "load_job_data",
    "prepare",
    "run_job",
]


def run_job(
    cfg: JobConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    prepared: Prepared | None = None,
    on_round: Callable[[Mapping[str, Any]], None] | None = None,
    stop_after: int | None = None,
    show_progress: bool = True,
) -> RunResult:
    """Run (or resume) a federated job in-process and write its run directory.

    Parameters
    ----------
    cfg
        The job.
    out_dir
        The run directory (created; must not hold another run unless ``resume``).
    resume
        Continue from the last completed round found in ``out_dir``.
    prepared
        Reuse already loaded model and data (tests, benchmarks running several methods).
    on_round
        Called with each completed round's row (for progress displays and tests).
    stop_after
        Stop after this round (tests simulate a crash with it).
    """
    out = Path(out_dir)
    before = prepare_run_dir(cfg, out, resume)
    try:
        with run_log(out):
            return _run(cfg, out, resume, prepared, on_round, stop_after, show_progress)
    except RunFailedError:
        raise
    except BaseException:
        note = "" if resume else discard_failed_start(out, before)
        if note:
            print(f"note: {note}", file=sys.stderr)
        raise


def _run(
    cfg: JobConfig,
    out: Path,
    resume: bool,
    prepared: Prepared | None,
    on_round: Callable[[Mapping[str, Any]], None] | None,
    stop_after: int | None,
    show_progress: bool,
) -> RunResult:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    session = RunSession(
        cfg,
        out,
        resume=resume,
        prepared=prepared,
        show_progress=show_progress,
        stop_after=stop_after,
        on_round=on_round,
    )
    p = session.prepared
    client = ClientCore(p.host, session.server.costs, jitter=cfg.federation.jitter)
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=session.console, transient=False) as bar:
        task = bar.add_task(
            f"{cfg.job.method} rounds",
            total=cfg.job.rounds,
            completed=session.progress.round,
            status="",
        )
        for t in session.pending_rounds():
            plan, instructions = session.start_round(t)
            replies: list[ClientReply] = []
            for ins in instructions:
                bar.update(task, status=f"round {t}: training {ins.device_id}")
                replies.append(
                    client.train(ins, p.fleet[ins.device_id], p.device_data[ins.device_id])
                )
            session.complete_round(
                t, plan, replies, status=lambda text: bar.update(task, status=text)
            )
            bar.update(task, advance=1, status="")
    return session.finish()
