"""The run session: one run's directory, records, checkpoints and resume, shared by engines.

Every engine (in-process, Flower simulation, Flower deployment) drives the same
:class:`RunSession`; engines only move instructions to devices and replies back.

Run directory::

    config.toml            the resolved job
    inputs.json            digests of the inputs (job, fleet, topology, data set, model)
    calibration.json       host timings used by the simulated clock (if calibrated)
    plans/round_0001.json  each round's plan
    rounds.csv             one row per round (simulated and host time, accuracy, bytes, ...)
    devices.csv            one row per round and device (plan, predicted/observed time, ...)
    links.csv              with ``job.topology``: per round and shared link, bytes each way,
                           utilisation and whether the link bound the round
    checkpoints/           global adapter (npz) after every round and state.json
    adapter/               the final global adapter in PEFT ``save_pretrained`` format
    summary.json           method, final accuracy, time and bytes to target
    run.log                warnings (drop-outs, rejected updates)

The record schema (:data:`ROUND_COLUMNS`, :data:`DEVICE_COLUMNS`, :data:`LINK_COLUMNS`) is
defined here and read by :mod:`legend.reports.run_report`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from legend.federation.adapters import AdapterState, init_global
from legend.federation.core import (
    LINK_COLUMNS,
    ClientReply,
    RoundResult,
    ServerCore,
)
from legend.federation.errors import FederationInputError
from legend.federation.job import JobConfig
from legend.federation.server_opt import OptimizerState
from legend.models.spec import ModelSpec, get_model_spec
from legend.planner.costs import Calibration
from legend.planner.profiles import Fleet, load_fleet
from legend.planner.topology import load_topology

__all__ = [
    "DEVICE_COLUMNS",
    "LINK_COLUMNS",
    "ROUND_COLUMNS",
    "JobData",
    "Prepared",
    "RunDirError",
    "RunResult",
    "RunSession",
    "check_run_dir",
    "load_job_data",
    "load_result",
    "prepare",
    "run_log",
]

log = logging.getLogger("legend.federation")

ROUND_COLUMNS = (
    "round",
    "sim_time_s",
    "sim_clock_s",
    "host_time_s",
    "host_clock_s",
    "accuracy",
    "test_loss",
    "bytes_up",
    "bytes_down",
    "cum_bytes",
    "participants",
    "planned",
    "dropped",
    "rejected",
    "waiting_mean_s",
    "waiting_max_s",
    "planned_round_time_s",
    "server_time_s",
    "solver_status",
    "solve_time_s",
)
DEVICE_COLUMNS = (
    "round",
    "device_id",
    "device_class",
    "status",
    "layers",
    "ranks",
    "depth",
    "predicted_time_s",
    "observed_time_s",
    "predicted_compute_s",
    "observed_compute_s",
    "bytes_up",
    "bytes_down",
    "memory_bytes",
    "train_loss",
    "samples",
    "host_time_s",
    "waiting_s",
)
_RECORDS = ("rounds.csv", "devices.csv", "links.csv")


class RunDirError(FederationInputError):
    """A run directory that cannot be written or resumed."""


@dataclass(frozen=True)
class RunResult:
    out_dir: Path
    rounds_completed: int
    final_accuracy: float
    global_state: AdapterState
    summary: Mapping[str, Any]


@dataclass
class Prepared:
    """Everything loaded once per run: model, data, devices' shares, calibration."""

    cfg: JobConfig
    fleet: Fleet
    spec: ModelSpec
    host: Any
    tokenizer: Any
    train: Any
    test: Any
    device_data: dict[str, Any]
    calibration: Calibration | None
    initial_head: dict[str, np.ndarray]


@dataclass(frozen=True)
class JobData:
    """A job's data set, model and per-device partition: what every engine loads alike."""

    dataset: Any
    spec: ModelSpec
    base: Any
    tokenizer: Any
    parts: list[np.ndarray]


