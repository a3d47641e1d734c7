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
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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
from legend.federation.errors import FederationError, FederationInputError
from legend.federation.job import JobConfig
from legend.federation.server_opt import MOMENTS, OptimizerState
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
    "RunFailedError",
    "RunResult",
    "RunSession",
    "check_run_dir",
    "discard_failed_start",
    "input_digests",
    "load_job_data",
    "load_result",
    "prepare",
    "prepare_run_dir",
    "run_log",
    "snapshot",
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
    "predicted_progress",
    "val_loss",
    "val_loss_drop",
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


class RunFailedError(FederationError):
    """A run that ended without accepting any update (its result would be the initial
    adapter). Exit status 5; the message gives the reason."""

    exit_code = 5


_REJECTIONS_SHOWN = 5  # rejected updates named on the terminal per round (all in run.log)
# timed plans of the first round, the fastest of which is the server's planning time
PLAN_TIMING_REPEATS = 3


class _ServerTimer:
    """Times a piece of the server's work for the simulated clock: the smaller of its wall
    time and the CPU time it took (this process and its child processes, such as the HiGHS
    worker of :mod:`legend.planner.backends`). On a busy host the wall time grows with the
    other processes' load while the CPU time does not; work spread over several threads can
    take more CPU time than wall time. The smaller of the two is what the work takes on an
    idle host of this kind, up to that parallelism."""

    seconds: float = 0.0

    def __enter__(self) -> _ServerTimer:
        self._wall = time.perf_counter()
        self._cpu = _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._wall
        end = _cpu_seconds()
        # a child that ended within the window leaves its share out (an underestimate)
        cpu = sum(v - self._cpu.get(pid, 0.0) for pid, v in end.items())
        self.seconds = max(0.0, min(wall, cpu))


def _cpu_seconds() -> dict[int, float]:
    """CPU seconds (user and system) so far of this process and of each live child, by pid."""
    import psutil

    me = psutil.Process()
    out = {me.pid: time.process_time()}
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        out[child.pid] = times.user + times.system
    return out


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
    validation: Any  # the server's held-out part of the train split, or None
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
    # indices into the train split the server holds out (validation; no device has them)
    validation: np.ndarray


