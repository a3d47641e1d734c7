"""Job files: one TOML file describes a federated fine-tuning run.

Example (``examples/tiny.toml``)::

    [job]
    model = "tiny-bert"
    fleet = "fleet.csv"          # relative to this file
    method = "exact"
    rounds = 3

    [train]
    local_steps = 4

Every section and key is optional except ``job.fleet``; unknown sections or keys, wrong types
and out-of-range values raise :class:`JobError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from legend.federation.errors import FederationInputError
from legend.models.errors import ModelInputError
from legend.models.spec import get_model_spec
from legend.planner.errors import PlannerInputError
from legend.planner.profiles import JobParams, parse_rank_grid
from legend.planner.types import PlannerOptions

__all__ = [
    "AGGREGATIONS",
    "METHODS",
    "DataSection",
    "FederationSection",
    "JobConfig",
    "JobError",
    "JobSection",
    "PlannerSection",
    "TrainSection",
    "load_job",
]

METHODS = (
    "exact",
    "greedy",
    "greedy-learned",
    "uniform",
    "hetlora",
    "fedra",
    "depth-only",
    "rank-only",
)
AGGREGATIONS = ("auto", "slotwise", "hetlora", "flexlora", "ffa")
ENGINES = ("inprocess", "flower-sim", "flower-deploy")
LOSSES = ("cross-entropy", "logit-adjusted")
OPTIMIZERS = ("adamw", "sgd")
SERVER_OPTIMIZERS = ("none", "momentum", "adam")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class JobError(FederationInputError):
    """A job file or override that cannot be used. Exit status 2."""


@dataclass(frozen=True, kw_only=True)
class JobSection:
    """``[job]``: what to run."""

    name: str = "legend-job"
    model: str = "all-MiniLM-L6-v2"
    fleet: str = ""
    topology: str = ""  # network topology file (links the devices share); "" = private links
    method: str = "exact"
    rounds: int = 10
    seed: int = 0
    devices_per_round: int = 0  # 0: every device every round; else a seeded sample
    target_accuracy: float | None = None
    engine: str = "inprocess"


@dataclass(frozen=True, kw_only=True)
class TrainSection:
    """``[train]``: the local workload (mirrors :class:`~legend.planner.profiles.JobParams`)."""

    batch_size: int = 16
    seq_len: int = 64
    local_steps: int = 10
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    # "cross-entropy", or "logit-adjusted": cross-entropy on logits shifted by the log of the
    # device's own label distribution (balanced softmax), against label skew; see docs/federation.md
    loss: str = "cross-entropy"
    # the local optimizer: "adamw" or "sgd" (plain SGD at train.learning_rate)
    optimizer: str = "adamw"
    target_modules: str | tuple[str, ...] = "qv"
    ranks: tuple[int, ...] = (2, 4, 8, 16)
    lora_scale: float = 2.0
    bytes_per_param: int = 4
    weight_precision: str = "fp32"
    uniform_rank: int = 8  # the rank of the `uniform`, `fedra` and `depth-only` methods
    threads: int = 0  # torch threads; 0 = torch's default
    # where the host trains and evaluates: "cpu", "cuda" or "auto" (cuda when available).
    # The simulated device clock does not depend on it; on cuda, runs are repeatable on
    # the same machine but not bit-identical to cpu runs.
    device: str = "cpu"
    # each device keeps the output of its frozen layers below the adapted block (computed
    # once, without dropout, in its first round that reads it) and runs forward only from
    # its lowest adapted layer; bert and roberta models. See docs/costs.md, "The
    # frozen-prefix cache"
    cache_prefix: bool = False


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """``[data]``: the data set and how it is split over devices."""

    dataset: str = "rotten_tomatoes"
    test_fraction: float = 0.2
    max_train: int = 0  # 0: all
    max_test: int = 1000
    alpha: float = 0.5
    quantity_skew: float = 0.0
    min_samples: int = 8
    samples_from_fleet: bool = False  # use the fleet's num_samples as partition sizes
    # held out of the train split by the server (never the test split): its loss each
    # round checks the progress model (at most a tenth of the train split; 0: none)
    validation_size: int = 256


@dataclass(frozen=True, kw_only=True)
class PlannerSection:
    """``[planner]``: every :class:`~legend.planner.types.PlannerOptions` field, with the
    same names and defaults as the API and ``legend plan``, plus how the run uses the
    planner (``use_topology``, ``calibration``). :meth:`options` builds the options;
    :func:`_validate` checks them where the file is read, naming the key."""

    objective: str = PlannerOptions.objective
    deadline_s: float | None = PlannerOptions.deadline_s
    utility_floor: float | None = PlannerOptions.utility_floor
    utility_floor_share: float = PlannerOptions.utility_floor_share
    solver: str = PlannerOptions.solver
    time_limit_s: float = PlannerOptions.time_limit_s
    mip_gap: float = PlannerOptions.mip_gap
    monotone_ranks: bool = PlannerOptions.monotone_ranks
    min_depth: int = PlannerOptions.min_depth
    allow_dropping: bool = PlannerOptions.allow_dropping
    server_mbps: float | None = PlannerOptions.server_mbps
    coverage_layers: int = PlannerOptions.coverage_layers
    coverage_share: float = PlannerOptions.coverage_share
    min_participants: int = PlannerOptions.min_participants
    min_sample_share: float = PlannerOptions.min_sample_share
    layer_weights: str | tuple[float, ...] = PlannerOptions.layer_weights
    rank_gains: str | tuple[float, ...] = PlannerOptions.rank_gains
    saturation: str | tuple[float, ...] = PlannerOptions.saturation
    seconds_per_mb: float | str = PlannerOptions.seconds_per_mb
    server_overhead_s: float = PlannerOptions.server_overhead_s
    use_classes: bool | None = PlannerOptions.use_classes
    threads: int | None = PlannerOptions.threads
    use_topology: bool = True  # false: plan blind to job.topology (the clock still applies it)
    calibration: str = "auto"  # "auto": time the host once per run; "none": analytic; or a file

    def options(self) -> PlannerOptions:
        """The :class:`PlannerOptions` of this section."""
        return PlannerOptions(**{f.name: getattr(self, f.name) for f in fields(PlannerOptions)})


@dataclass(frozen=True, kw_only=True)
class FederationSection:
    """``[federation]``: aggregation, capacity estimation, simulated clock and faults."""

    aggregation: str = "auto"  # auto: hetlora for `hetlora`, slot-wise otherwise
    ema: float = 0.8
    jitter: float = 0.0  # sigma of a log-normal factor on simulated compute and link times
    dropout_prob: float = 0.0
    corrupt_prob: float = 0.0
    timeout_factor: float = 1.5  # a dropped device makes the server wait this x planned time
    eval_every: int = 1
    eval_batch_size: int = 64
    # how the global state moves toward each round's aggregate: "none" (FedAvg), "momentum"
    # (FedAvgM) or "adam" (FedAdam); see federation/server_opt.py and docs/federation.md
    server_optimizer: str = "none"
    server_lr: float = 1.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    # step only the layers and rank slots the round trained (lazy FedOpt; docs/federation.md)
    server_lazy: bool = True
    # the server's probe of every layer's gain on this many of its validation examples, every
    # round, for the methods that plan on the progress model (0: off; docs/planner.md)
    probe_examples: int = 0


_SECTIONS: dict[str, type] = {
    "job": JobSection,
    "train": TrainSection,
    "data": DataSection,
    "planner": PlannerSection,
    "federation": FederationSection,
}


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """A resolved job: every section, with the fleet path made absolute."""

    job: JobSection = field(default_factory=JobSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    planner: PlannerSection = field(default_factory=PlannerSection)
    federation: FederationSection = field(default_factory=FederationSection)
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def job_params(self) -> JobParams:
        t = self.train
        return JobParams(
            batch_size=t.batch_size,
            seq_len=t.seq_len,
            local_steps=t.local_steps,
            bytes_per_param=t.bytes_per_param,
            weight_precision=t.weight_precision,
            target_modules=t.target_modules,
            ranks=t.ranks,
            train_head=True,
            lora_scale=t.lora_scale,
            cache_prefix=t.cache_prefix,
        )

    @property
    def aggregation(self) -> str:
        rule = self.federation.aggregation
        if rule == "auto":
            return "hetlora" if self.job.method == "hetlora" else "slotwise"
        return rule

    def override(self, section: str, **changes: Any) -> JobConfig:
        """A copy with keys of one section replaced (validated again)."""
        current = getattr(self, section)
        updated = _coerce_section(section, {**dataclasses.asdict(current), **changes}, self.source)
        return replace(self, **{section: updated})

    def to_toml(self) -> str:
        """The resolved job as TOML (written into every run directory)."""
        lines: list[str] = []
        for name in _SECTIONS:
            lines.append(f"[{name}]")
            for f in fields(getattr(self, name)):
                value = getattr(getattr(self, name), f.name)
                if value is None:
                    continue
                lines.append(f"{f.name} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except JobError as exc:
                errors.append(str(exc))
        allowed = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise JobError(f"{source}: `{key}` = {value!r} must be {allowed}")
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise JobError(f"{source}: `{key}` = {value!r} must be a list of {_type_name(inner)}")
        return tuple(_coerce(v, inner, key, source) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise JobError(f"{source}: `{key}` = {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobError(f"{source}: `{key}` = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise JobError(f"{source}: `{key}` = {value!r} must be a number")
        if not math.isfinite(value):
            raise JobError(f"{source}: `{key}` = {value!r} must be finite")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise JobError(f"{source}: `{key}` = {value!r} must be a string")
        return value
    raise TypeError(tp)


def _coerce_section(name: str, raw: Mapping[str, Any], source: str) -> Any:
    cls = _SECTIONS[name]
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in allowed:
            raise JobError(
                f"{source}: unknown key `{name}.{key}`; allowed keys in [{name}] are "
                f"{', '.join(allowed)}"
            )
        values[key] = _coerce(value, hints[key], f"{name}.{key}", source)
    return cls(**values)


def _choice(source: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise JobError(
            f"{source}: `{key}` = {value!r} is not allowed; use one of {', '.join(allowed)}"
        )


def _positive(source: str, key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise JobError(f"{source}: `{key}` = {value!r} must be {'>= 0' if zero_ok else '> 0'}")


def _validate(cfg: JobConfig) -> None:
    s = cfg.source
    j, t, d, p, f = cfg.job, cfg.train, cfg.data, cfg.planner, cfg.federation
    _choice(s, "job.method", j.method, METHODS)
    _choice(s, "job.engine", j.engine, ENGINES)
    try:
        p.options()
    except PlannerInputError as exc:
        # name the key as the job file spells it: `field` -> `planner.field`
        message = re.sub(r"`(\w+)`", lambda m: f"`planner.{m.group(1)}`", str(exc), count=1)
        raise JobError(f"{s}: {message}") from None
    _choice(s, "federation.aggregation", f.aggregation, AGGREGATIONS)
    if not _NAME.fullmatch(j.name):
        raise JobError(
            f"{s}: `job.name` = {j.name!r} must be 1-100 letters, digits, '.', '_' or '-' "
            "starting with a letter or digit (it names the run directory)"
        )
    _positive(s, "job.rounds", j.rounds)
    _positive(s, "job.devices_per_round", j.devices_per_round, zero_ok=True)
    for key in ("batch_size", "seq_len", "local_steps", "bytes_per_param", "uniform_rank"):
        _positive(s, f"train.{key}", getattr(t, key))
    _positive(s, "train.learning_rate", t.learning_rate)
    _choice(s, "train.loss", t.loss, LOSSES)
    _choice(s, "train.optimizer", t.optimizer, OPTIMIZERS)
    _choice(s, "train.device", t.device, ("cpu", "cuda", "auto"))
    _choice(s, "federation.server_optimizer", f.server_optimizer, SERVER_OPTIMIZERS)
    _positive(s, "federation.server_lr", f.server_lr)
    _positive(s, "federation.server_tau", f.server_tau)
    for key in ("server_beta1", "server_beta2"):
        if not 0 <= getattr(f, key) < 1:
            raise JobError(f"{s}: `federation.{key}` = {getattr(f, key)} must be in [0, 1)")
    _positive(s, "train.threads", t.threads, zero_ok=True)
    try:
        ranks = parse_rank_grid(t.ranks)
    except ValueError as exc:
        raise JobError(f"{s}: `train.ranks`: {exc}") from None
    if t.uniform_rank not in ranks:
        raise JobError(
            f"{s}: `train.uniform_rank` = {t.uniform_rank} must be one of train.ranks {list(ranks)}"
        )
    if not 0 < d.test_fraction < 1:
        raise JobError(f"{s}: `data.test_fraction` = {d.test_fraction} must be in (0, 1)")
    _positive(s, "data.alpha", d.alpha)
    _positive(s, "data.quantity_skew", d.quantity_skew, zero_ok=True)
    _positive(s, "data.max_train", d.max_train, zero_ok=True)
    _positive(s, "data.max_test", d.max_test, zero_ok=True)
    if not 0 < f.ema <= 1:
        raise JobError(f"{s}: `federation.ema` = {f.ema} must be in (0, 1]")
    for key in ("dropout_prob", "corrupt_prob"):
        value = getattr(f, key)
        if not 0 <= value < 1:
            raise JobError(f"{s}: `federation.{key}` = {value} must be in [0, 1)")
    _positive(s, "federation.jitter", f.jitter, zero_ok=True)
    if f.timeout_factor < 1:
        raise JobError(f"{s}: `federation.timeout_factor` = {f.timeout_factor} must be >= 1")
    _positive(s, "federation.eval_every", f.eval_every)
    _positive(s, "federation.probe_examples", f.probe_examples, zero_ok=True)
    if f.probe_examples > 0 and d.validation_size <= 0:
        raise JobError(
            f"{s}: `federation.probe_examples` = {f.probe_examples} probes the server's "
            f"validation split, but `data.validation_size` = {d.validation_size} holds none "
            "out; set data.validation_size > 0, or federation.probe_examples = 0"
        )
    if j.target_accuracy is not None and not 0 < j.target_accuracy <= 1:
        raise JobError(f"{s}: `job.target_accuracy` = {j.target_accuracy} must be in (0, 1]")
    if j.topology and p.server_mbps is not None:
        raise JobError(
            f"{s}: `planner.server_mbps` and `job.topology` cannot be combined: model the "
            "server's link as a link to 'server' in the topology and drop planner.server_mbps"
        )
    if p.objective == "deadline" and p.deadline_s is None:
        raise JobError(f"{s}: `planner.deadline_s` is required when planner.objective = 'deadline'")


def _missing(path: Path) -> str:
    return "is a folder, not a file" if path.is_dir() else "does not exist"


def load_job(path: str | Path, **overrides: Any) -> JobConfig:
    """Read and validate a job file; ``overrides`` are ``section__key=value`` pairs."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise JobError(f"job file {source} {_missing(path)}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise JobError(f"job file {source} is not valid TOML: {exc}") from None
    for name, value in list(raw.items()):
        if name not in _SECTIONS:
            raise JobError(
                f"{source}: unknown section [{name}]; allowed sections are "
                f"{', '.join('[' + n + ']' for n in _SECTIONS)}"
            )
        if not isinstance(value, dict):
            raise JobError(f"{source}: `{name}` must be a table ([{name}])")
    for dotted, value in overrides.items():
        section, key = dotted.split("__", 1)
        raw.setdefault(section, {})[key] = value
    sections = {name: _coerce_section(name, raw.get(name, {}), source) for name in _SECTIONS}
    job: JobSection = sections["job"]
    if not job.fleet:
        raise JobError(f"{source}: `job.fleet` is required: a fleet file (.csv, .toml or .json)")
    fleet_path = Path(job.fleet)
    if not fleet_path.is_absolute():
        fleet_path = (path.parent / fleet_path).resolve()
    if not fleet_path.is_file():
        raise JobError(
            f"{source}: `job.fleet` = {job.fleet!r}: {fleet_path} {_missing(fleet_path)}"
        )
    sections["job"] = job = replace(job, fleet=str(fleet_path))
    if job.topology:
        topology_path = Path(job.topology)
        if not topology_path.is_absolute():
            topology_path = (path.parent / topology_path).resolve()
        if not topology_path.is_file():
            raise JobError(
                f"{source}: `job.topology` = {job.topology!r}: {topology_path} "
                f'{_missing(topology_path)}; give a topology file (.toml or .json) or "" for none'
            )
        sections["job"] = replace(job, topology=str(topology_path))
    try:
        spec = get_model_spec(job.model, target_modules=sections["train"].target_modules)
    except ModelInputError as exc:
        raise JobError(f"{source}: `job.model` / `train.target_modules`: {exc}") from None
    try:
        spec.check_ranks(parse_rank_grid(sections["train"].ranks), what="`train.ranks`")
    except (ModelInputError, ValueError) as exc:
        raise JobError(f"{source}: {exc}") from None
    data: DataSection = sections["data"]
    if data.dataset not in ("rotten_tomatoes", "imdb"):
        data_path = Path(data.dataset)
        if not data_path.is_absolute():
            data_path = (path.parent / data_path).resolve()
        if not data_path.is_file():
            raise JobError(
                f"{source}: `data.dataset` = {data.dataset!r}: expected 'rotten_tomatoes', "
                f"'imdb' or a CSV/JSONL file; {data_path} {_missing(data_path)}"
            )
        sections["data"] = replace(data, dataset=str(data_path))
    planner: PlannerSection = sections["planner"]
    if planner.calibration not in ("auto", "none"):
        cal_path = Path(planner.calibration)
        if not cal_path.is_absolute():
            cal_path = (path.parent / cal_path).resolve()
        if not cal_path.is_file():
            raise JobError(
                f"{source}: `planner.calibration` = {planner.calibration!r}: expected 'auto', "
                f"'none' or a calibration file; {cal_path} {_missing(cal_path)}"
            )
        sections["planner"] = replace(planner, calibration=str(cal_path))
    return JobConfig(source=source, **sections)