def load_job_data(cfg: JobConfig, fleet: Fleet) -> JobData:
    """Load the data set, the base model and tokenizer, and partition the train split over
    ``fleet`` (deterministic for the job's seed, so every process computes the same shares)."""
    from legend.federation.data import load_dataset, partition
    from legend.models.loaders import load_base_model, load_tokenizer

    d = cfg.data
    dataset = load_dataset(
        d.dataset,
        seed=cfg.job.seed,
        test_fraction=d.test_fraction,
        max_train=d.max_train or None,
        max_test=d.max_test or None,
    )
    spec = get_model_spec(
        cfg.job.model, target_modules=cfg.train.target_modules, num_labels=dataset.num_labels
    )
    base = load_base_model(cfg.job.model, num_labels=dataset.num_labels, seed=cfg.job.seed)
    tokenizer = load_tokenizer(cfg.job.model)
    sizes = [dev.num_samples for dev in fleet.devices] if d.samples_from_fleet else None
    parts = partition(
        dataset.train_labels,
        len(fleet),
        alpha=d.alpha,
        quantity_skew=d.quantity_skew,
        seed=cfg.job.seed,
        min_samples=d.min_samples,
        sizes=sizes,
    )
    return JobData(
        dataset=dataset,
        spec=spec,
        base=base,
        tokenizer=tokenizer,
        parts=[np.asarray(p) for p in parts],
    )


def prepare(cfg: JobConfig, *, calibration: Calibration | str | None = "config") -> Prepared:
    """Load the fleet, model, data and calibration of a job (heavy imports happen here)."""
    import torch

    from legend.federation.apply import AdapterHost
    from legend.federation.training import DeviceData, tokenize

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    fleet = load_fleet(cfg.job.fleet)
    data = load_job_data(cfg, fleet)
    dataset, spec, base, tokenizer, parts = (
        data.dataset,
        data.spec,
        data.base,
        data.tokenizer,
        data.parts,
    )
    train = tokenize(tokenizer, dataset.train_texts, dataset.train_labels, cfg.train.seq_len)
    test = tokenize(tokenizer, dataset.test_texts, dataset.test_labels, cfg.train.seq_len)
    device_data = {
        dev.device_id: DeviceData(train, np.asarray(idx))
        for dev, idx in zip(fleet.devices, parts, strict=True)
    }
    host = AdapterHost(base, spec, cfg.job_params)
    if calibration == "config":
        calibration = _calibration_for(cfg)
    return Prepared(
        cfg=cfg,
        fleet=fleet,
        spec=spec,
        host=host,
        tokenizer=tokenizer,
        train=train,
        test=test,
        device_data=device_data,
        calibration=calibration if isinstance(calibration, Calibration) else None,
        initial_head=host.initial_head(),
    )


def _calibration_for(cfg: JobConfig) -> Calibration | None:
    setting = cfg.planner.calibration
    if setting == "none":
        return None
    if setting != "auto":
        return Calibration.load(setting)
    from legend.federation.calibrate import calibrate, default_calibration_path

    t = cfg.train
    path = default_calibration_path(
        cfg.job.model, batch_size=t.batch_size, seq_len=t.seq_len, target_modules=t.target_modules
    )
    if path.is_file():
        try:
            return Calibration.load(path)
        except ValueError:
            pass
    log.info("calibrating %s on this host (once; cached at %s)", cfg.job.model, path)
    cal = calibrate(
        cfg.job.model,
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        target_modules=t.target_modules,
        ranks=(min(t.ranks), max(t.ranks)),
        repeats=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    cal.save(path)
    return cal


# -- run directory ---------------------------------------------------------------------------


def _write_csv_rows(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})
        fh.flush()
        os.fsync(fh.fileno())


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def _truncate_csv(path: Path, last_round: int) -> None:
    """Drop rows of rounds after ``last_round`` (written by a run killed mid-round)."""
    if not path.exists():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    keep = [r for r in body if r and int(r[0]) <= last_round]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(keep)
    tmp.replace(path)


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True))
    tmp.replace(path)