def validation_indices(cfg: JobConfig, num_train: int) -> tuple[np.ndarray, np.ndarray]:
    """``(validation, rest)``: indices into the train split; the server holds out
    ``data.validation_size`` of them (at most a tenth), seeded by the job's seed."""
    n_val = min(max(cfg.data.validation_size, 0), num_train // 10)
    order = np.random.default_rng([cfg.job.seed, 3]).permutation(num_train)
    return np.sort(order[:n_val]), np.sort(order[n_val:])


def load_job_data(cfg: JobConfig, fleet: Fleet) -> JobData:
    """Load the data set, the base model and tokenizer, and partition the train split over
    ``fleet`` (deterministic for the job's seed, so every process computes the same shares)."""
    from legend.federation.data import DataError, load_dataset, partition
    from legend.federation.job import JobError
    from legend.models.loaders import load_base_model, load_tokenizer

    d = cfg.data
    check_fleet_fits(cfg, fleet)
    try:
        dataset = load_dataset(
            d.dataset,
            seed=cfg.job.seed,
            test_fraction=d.test_fraction,
            max_train=d.max_train or None,
            max_test=d.max_test or None,
        )
    except DataError as exc:
        raise JobError(f"{cfg.source}: `data.dataset`: {_in_job_terms(exc)}") from None
    spec = get_model_spec(
        cfg.job.model, target_modules=cfg.train.target_modules, num_labels=dataset.num_labels
    )
    base = load_base_model(cfg.job.model, num_labels=dataset.num_labels, seed=cfg.job.seed)
    tokenizer = load_tokenizer(cfg.job.model)
    sizes = [dev.num_samples for dev in fleet.devices] if d.samples_from_fleet else None
    validation, rest = validation_indices(cfg, len(dataset.train_labels))
    try:
        parts = partition(
            dataset.train_labels[rest],
            len(fleet),
            alpha=d.alpha,
            quantity_skew=d.quantity_skew,
            seed=cfg.job.seed,
            min_samples=d.min_samples,
            sizes=sizes,
        )
    except DataError as exc:
        raise JobError(
            f"{cfg.source}: splitting `data.dataset` over the {len(fleet)} devices of "
            f"`job.fleet`: {_in_job_terms(exc)}"
        ) from None
    return JobData(
        dataset=dataset,
        spec=spec,
        base=base,
        tokenizer=tokenizer,
        parts=[rest[np.asarray(p, dtype=np.int64)] for p in parts],
        validation=validation,
    )


# What the data set loader calls its arguments -> the job keys that set them.
_JOB_TERMS = (
    ("must be None (use everything) or", "must be 0 (everything) or"),
    ("`max_train`", "`data.max_train`"),
    ("`max_test`", "`data.max_test`"),
    ("`test_fraction`", "`data.test_fraction`"),
    ("`min_samples`", "`data.min_samples`"),
    ("`alpha`", "`data.alpha`"),
    ("`quantity_skew`", "`data.quantity_skew`"),
    ("`num_devices`", "the number of devices in `job.fleet`"),
    ("`sizes`", "the fleet's `num_samples` (`data.samples_from_fleet`)"),
    (
        "Pass `text_column=` / `label_column=` to name the right columns",
        "A job's data set needs the columns 'text' and 'label'; rename them in the file",
    ),
    (
        "Pass `text_column=` / `label_column=` to name the right keys",
        "A job's data set needs the keys 'text' and 'label'; rename them in the file",
    ),
)


def _in_job_terms(exc: Exception) -> str:
    text = str(exc)
    for old, new in _JOB_TERMS:
        text = text.replace(old, new)
    return text


def check_fleet_fits(cfg: JobConfig, fleet: Fleet) -> None:
    """Job settings that only the fleet can check: ``job.devices_per_round``."""
    from legend.federation.job import JobError

    k = cfg.job.devices_per_round
    if k > len(fleet):
        raise JobError(
            f"{cfg.source}: `job.devices_per_round` = {k} is more than the {len(fleet)} "
            f"devices of `job.fleet` ({fleet.source}); use at most {len(fleet)}, or 0 for "
            "every device every round"
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
    held = data.validation
    validation = (
        tokenize(
            tokenizer,
            [dataset.train_texts[i] for i in held],
            dataset.train_labels[held],
            cfg.train.seq_len,
        )
        if len(held)
        else None
    )
    device_data = {
        dev.device_id: DeviceData(train, np.asarray(idx))
        for dev, idx in zip(fleet.devices, parts, strict=True)
    }
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from legend.federation.job import JobError

        raise JobError(
            f"{cfg.source}: `train.device` = 'cuda', but this torch sees no CUDA device; "
            "use 'cpu' or 'auto'"
        )
    host = AdapterHost(base.to(device), spec, cfg.job_params)
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
        validation=validation,
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
    keep = [r for r in body if r and r[0].isdigit() and int(r[0]) <= last_round]
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
    # the server's time per round on the simulated clock: measured once, in the run's first
    # round, and recorded so that a resumed run keeps the clock of an uninterrupted one
    server_time_s: float | None = None
    # the host time of the server's layer probe (``federation.probe_examples``), measured
    # in the first round that probed; None: not measured (or no probe)
    probe_time_s: float | None = None
    # updates accepted so far (None: a run directory written before this was recorded)
    accepted_updates: int | None = None
    last_rejection: str = ""
    # the last round had replies and rejected every one of them
    all_rejected: bool = False
    # the validation loss after the last round (NaN: not measured yet)
    val_loss: float = math.nan
    # the progress model's state (:meth:`ProgressModel.to_dict`), None before any round
    progress_model: dict[str, Any] | None = None
    # devices holding their frozen-prefix features (``train.cache_prefix``), sorted
    prefix_built: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.prefix_built, list) or not all(
            isinstance(d, str) for d in self.prefix_built
        ):
            raise ValueError(
                f"`prefix_built` must be a list of device ids, got {self.prefix_built!r}"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint(out: Path, result: RoundResult, progress: _Progress) -> None:
    ck = out / "checkpoints"
    ck.mkdir(exist_ok=True)
    stem = f"round_{result.round:04d}"
    path = ck / f"{stem}.npz"
    result.global_state.to_npz(path)
    optimizer = (
        result.optimizer_state.save(ck, f"{stem}_server_opt")
        if result.optimizer_state is not None
        else None
    )
    files = [path.name]
    if optimizer:
        files += [str(optimizer[k]) for k in MOMENTS if optimizer.get(k)]
    state = {
        "round": result.round,
        "global_state": path.name,
        "server_optimizer": optimizer,
        "estimates": {k: list(v) for k, v in result.estimates.items()},
        "progress": progress.__dict__,
        "sha256": {name: _sha256(ck / name) for name in files},
    }
    # one state per round (to fall back on when a later one is damaged) and the latest
    _atomic_json(ck / f"{stem}.json", state)
    _atomic_json(ck / "state.json", state)


class CheckpointError(RunDirError):
    """A checkpoint that is missing, damaged or not of this job. Exit status 2."""


def _inside(directory: Path, name: Any, where: str) -> Path:
    """``directory / name`` for a plain file name read from a run directory's file; anything
    that could lead outside ``directory`` (separators, ``..``, links out) is refused."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or Path(name).name != name
        or "\\" in name
    ):
        raise CheckpointError(f"{where}: {name!r} is not a file name inside {directory}")
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise CheckpointError(f"{where}: {name!r} leads outside {directory}")
    return path


def _read_state(state_path: Path) -> dict[str, Any]:
    """A checkpoint's state file, checked for its fields and its files' digests."""
    ck = state_path.parent
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_path} is damaged (not readable JSON: {exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_path} is damaged: expected a JSON object")
    for key, kind in (
        ("round", int),
        ("global_state", str),
        ("estimates", dict),
        ("progress", dict),
    ):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{state_path} is damaged: field `{key}` is missing or invalid")
    npz = _inside(ck, state["global_state"], f"{state_path}: `global_state`")
    entry = state.get("server_optimizer")
    names = [npz.name]
    if entry is not None:
        if not isinstance(entry, dict):
            raise CheckpointError(f"{state_path}: `server_optimizer` must be an object")
        for key in MOMENTS:
            if entry.get(key):
                names.append(
                    _inside(ck, entry[key], f"{state_path}: `server_optimizer.{key}`").name
                )
    digests = state.get("sha256")
    for name in names:
        path = ck / name
        if not path.is_file():
            raise CheckpointError(f"{state_path}: checkpoint file {path} is missing")
        if isinstance(digests, dict) and digests.get(name) != _sha256(path):
            raise CheckpointError(
                f"checkpoint {path} is damaged: its SHA-256 differs from the one recorded "
                f"in {state_path}"
            )
    for key, check in (
        (
            "estimates",
            lambda e: {str(k): (float(v[0]), float(v[1]), float(v[2])) for k, v in e.items()},
        ),
        ("progress", lambda p: _Progress(**p)),
    ):
        try:
            check(state[key])
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise CheckpointError(
                f"{state_path} is damaged: field `{key}` is invalid ({exc})"
            ) from None
    return state


def _load_arrays(path: Path) -> AdapterState:
    try:
        return AdapterState.from_npz(path)
    except FederationInputError as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from None
    except Exception as exc:  # zip, zlib and EOF errors of a truncated file
        raise CheckpointError(
            f"checkpoint {path} is damaged ({type(exc).__name__}: {exc})"
        ) from None


def _check_like(state: AdapterState, expected: AdapterState, path: Path) -> None:
    """Keys and shapes as the job's model and rank grid give them, every value finite."""
    if set(state.factors) != set(expected.factors):
        extra = sorted(set(state.factors) ^ set(expected.factors))[:3]
        raise CheckpointError(
            f"checkpoint {path} is not of this job: its adapted modules differ from the "
            f"job's model (first differences: {extra})"
        )
    if expected.head and set(state.head) != set(expected.head):
        raise CheckpointError(
            f"checkpoint {path} is not of this job: classifier head {sorted(state.head)} "
            f"differs from the model's {sorted(expected.head)}"
        )
    pairs = [
        (f"{key} {'AB'[i]}", state.factors[key][i], expected.factors[key][i])
        for key in sorted(expected.factors)
        for i in (0, 1)
    ] + [(f"head {n}", state.head[n], expected.head.get(n)) for n in sorted(state.head)]
    for what, got, want in pairs:
        if want is not None and got.shape != want.shape:
            raise CheckpointError(
                f"checkpoint {path} is not of this job: {what} has shape {got.shape}, the "
                f"job's model and rank grid give {want.shape}"
            )
        if not np.isfinite(got).all():
            raise CheckpointError(f"checkpoint {path} is damaged: {what} holds NaN or infinity")


def _last_intact(ck: Path, before: int | None = None) -> str:
    """A sentence naming the newest per-round checkpoint that still verifies (for messages)."""
    for state_path in sorted(ck.glob("round_[0-9][0-9][0-9][0-9].json"), reverse=True):
        try:
            state = _read_state(state_path)
            if before is not None and state["round"] >= before:
                continue
            npz = ck / state["global_state"]
            arrays = _load_arrays(npz)
            for a, b in arrays.factors.values():
                if not (np.isfinite(a).all() and np.isfinite(b).all()):
                    raise CheckpointError("not finite")
        except CheckpointError:
            continue
        return (
            f"the last intact checkpoint is round {state['round']} ({state_path}): copy it "
            f"over {ck / 'state.json'} to resume from there"
        )
    return "no earlier checkpoint is intact: start a new run with --out"


def _refuse(exc: CheckpointError, ck: Path, before: int | None) -> CheckpointError:
    return CheckpointError(f"cannot resume: {exc}; {_last_intact(ck, before)}")


def _load_checkpoint(
    out: Path, expected: AdapterState | None = None
) -> tuple[_Progress, AdapterState, dict[str, tuple[float, float, float]], OptimizerState | None]:
    """The last completed round's state, verified (fields, digests, keys, shapes, values)."""
    ck = out / "checkpoints"
    state_path = ck / "state.json"
    if not state_path.is_file():
        raise RunDirError(
            f"cannot resume {out}: {state_path} is missing (no completed round); "
            "start a new run with --out"
        )
    round_no: int | None = None
    try:
        state = _read_state(state_path)
        round_no = state["round"]
        npz = ck / state["global_state"]
        global_state = _load_arrays(npz)
        if expected is not None:
            _check_like(global_state, expected, npz)
        entry = state.get("server_optimizer")
        optimizer = None
        if entry:
            try:
                optimizer = OptimizerState.load(ck, entry)
            except FederationInputError as exc:
                raise CheckpointError(f"server optimizer checkpoint is damaged: {exc}") from None
            except Exception as exc:
                raise CheckpointError(
                    f"server optimizer checkpoint in {ck} is damaged ({type(exc).__name__})"
                ) from None
            for moment in (optimizer.m, optimizer.v, optimizer.count):
                if moment is not None and expected is not None:
                    _check_like(moment, expected, ck / f"{state_path.name} server_optimizer")
    except CheckpointError as exc:
        raise _refuse(exc, ck, round_no) from None
    estimates = {
        str(k): (float(v[0]), float(v[1]), float(v[2])) for k, v in state["estimates"].items()
    }
    progress = _Progress(**state["progress"])
    if progress.round != state["round"]:
        raise _refuse(
            CheckpointError(f"{state_path} is damaged: `progress.round` != `round`"), ck, None
        )
    return progress, global_state, estimates, optimizer


# Keys naming input files: with ``inputs.json`` their contents are compared by digest, so a
# run folder moved together with its inputs still resumes.
_INPUT_PATHS = (
    ("job", "fleet"),
    ("job", "topology"),
    ("data", "dataset"),
    ("planner", "calibration"),
)


def _comparable(cfg: JobConfig, *, paths: bool = True) -> dict[str, Any]:
    data = cfg.to_dict()
    data["job"].pop("rounds", None)
    if not paths:
        for section, key in _INPUT_PATHS:
            if Path(str(data[section][key])).is_absolute():
                data[section][key] = "<file>"
    return data


# Files and folders a run directory may hold (a folder holding anything else is the user's).
RUN_DIR_ENTRIES = frozenset(
    {
        "config.toml",
        "inputs.json",
        "calibration.json",
        "plans",
        "rounds.csv",
        "devices.csv",
        "links.csv",
        "checkpoints",
        "adapter",
        "summary.json",
        "run.log",
        "flower_status.json",
    }
)
INPUTS_FILE = "inputs.json"


def _file_digest(path: str) -> dict[str, str]:
    p = Path(path)
    return {"path": str(p), "sha256": _sha256(p) if p.is_file() else "missing"}


def input_digests(cfg: JobConfig) -> dict[str, Any]:
    """SHA-256 of every input of a run: the job (less ``job.rounds``), the fleet, the
    topology, the data set and the model, as recorded in ``inputs.json``."""
    digests: dict[str, Any] = {
        "job": {"path": cfg.source, "sha256": _job_sha256(_comparable(cfg, paths=False))},
        "fleet": _file_digest(cfg.job.fleet),
    }
    if cfg.job.topology:
        digests["topology"] = _file_digest(cfg.job.topology)
    if Path(cfg.planner.calibration).is_absolute():
        digests["calibration"] = _file_digest(cfg.planner.calibration)
    dataset = cfg.data.dataset
    digests["dataset"] = (
        _file_digest(dataset) if Path(dataset).is_file() else {"name": dataset, "sha256": ""}
    )
    model = Path(cfg.job.model)
    config = model / "config.json" if model.is_dir() else model
    digests["model"] = (
        _file_digest(str(config)) if config.is_file() else {"name": cfg.job.model, "sha256": ""}
    )
    return digests


# Options whose absence from a run's saved config.toml means a behaviour other than their
# default: the legend that wrote the file did not have the option and behaved as this value,
# in the jobs where the option matters. (Options added without a change of behaviour need
# no entry: absent means their default.)
def _saturates_by_default(cfg: JobConfig) -> bool:
    """Whether ``saturation = "auto"`` plans ``cfg`` otherwise than the additive model: a
    coverage response is stored with its model's prior (docs/planner.md)."""
    if cfg.planner.objective != "progress":
        return False
    from legend.models.errors import ModelInputError
    from legend.models.priors import progress_prior

    try:
        prior = progress_prior(cfg.job.model)
    except ModelInputError:
        return False
    return prior is not None and prior.coverage_response is not None


OLDER_BEHAVIOUR: dict[tuple[str, str], tuple[Any, Callable[[JobConfig], bool]]] = {
    # before it existed the server optimizer stepped every parameter every round
    ("federation", "server_lazy"): (False, lambda c: c.federation.server_optimizer != "none"),
    # before it existed the progress objective valued every device's slots additively
    ("planner", "saturation"): ("none", _saturates_by_default),
}


def _saved_raw(saved: Path) -> dict[str, Any] | None:
    import tomllib

    try:
        return tomllib.loads(saved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def _older_behaviour(raw: Mapping[str, Any], cfg: JobConfig) -> dict[tuple[str, str], Any]:
    """The entries of :data:`OLDER_BEHAVIOUR` that matter to ``cfg`` and that a saved
    ``config.toml`` (``raw``) does not list: how the legend that wrote it behaved."""
    return {
        (section, key): value
        for (section, key), (value, matters) in OLDER_BEHAVIOUR.items()
        if matters(cfg) and not (isinstance(raw.get(section), dict) and key in raw[section])
    }


def _saved_job(saved: Path, inputs_of: JobConfig | None = None) -> JobConfig:
    """The job a run directory's ``config.toml`` describes, as the legend that wrote it ran
    it: options it does not list that changed behaviour when added take their older value.

    ``inputs_of``: where the run recorded its input files' digests, the input files (fleet,
    topology, data set, calibration) are compared by digest, not by path; a recorded path
    that no longer exists is then taken from this job, so that a run whose checkout moved
    can still be compared (the digests are checked separately)."""
    from legend.federation.job import load_job

    overrides = {}
    raw = _saved_raw(saved) or {}
    for section, key in _INPUT_PATHS if inputs_of is not None else ():
        recorded = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        given = str(getattr(getattr(inputs_of, section), key))
        if (
            isinstance(recorded, str)
            and Path(recorded).is_absolute()
            and not Path(recorded).is_file()
            and Path(given).is_absolute()
        ):
            overrides[f"{section}__{key}"] = given
    cfg = load_job(saved, **overrides)
    for (section, key), value in _older_behaviour(raw, cfg).items():
        cfg = cfg.override(section, **{key: value})
    return cfg


def _older_behaviour_hint(cfg: JobConfig, saved: Path) -> str:
    """What to set to resume a run whose legend behaved otherwise than ``cfg`` asks."""
    raw = _saved_raw(saved) or {}
    differ = [
        (f"{section}.{key}", f'"{value}"' if isinstance(value, str) else str(value).lower())
        for (section, key), value in _older_behaviour(raw, cfg).items()
        if getattr(getattr(cfg, section), key) != value
    ]
    if not differ:
        return ""
    names = ", ".join(name for name, _ in differ)
    settings = ", ".join(f"{name} = {value}" for name, value in differ)
    return (
        f"; the run was started by an earlier legend without {names}: to continue it as it "
        f"ran, set {settings} in the job"
    )


def _job_digest_of_older_options(cfg: JobConfig, saved: Path) -> str | None:
    """The job's digest as the legend that started the run at ``saved`` computed it.

    A run records the digest of its job over the options its legend knew. An option added
    since, left at the value that matches how that legend behaved (its default, or its
    :data:`OLDER_BEHAVIOUR` value), does not change the job; so the options its
    ``config.toml`` does not list are left out (keys whose value is ``None``, which TOML
    cannot write, stay in). ``None`` where such an option is set otherwise, or the file
    cannot be read: the job has changed.
    """
    import dataclasses

    raw = _saved_raw(saved)
    if raw is None:
        return None
    data = _comparable(cfg, paths=False)
    older = _older_behaviour(raw, cfg)
    for section, values in data.items():
        listed = raw.get(section, {})
        if not isinstance(listed, dict):
            return None
        defaults = {
            f.name: older.get((section, f.name), f.default)
            for f in dataclasses.fields(getattr(cfg, section))
            if f.default is not dataclasses.MISSING
        }
        for key in [k for k in values if k not in listed and values[k] is not None]:
            if key not in defaults or values[key] != defaults[key]:
                return None
            del values[key]
    return _job_sha256(data)


def _with_unread_from_run(cfg: JobConfig, saved: Path) -> JobConfig:
    """``cfg`` with the run's values of the options its method does not read
    (:func:`~legend.federation.methods.unread_options`; a changed default of such an option,
    such as ``planner.seconds_per_mb`` for ``greedy``, must not block a resume)."""
    from legend.federation.methods import unread_options

    raw = _saved_raw(saved) or {}
    for section, key in unread_options(cfg):
        listed = raw.get(section)
        if isinstance(listed, dict) and key in listed:
            try:
                cfg = cfg.override(section, **{key: listed[key]})
            except (TypeError, ValueError, FederationInputError):
                continue  # not a value this legend accepts: the comparison names it
    return cfg


def _job_differences(before: Mapping[str, Any], now: Mapping[str, Any], most: int = 4) -> str:
    """``section.key = <run's value> in the run, <job's value> now`` for each key that
    differs (the first ``most``), so that the user can set the run's value to continue it."""
    out = []
    for section in sorted(set(before) | set(now)):
        a, b = before.get(section) or {}, now.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key} = {a.get(key)!r} in the run, {b.get(key)!r} now")
    more = f" and {len(out) - most} more" if len(out) > most else ""
    return "; ".join(out[:most]) + more


def _job_sha256(data: Mapping[str, Any]) -> str:
    """The digest ``inputs.json`` records of a job's comparable form."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _changed_inputs(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    changed = []
    for key in ("job", "fleet", "topology", "dataset", "model", "calibration"):
        before, after = recorded.get(key), now.get(key)
        if before is None and after is None:
            continue
        if not isinstance(before, dict) or not isinstance(after, dict):
            changed.append(f"{key} (added or removed)")
        elif before.get("sha256") != after.get("sha256") or before.get("name") != after.get("name"):
            where = after.get("path") or after.get("name") or ""
            changed.append(f"{key} ({where})" if where else key)
    return changed


def check_run_dir(cfg: JobConfig, out: Path, resume: bool) -> None:
    """The run-directory rules, checked before anything is loaded or written.

    A new run refuses a file, a directory that already holds a run, and a non-empty folder
    that is not a legend run directory (the user's files). A resume needs the run's
    ``config.toml`` (the same job but for ``job.rounds``), the same inputs as recorded in
    ``inputs.json`` and at least one completed round.
    """
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run directory {out} is a file; give a folder with --out")
    if resume:
        if not out.is_dir():
            raise RunDirError(f"cannot resume {out}: the run directory does not exist")
        saved = out / "config.toml"
        if not saved.is_file():
            raise RunDirError(
                f"cannot resume {out}: {saved} is missing (not a legend run directory)"
            )
        for name in ("config.toml", INPUTS_FILE, "calibration.json", "checkpoints"):
            if (out / name).exists() and not (out / name).resolve().is_relative_to(out.resolve()):
                raise RunDirError(
                    f"cannot resume {out}: {out / name} leads outside the run directory"
                )
        cfg = _with_unread_from_run(cfg, saved)
        recorded_path = out / INPUTS_FILE
        paths = not recorded_path.is_file()  # without digests, the same files by path
        saved_job = _saved_job(saved, inputs_of=None if paths else cfg)
        before, now = _comparable(saved_job, paths=paths), _comparable(cfg, paths=paths)
        if before != now:
            raise RunDirError(
                f"cannot resume {out}: the job differs from the one it was started with "
                f"({saved}): {_job_differences(before, now)}; only job.rounds may change: "
                "set these as the run has them, or start a new run with --out"
                f"{_older_behaviour_hint(cfg, saved)}"
            )
        if recorded_path.is_file():
            try:
                recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RunDirError(
                    f"cannot resume {out}: {recorded_path} is damaged ({exc})"
                ) from None
            if not isinstance(recorded, dict):
                raise RunDirError(f"cannot resume {out}: {recorded_path} is damaged")
            changed = _changed_inputs(recorded, input_digests(cfg))
            job = recorded.get("job")
            if (
                changed
                and changed[0].startswith("job")
                and isinstance(job, dict)
                and _job_digest_of_older_options(cfg, saved) == job.get("sha256")
            ):
                # started by an older legend: options added since are at their defaults
                changed = changed[1:]
            if changed:
                raise RunDirError(
                    f"cannot resume {out}: input changed since the run started: "
                    f"{', '.join(changed)} (digests in {recorded_path}); only job.rounds may "
                    "change: restore the inputs or start a new run with --out"
                )
        if not (out / "checkpoints" / "state.json").is_file():
            raise RunDirError(
                f"cannot resume {out}: no completed round (checkpoints/state.json missing); "
                "start a new run with --out"
            )
        # verified now, before the model and data load (the head's shape is checked then)
        spec = get_model_spec(cfg.job.model, target_modules=cfg.train.target_modules)
        _load_checkpoint(out, init_global(spec, max(cfg.train.ranks), {}, seed=cfg.job.seed))
        return
    if not out.is_dir():
        return
    if (out / "checkpoints").exists():
        raise RunDirError(
            f"run directory {out} already holds a run; continue it with --resume {out} "
            "or choose another --out"
        )
    entries = sorted(e.name for e in out.iterdir())
    foreign = [name for name in entries if name not in RUN_DIR_ENTRIES]
    if entries and "config.toml" not in entries:
        foreign = entries
    if foreign:
        raise RunDirError(
            f"--out {out} is a folder with other files ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}), not a legend run directory; "
            "give a new or empty folder"
        )


def prepare_run_dir(cfg: JobConfig, out: Path, resume: bool) -> frozenset[str] | None:
    """Check the rules and create the run directory; returns the names it held before
    (``None``: this call created it), so that a failed start can remove what it wrote."""
    check_run_dir(cfg, out, resume)
    before = snapshot(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "plans").mkdir(exist_ok=True)
        probe = out / ".legend-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if before is None and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        raise RunDirError(
            f"run directory {out} cannot be written ({exc.strerror or exc}); choose another --out"
        ) from None
    return before


def snapshot(out: Path) -> frozenset[str] | None:
    """The names a folder holds (``None``: it does not exist), for :func:`discard_failed_start`."""
    return frozenset(e.name for e in out.iterdir()) if out.is_dir() else None


def discard_failed_start(out: Path, before: frozenset[str] | None) -> str:
    """After a new run failed: remove what it wrote if it completed no round, and say what
    happened to the run directory (one sentence for the terminal; "" when nothing changed)."""
    if not out.is_dir():
        return ""
    had_rounds = before is not None and "checkpoints" in before
    if (out / "checkpoints" / "state.json").is_file() and not had_rounds:
        return f"the completed rounds are kept in {out}; continue with --resume {out}"
    if before is None:
        shutil.rmtree(out, ignore_errors=True)
        return f"removed the unfinished run directory {out}"
    removed = 0
    for entry in out.iterdir():
        if entry.name in RUN_DIR_ENTRIES and entry.name not in before:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return f"removed the files the failed start wrote in {out}" if removed else ""


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
        r_max = max(cfg.train.ranks)
        if resume:
            expected = init_global(p.spec, r_max, p.initial_head, seed=cfg.job.seed)
            progress, global_state, estimates, optimizer_state = _load_checkpoint(out, expected)
            for name in _RECORDS:
                _truncate_csv(out / name, progress.round)
            self.calibration = Calibration.load(cal_file) if cal_file.is_file() else None
        else:
            (out / "config.toml").write_text(cfg.to_toml())
            _atomic_json(out / INPUTS_FILE, input_digests(cfg))
            self.calibration = p.calibration
            if self.calibration is not None:
                self.calibration.save(cal_file)
            for name in _RECORDS:
                (out / name).unlink(missing_ok=True)
            progress = _Progress(accepted_updates=0)
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
            prefix_built=progress.prefix_built,
        )
        if progress.progress_model is not None:
            try:
                self.server.progress_model.restore(progress.progress_model)
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(
                    f"cannot resume {out}: the progress model in its checkpoint is damaged "
                    f"({exc}); start a new run with --out"
                ) from None
        self.last_round = cfg.job.rounds if stop_after is None else min(cfg.job.rounds, stop_after)
        self._round_start = 0.0
        self._server_time = 0.0
        self._probe: tuple[float, ...] | None = None

    def pending_rounds(self) -> range:
        return range(self.progress.round + 1, self.last_round + 1)

    def start_round(self, t: int, available: Sequence[str] | None = None) -> tuple[Any, list[Any]]:
        """Select, plan and slice round ``t``; the plan is written before training starts."""
        self._round_start = time.perf_counter()
        p = self.prepared
        if p.validation is not None and math.isnan(self.progress.val_loss):
            # the validation loss the first round's drop is measured from
            from legend.federation.training import evaluate

            with p.host.evaluation_model(self.server.global_state) as model:
                _, self.progress.val_loss = evaluate(
                    model, p.validation, batch_size=self.cfg.federation.eval_batch_size
                )
        ids = self.server.select(t, available)
        if self.progress.server_time_s is None:
            # The server's time per round is measured once, in the first round: plan once
            # untimed first, so one-off costs (imports, a solver's worker process) do not
            # stay on every round of the simulated clock, then keep the fastest of
            # PLAN_TIMING_REPEATS timed plans (the same plan each time: a busy host can only
            # slow it down, and the clock must not depend on how busy it was).
            previous = self.server.last_plan
            self.server.plan(t, ids)
            repeats = PLAN_TIMING_REPEATS
        else:
            previous, repeats = self.server.last_plan, 1
        plan_time = math.inf
        for _ in range(repeats):
            self.server.last_plan = previous
            with _ServerTimer() as timer:
                plan = self.server.plan(t, ids)
            plan_time = min(plan_time, timer.seconds)
        with _ServerTimer() as timer:
            instructions = self.server.instructions(t, plan)
        self._server_time = plan_time + timer.seconds
        self._probe = self._probe_layers()
        plan.save(self.out / "plans" / f"round_{t:04d}.json")
        return plan, instructions

    def _probe_layers(self) -> tuple[float, ...] | None:
        """The server's probe of the global state the round starts from: per layer, the
        gain of a gradient step on its adapter, on the first ``federation.probe_examples``
        validation examples (None where the probe is off or there is no validation split).

        The server runs it while the devices train, so the simulated clock charges only
        what it takes beyond the round's devices (its host time, measured once, in the first
        round that probes: see :meth:`complete_round`)."""
        from legend.federation.methods import plans_on_progress_model
        from legend.federation.training import probe_layer_decrease

        cfg, p = self.cfg, self.prepared
        examples = cfg.federation.probe_examples
        if examples <= 0 or p.validation is None or not plans_on_progress_model(cfg):
            return None
        with _ServerTimer() as timer, p.host.activate_global(self.server.global_state) as model:
            probe = probe_layer_decrease(
                model,
                p.validation,
                p.host.layer_parameters(),
                p.spec.num_layers,
                examples=examples,
                batch_size=cfg.federation.eval_batch_size,
            )
        if self.progress.probe_time_s is None:
            self.progress.probe_time_s = timer.seconds
        return probe

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
        with _ServerTimer() as timer:
            result = self.server.finish_round(t, plan, replies, missing=missing, probe=self._probe)
        server_time = self._server_time + timer.seconds
        accuracy, test_loss = math.nan, math.nan
        if t % cfg.federation.eval_every == 0 or t == self.last_round:
            if status is not None:
                status(f"round {t}: evaluating")
            with p.host.evaluation_model(result.global_state) as model:
                accuracy, test_loss = evaluate(
                    model, p.test, batch_size=cfg.federation.eval_batch_size
                )
        val_loss = math.nan
        if p.validation is not None:
            with p.host.evaluation_model(result.global_state) as model:
                _, val_loss = evaluate(
                    model, p.validation, batch_size=cfg.federation.eval_batch_size
                )
        host_time = time.perf_counter() - self._round_start
        row = dict(result.round_row)
        if progress.server_time_s is None:
            progress.server_time_s = server_time
        row["server_time_s"] = progress.server_time_s
        # the validation loss's drop checks the progress model's prediction for the round
        drop = progress.val_loss - val_loss
        self.server.progress_model.observe_validation(drop, float(row["predicted_progress"]))
        row["val_loss"] = val_loss
        row["val_loss_drop"] = drop
        progress.val_loss = val_loss
        progress.progress_model = self.server.progress_model.to_dict()
        progress.prefix_built = sorted(self.server.prefix_built)
        # the probe ran while the devices trained: only what it took beyond them counts
        probe_wait = (
            max(0.0, progress.probe_time_s - row["sim_time_s"])
            if self._probe is not None and progress.probe_time_s is not None
            else 0.0
        )
        row["sim_time_s"] = row["sim_time_s"] + progress.server_time_s + probe_wait
        if progress.accepted_updates is not None:
            progress.accepted_updates += int(row["participants"])
        if result.rejected:
            device, reason = sorted(result.rejected.items())[0]
            progress.last_rejection = f"round {t}, device {device}: {reason}"
        progress.all_rejected = bool(result.rejected) and int(row["participants"]) == 0
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
        for device, reason in sorted(result.rejected.items())[:_REJECTIONS_SHOWN]:
            self.console.print(f"  rejected {device}: {reason}", markup=False, highlight=False)
        if len(result.rejected) > _REJECTIONS_SHOWN:
            self.console.print(
                f"  ... and {len(result.rejected) - _REJECTIONS_SHOWN} more rejected "
                f"(see {self.out / 'run.log'})",
                markup=False,
                highlight=False,
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
        failed = ""
        if finished and progress.accepted_updates == 0:
            failed = (
                f"no update was accepted in {progress.round} rounds (last rejection: "
                f"{progress.last_rejection or 'none; every device dropped out'}); the adapter "
                "is the initial one"
            )
        elif finished and progress.all_rejected:
            failed = (
                f"every update of the last round was rejected ({progress.last_rejection}); "
                "the adapter stopped improving: lower train.learning_rate or check the data"
            )
        if failed:
            summary["failed"] = failed
        _atomic_json(self.out / "summary.json", summary)
        if failed:
            raise RunFailedError(f"run {self.out} failed: {summary['failed']}")
        return RunResult(
            out_dir=self.out,
            rounds_completed=progress.round,
            final_accuracy=progress.accuracy,
            global_state=global_state,
            summary=summary,
        )