@dataclass
class _Progress:
    round: int = 0
    sim_clock_s: float = 0.0
    host_clock_s: float = 0.0
    cum_bytes: float = 0.0
    accuracy: float = math.nan
    target_round: int | None = None
    target_sim_s: float | None = None
    target_bytes: float | None = None


def _checkpoint(out: Path, result: RoundResult, progress: _Progress) -> None:
    ck = out / "checkpoints"
    ck.mkdir(exist_ok=True)
    path = ck / f"round_{result.round:04d}.npz"
    result.global_state.to_npz(path)
    optimizer = (
        result.optimizer_state.save(ck, f"round_{result.round:04d}_server_opt")
        if result.optimizer_state is not None
        else None
    )
    _atomic_json(
        ck / "state.json",
        {
            "round": result.round,
            "global_state": path.name,
            "server_optimizer": optimizer,
            "estimates": {k: list(v) for k, v in result.estimates.items()},
            "progress": progress.__dict__,
        },
    )


def _load_checkpoint(
    out: Path,
) -> tuple[_Progress, AdapterState, dict[str, tuple[float, float, float]], OptimizerState | None]:
    state_path = out / "checkpoints" / "state.json"
    if not state_path.is_file():
        raise RunDirError(
            f"cannot resume {out}: {state_path} is missing (no completed round); "
            "start a new run with --out"
        )
    state = json.loads(state_path.read_text())
    npz = out / "checkpoints" / state["global_state"]
    if not npz.is_file():
        raise RunDirError(f"cannot resume {out}: checkpoint {npz} is missing")
    global_state = AdapterState.from_npz(npz)
    estimates = {k: (float(v[0]), float(v[1]), float(v[2])) for k, v in state["estimates"].items()}
    progress = _Progress(**state["progress"])
    entry = state.get("server_optimizer")
    optimizer = OptimizerState.load(out / "checkpoints", entry) if entry else None
    return progress, global_state, estimates, optimizer


def _comparable(cfg: JobConfig) -> dict[str, Any]:
    data = cfg.to_dict()
    data["job"].pop("rounds", None)
    return data


def check_run_dir(cfg: JobConfig, out: Path, resume: bool) -> None:
    """The run-directory rules, checked before anything is loaded or written.

    A new run refuses a directory that already holds a run; a resume needs the run's
    ``config.toml`` (the same job but for ``job.rounds``) and at least one completed round.
    """
    from legend.federation.job import load_job

    if resume:
        saved = out / "config.toml"
        if not saved.is_file():
            raise RunDirError(f"cannot resume {out}: {saved} is missing")
        if _comparable(load_job(saved)) != _comparable(cfg):
            raise RunDirError(
                f"cannot resume {out}: the job differs from the one it was started with "
                f"({saved}); only job.rounds may change"
            )
        if not (out / "checkpoints" / "state.json").is_file():
            raise RunDirError(
                f"cannot resume {out}: no completed round (checkpoints/state.json missing); "
                "start a new run with --out"
            )
    elif out.exists() and (out / "checkpoints").exists():
        raise RunDirError(
            f"run directory {out} already holds a run; continue it with --resume {out} "
            "or choose another --out"
        )


@contextlib.contextmanager
def run_log(out: Path) -> Iterator[None]:
    """Send the ``legend.federation`` log to ``out/run.log`` while the block runs."""
    handler = logging.FileHandler(out / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def load_result(out: Path) -> RunResult:
    """The :class:`RunResult` of a finished run directory (its summary and last checkpoint)."""
    summary = json.loads((out / "summary.json").read_text())
    _, global_state, _, _ = _load_checkpoint(out)
    return RunResult(
        out_dir=out,
        rounds_completed=int(summary["rounds"]),
        final_accuracy=float(summary["final_accuracy"]),
        global_state=global_state,
        summary=summary,
    )


# -- the session ---------------------------------------------------------------------------


class RunSession:
    """One run's bookkeeping, shared by every engine.

    It loads (or resumes) the run, owns the :class:`ServerCore`, and after each round
    aggregates, evaluates, writes the records and the checkpoint. Engines only deliver
    instructions to devices and replies back::

        session = RunSession(cfg, out, resume=False)
        for t in session.pending_rounds():
            plan, instructions = session.start_round(t)
            replies = [...]                      # the engine's transport
            session.complete_round(t, plan, replies)
        result = session.finish()
    """

    def __init__(
        self,
        cfg: JobConfig,
        out: Path,
        *,
        resume: bool,
        prepared: Prepared | None = None,
        show_progress: bool = True,
        stop_after: int | None = None,
        on_round: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        from rich.console import Console

        self.cfg = cfg
        self.out = out
        self.on_round = on_round
        self.console = Console(stderr=True, quiet=not show_progress)
        cal_file = out / "calibration.json"
        calibration: Calibration | str | None
        if resume:
            calibration = Calibration.load(cal_file) if cal_file.is_file() else None
        else:
            calibration = "config"
        with self.console.status("loading model and data"):
            self.prepared = p = prepared or prepare(cfg, calibration=calibration)
        if resume:
            progress, global_state, estimates, optimizer_state = _load_checkpoint(out)
            for name in _RECORDS:
                _truncate_csv(out / name, progress.round)
            self.calibration = Calibration.load(cal_file) if cal_file.is_file() else None
        else:
            (out / "config.toml").write_text(cfg.to_toml())
            self.calibration = p.calibration
            if self.calibration is not None:
                self.calibration.save(cal_file)
            for name in _RECORDS:
                (out / name).unlink(missing_ok=True)
            progress = _Progress()
            r_max = max(cfg.train.ranks)
            global_state = init_global(p.spec, r_max, p.initial_head, seed=cfg.job.seed)
            estimates = {}
            optimizer_state = None
        self.progress = progress
        self.server = ServerCore(
            cfg,
            p.fleet,
            p.spec,
            calibration=self.calibration,
            global_state=global_state,
            estimates=estimates,
            topology=load_topology(cfg.job.topology, p.fleet) if cfg.job.topology else None,
            optimizer_state=optimizer_state,
        )
        self.last_round = cfg.job.rounds if stop_after is None else min(cfg.job.rounds, stop_after)
        self._round_start = 0.0
        self._server_time = 0.0

    def pending_rounds(self) -> range:
        return range(self.progress.round + 1, self.last_round + 1)

    def start_round(self, t: int, available: Sequence[str] | None = None) -> tuple[Any, list[Any]]:
        """Select, plan and slice round ``t``; the plan is written before training starts."""
        self._round_start = time.perf_counter()
        ids = self.server.select(t, available)
        plan = self.server.plan(t, ids)
        instructions = self.server.instructions(t, plan)
        self._server_time = time.perf_counter() - self._round_start
        plan.save(self.out / "plans" / f"round_{t:04d}.json")
        return plan, instructions

    def complete_round(
        self,
        t: int,
        plan: Any,
        replies: Sequence[ClientReply],
        *,
        missing: Sequence[str] = (),
        status: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Aggregate, evaluate, record and checkpoint round ``t``; return its rounds.csv row."""
        from legend.federation.training import evaluate

        cfg, p, progress = self.cfg, self.prepared, self.progress
        agg_start = time.perf_counter()
        result = self.server.finish_round(t, plan, replies, missing=missing)
        server_time = self._server_time + time.perf_counter() - agg_start
        accuracy, test_loss = math.nan, math.nan
        if t % cfg.federation.eval_every == 0 or t == self.last_round:
            if status is not None:
                status(f"round {t}: evaluating")
            with p.host.evaluation_model(result.global_state) as model:
                accuracy, test_loss = evaluate(
                    model, p.test, batch_size=cfg.federation.eval_batch_size
                )
        host_time = time.perf_counter() - self._round_start
        row = dict(result.round_row)
        row["server_time_s"] = server_time
        row["sim_time_s"] = row["sim_time_s"] + server_time
        progress.round = t
        progress.sim_clock_s += row["sim_time_s"]
        progress.host_clock_s += host_time
        progress.cum_bytes += row["bytes_up"] + row["bytes_down"]
        if not math.isnan(accuracy):
            progress.accuracy = accuracy
        target = cfg.job.target_accuracy
        if (
            target is not None
            and progress.target_round is None
            and not math.isnan(accuracy)
            and accuracy >= target
        ):
            progress.target_round = t
            progress.target_sim_s = progress.sim_clock_s
            progress.target_bytes = progress.cum_bytes
        row.update(
            sim_clock_s=progress.sim_clock_s,
            host_time_s=host_time,
            host_clock_s=progress.host_clock_s,
            accuracy=accuracy,
            test_loss=test_loss,
            cum_bytes=progress.cum_bytes,
        )
        _write_csv_rows(self.out / "devices.csv", DEVICE_COLUMNS, result.device_rows)
        _write_csv_rows(self.out / "rounds.csv", ROUND_COLUMNS, [row])
        if result.link_rows:
            _write_csv_rows(self.out / "links.csv", LINK_COLUMNS, result.link_rows)
        _checkpoint(self.out, result, progress)
        acc = "-" if math.isnan(accuracy) else f"{accuracy:.3f}"
        self.console.print(
            f"round {t:>3}/{cfg.job.rounds}  acc {acc}  "
            f"sim {row['sim_time_s']:8.1f} s (total {progress.sim_clock_s:9.1f} s)  "
            f"host {host_time:6.1f} s  up {row['bytes_up'] / 1e6:7.2f} MB  "
            f"devices {row['participants']}/{row['planned']}"
            + (f"  dropped {row['dropped']}" if row["dropped"] else "")
            + (f"  rejected {row['rejected']}" if row["rejected"] else "")
        )
        if self.on_round is not None:
            self.on_round(row)
        return row

    def finish(self) -> RunResult:
        """Write the final adapter (when every round is done) and ``summary.json``."""
        cfg, progress = self.cfg, self.progress
        global_state = self.server.global_state
        finished = progress.round >= cfg.job.rounds
        if finished:
            adapter_dir = self.out / "adapter"
            if adapter_dir.exists():
                shutil.rmtree(adapter_dir)
            self.prepared.host.save_pretrained(global_state, adapter_dir)
        summary = {
            "method": cfg.job.method,
            "model": cfg.job.model,
            "dataset": cfg.data.dataset,
            "engine": cfg.job.engine,
            "aggregation": cfg.aggregation,
            "seed": cfg.job.seed,
            "rounds": progress.round,
            "rounds_planned": cfg.job.rounds,
            "finished": finished,
            "final_accuracy": progress.accuracy,
            "sim_time_s": progress.sim_clock_s,
            "host_time_s": progress.host_clock_s,
            "total_bytes": progress.cum_bytes,
            "target_accuracy": cfg.job.target_accuracy,
            "target_round": progress.target_round,
            "time_to_target_sim_s": progress.target_sim_s,
            "bytes_to_target": progress.target_bytes,
            "calibrated": self.calibration is not None,
            "clock": "simulated device time from the cost model calibrated on this host"
            if self.calibration is not None
            else "simulated device time from the analytic cost model",
        }
        _atomic_json(self.out / "summary.json", summary)
        return RunResult(
            out_dir=self.out,
            rounds_completed=progress.round,
            final_accuracy=progress.accuracy,
            global_state=global_state,
            summary=summary,
        )
