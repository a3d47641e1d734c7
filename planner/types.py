"""The planner's core types: options, the planning problem, configurations, outcomes.

Every other planner module imports its types from here; nothing here imports a solver,
so the planner's modules form no import cycle (``types`` <- ``catalog`` <- ``sweep`` /
``formulation`` <- ``solvers`` <- ``registry`` <- ``api``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from legend.models.priors import ProgressPrior, progress_prior
from legend.models.spec import ModelSpec
from legend.planner.costs import Calibration, CostModel
from legend.planner.errors import PlannerInputError
from legend.planner.plan import inputs_digest
from legend.planner.profiles import Fleet, JobParams
from legend.planner.saturation import Saturation, plan_progress, saturation_curve, slot_gains

if TYPE_CHECKING:
    from legend.planner.plan import Plan
    from legend.planner.topology import Topology

__all__ = [
    "AUTO_PRICE",
    "DEFAULT_OBJECTIVE",
    "DEFAULT_SECONDS_PER_MB",
    "DEFAULT_SOLVER",
    "EXACT_BACKENDS",
    "LAYER_WEIGHTS",
    "OBJECTIVES",
    "RANK_GAINS",
    "RATIO_OBJECTIVES",
    "SATURATIONS",
    "SOLVER_NAMES",
    "TOPOLOGY_BLIND_SOLVERS",
    "Configuration",
    "PlannerOptions",
    "PlanningProblem",
    "SolverOutcome",
    "auto_seconds_per_mb",
    "objective_value",
    "rank_gain",
]

OBJECTIVES = ("progress", "rate", "deadline", "min-time")
# Objectives that are a ratio "utility per (priced) second", solved by Dinkelbach steps.
RATIO_OBJECTIVES = ("progress", "rate")
DEFAULT_OBJECTIVE = "progress"
# ``seconds_per_mb = "auto"``: a megabyte costs what the median planned device's uplink
# spends carrying it (:func:`auto_seconds_per_mb`).
AUTO_PRICE = "auto"
# The default price of traffic under ``progress`` (docs/planner.md says how it was chosen).
DEFAULT_SECONDS_PER_MB: float | str = AUTO_PRICE
LAYER_WEIGHTS = ("auto", "prior", "linear", "uniform")
RANK_GAINS = ("auto", "prior", "log2")
SATURATIONS = ("auto", "prior", "none")
# "auto": the exact sweep where the program separates per device, the catalogue MILP on
# HiGHS (highspy) where coupling rows tie devices together (docs/planner.md).
DEFAULT_SOLVER = "auto"
# Backends of the catalogue MILP; naming one always solves the integer program.
EXACT_BACKENDS = ("highs", "pulp-highs", "pulp-cbc", "cvxpy-highs")
SOLVER_NAMES = ("auto", "sweep", "lagrangian", *EXACT_BACKENDS, "greedy", "brute-force")
# Heuristic and enumerating planners that do not model a network topology.
TOPOLOGY_BLIND_SOLVERS = ("greedy", "brute-force")

# A device's configuration: (layers ascending, ranks one per layer); () = not participating.
Configuration = tuple[tuple[int, ...], tuple[int, ...]]


def objective_value(
    objective: str, utility: float, round_time_s: float, priced_s: float = 0.0
) -> float:
    """A plan's objective: ``U / (T + priced_s)`` (``progress``; ``priced_s`` is the server's
    overhead plus the priced bytes), ``U / T`` (``rate``), ``U`` (``deadline``) or ``T``
    (``min-time``)."""
    if objective == "progress":
        denominator = round_time_s + priced_s
        return utility / denominator if denominator > 0 else 0.0
    if objective == "rate":
        return utility / round_time_s if round_time_s > 0 else 0.0
    if objective == "deadline":
        return utility
    return round_time_s


def rank_gain(rank: int) -> float:
    """The fixed utility of a rank, ``g(r) = log2(1 + r)`` (``rank_gains = "log2"``)."""
    return math.log2(1 + rank)


@dataclass(frozen=True, kw_only=True)
class PlannerOptions:
    """What the planner optimises and which optional constraints apply (docs/planner.md).

    Every field is also a key of a job file's ``[planner]`` section and (where it makes
    sense on a command line) a ``legend plan`` flag, with these defaults.

    Parameters
    ----------
    objective
        ``"progress"`` (default): maximise the progress model's expected progress per
        priced second, ``U / (T + server_overhead_s + seconds_per_mb * MB)``, with ``U``
        over the measured layer gains and rank response (``layer_weights`` and
        ``rank_gains`` ``"auto"``: the model's measured prior, or what a run has learned);
        ``"rate"`` (O3): maximise the fixed utility per second ``U / T``;
        ``"deadline"`` (O1): maximise ``U`` with every participant within ``deadline_s``;
        ``"min-time"`` (O2): minimise ``T`` with ``U >= utility_floor`` (absolute) or, when
        that is ``None``, ``U >= utility_floor_share * U_max``.
    solver
        One of :data:`SOLVER_NAMES`. ``"auto"`` (default) runs the exact sweep when no
        coupling row is active (with an exact cover when the participation floors C9 and
        C9s are the only ones), Lagrangian bounds for fleet-wide coupling rows on large
        fleets, and the catalogue MILP on HiGHS otherwise; ``"sweep"`` insists on the
        sweep, ``"lagrangian"`` on the Lagrangian planner; ``"highs"``, ``"pulp-highs"``,
        ``"pulp-cbc"`` and ``"cvxpy-highs"`` always solve the MILP; ``"greedy"`` is the LEGEND-style
        heuristic, ``"brute-force"`` the enumerating oracle for tiny fleets.
    time_limit_s, mip_gap
        Limits of the MILP; a time-limited stop returns ``FEASIBLE`` with the proven gap.
    monotone_ranks
        C4: ranks do not decrease toward the output.
    min_depth
        C3: minimum number of adapted layers of a participant.
    allow_dropping
        Let the program leave devices out; otherwise every device participates.
    server_mbps
        C7: capacity of the server's link (both directions together), ``None`` = unlimited.
        The round lasts at least as long as the link needs for the round's bytes.
    coverage_layers, coverage_share
        C8: each of the top ``coverage_layers`` layers is trained on at least
        ``coverage_share`` of the round's samples (0 disables). The samples are the
        participants'; every participant trains the output layer, so ``coverage_layers``
        is 0 or at least 2.
    min_participants
        C9 (only meaningful with ``allow_dropping``).
    min_sample_share
        C9s (with ``allow_dropping`` only): the participants hold at least this share of
        the samples of the devices being planned (the round's sampled devices in a run), so
        that a round's update is not the average of a few devices' skewed data (0 disables).
    layer_weights
        ``w_l`` of the utility: ``"auto"`` (default: the model's measured prior under
        ``progress`` where one is stored, else ``"linear"``), ``"prior"``, ``"linear"``
        (``(l+1)/L``), ``"uniform"``, or an explicit tuple of ``L`` weights ``>= 0``.
    rank_gains
        ``g(r)`` of the utility at each rank of the job's grid: ``"auto"`` (default: the
        measured prior's rank response under ``progress`` where one is stored, else
        ``"log2"``), ``"prior"``, ``"log2"`` (``log2(1 + r)``), or an explicit tuple of one
        positive, non-decreasing value per rank of the grid.
    saturation
        ``progress`` only: the coverage response ``H`` of the saturating progress model
        (:mod:`legend.planner.saturation`): a rank slot of a layer buys ``H(c)`` when ``c``
        mean-sized devices train it. ``"auto"`` (default: the response measured with the
        model's prior where one is stored, else ``"none"``), ``"prior"``, ``"none"`` (the
        additive model, ``H(c) = c``), or an explicit tuple ``h(1), h(2), ...``: the
        response at 1, 2, ... mean-sized devices (its least concave majorant is used,
        flat beyond the last point).
    seconds_per_mb
        ``progress`` only: the price of traffic, seconds of round time one megabyte moved
        (either way, every device) is worth, or ``"auto"`` (default): what the median
        planned device's uplink spends carrying it (:func:`auto_seconds_per_mb`), resolved
        when the problem is created, so a plan's options record the number used. 0 ignores
        bytes; 0.008 is what a 1 Gbit/s link spends (the default before ``"auto"``).
    server_overhead_s
        ``progress`` only: seconds the server adds to every round (aggregation,
        evaluation, planning), part of the round's wall clock.
    use_classes
        Compress devices with identical profiles into classes in the MILP (``True``),
        plan every device on its own (``False``), or decide automatically (``None``).
    threads
        Solver threads (``None``: the solver's default).
    """

    objective: str = DEFAULT_OBJECTIVE
    deadline_s: float | None = None
    utility_floor: float | None = None
    utility_floor_share: float = 0.5
    solver: str = DEFAULT_SOLVER
    time_limit_s: float = 60.0
    mip_gap: float = 1e-4
    monotone_ranks: bool = True
    min_depth: int = 1
    allow_dropping: bool = False
    server_mbps: float | None = None
    coverage_layers: int = 0
    coverage_share: float = 0.0
    min_participants: int = 0
    min_sample_share: float = 0.0
    layer_weights: str | tuple[float, ...] = "auto"
    rank_gains: str | tuple[float, ...] = "auto"
    saturation: str | tuple[float, ...] = "auto"
    seconds_per_mb: float | str = DEFAULT_SECONDS_PER_MB
    server_overhead_s: float = 0.0
    use_classes: bool | None = None  # None: automatic (classes when profiles repeat)
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("layer_weights", "rank_gains", "saturation"):
            if isinstance(getattr(self, name), list):
                # a list (JSON, a plan's options) means the same as a tuple
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.objective not in OBJECTIVES:
            raise PlannerInputError(
                f"`objective` must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        if self.objective == "deadline" and self.deadline_s is None:
            raise PlannerInputError(
                "`deadline_s` is required for objective 'deadline'; pass --deadline-s SECONDS"
            )
        if self.deadline_s is not None and not (
            math.isfinite(self.deadline_s) and self.deadline_s > 0
        ):
            raise PlannerInputError(f"`deadline_s` must be > 0, got {self.deadline_s!r}")
        if not (math.isfinite(self.time_limit_s) and self.time_limit_s > 0):
            raise PlannerInputError(f"`time_limit_s` must be > 0, got {self.time_limit_s!r}")
        if not 0 <= self.mip_gap < 1:
            raise PlannerInputError(f"`mip_gap` must be in [0, 1), got {self.mip_gap!r}")
        if self.min_depth < 1:
            raise PlannerInputError(f"`min_depth` must be >= 1, got {self.min_depth!r}")
        if not 0 <= self.coverage_share <= 1:
            raise PlannerInputError(
                f"`coverage_share` must be in [0, 1], got {self.coverage_share!r}"
            )
        if not 0 < self.utility_floor_share <= 1:
            raise PlannerInputError(
                f"`utility_floor_share` must be in (0, 1], got {self.utility_floor_share!r}"
            )
        if self.server_mbps is not None and not self.server_mbps > 0:
            raise PlannerInputError(f"`server_mbps` must be > 0, got {self.server_mbps!r}")
        if self.solver not in SOLVER_NAMES:
            raise PlannerInputError(
                f"unknown solver {self.solver!r}; expected one of {', '.join(SOLVER_NAMES)}"
            )
        if self.server_mbps is not None and not math.isfinite(self.server_mbps):
            raise PlannerInputError(
                f"`server_mbps` must be a finite number > 0, got {self.server_mbps!r}; "
                "leave it out for an unlimited server link"
            )
        if self.utility_floor is not None and not (
            math.isfinite(self.utility_floor) and self.utility_floor >= 0
        ):
            raise PlannerInputError(
                f"`utility_floor` must be a finite number >= 0, got {self.utility_floor!r}"
            )
        if self.min_participants < 0:
            raise PlannerInputError(
                f"`min_participants` must be >= 0, got {self.min_participants!r}"
            )
        if not (math.isfinite(self.min_sample_share) and 0 <= self.min_sample_share <= 1):
            raise PlannerInputError(
                f"`min_sample_share` must be in [0, 1], got {self.min_sample_share!r}"
            )
        if self.min_sample_share > 0 and not self.allow_dropping:
            raise PlannerInputError(
                f"`min_sample_share` = {self.min_sample_share!r} only applies with "
                "`allow_dropping` = true (without it every device takes part); set "
                "`allow_dropping` or leave `min_sample_share` at 0"
            )
        if self.coverage_layers < 0:
            raise PlannerInputError(f"`coverage_layers` must be >= 0, got {self.coverage_layers!r}")
        if self.coverage_layers == 1 and self.coverage_share > 0:
            raise PlannerInputError(
                "`coverage_layers` = 1 constrains nothing: every participant trains the output "
                "layer, and coverage counts the participants' samples; use 2 or more layers, "
                "or 0 to switch coverage off (to keep more of the round's samples with "
                "`allow_dropping`, use `min_sample_share`; more devices, `min_participants`)"
            )
        if self.threads is not None and self.threads < 1:
            raise PlannerInputError(f"`threads` must be >= 1, got {self.threads!r}")
        if isinstance(self.layer_weights, str):
            if self.layer_weights not in LAYER_WEIGHTS:
                raise PlannerInputError(
                    f"`layer_weights` must be one of {', '.join(LAYER_WEIGHTS)} or a list of "
                    f"weights, got {self.layer_weights!r}"
                )
        elif not self.layer_weights or any(
            not (math.isfinite(v) and v >= 0) for v in self.layer_weights
        ):
            raise PlannerInputError(
                f"`layer_weights` must be finite numbers >= 0, got {list(self.layer_weights)}"
            )
        if isinstance(self.rank_gains, str):
            if self.rank_gains not in RANK_GAINS:
                raise PlannerInputError(
                    f"`rank_gains` must be one of {', '.join(RANK_GAINS)} or a list of one "
                    f"gain per rank, got {self.rank_gains!r}"
                )
        else:
            g = self.rank_gains
            if not g or any(not (math.isfinite(v) and v > 0) for v in g):
                raise PlannerInputError(f"`rank_gains` must be finite numbers > 0, got {list(g)}")
            if any(b < a for a, b in pairwise(g)):
                raise PlannerInputError(
                    f"`rank_gains` must not decrease with the rank, got {list(g)}"
                )
        if isinstance(self.saturation, str):
            if self.saturation not in SATURATIONS:
                raise PlannerInputError(
                    f"`saturation` must be one of {', '.join(SATURATIONS)} or a list of the "
                    f"response at 1, 2, ... devices, got {self.saturation!r}"
                )
        else:
            h = self.saturation
            if not h or any(not (math.isfinite(v) and v >= 0) for v in h) or h[0] <= 0:
                raise PlannerInputError(
                    "`saturation` must be finite numbers >= 0, the first > 0 (the response "
                    f"at 1, 2, ... mean-sized devices), got {list(h)}"
                )
            if self.objective != "progress":
                raise PlannerInputError(
                    f"`saturation` applies to objective 'progress' only, not {self.objective!r}; "
                    'leave it "auto"'
                )
        for name in ("seconds_per_mb", "server_overhead_s"):
            v = getattr(self, name)
            if name == "seconds_per_mb" and v == AUTO_PRICE:
                continue
            if isinstance(v, str) or not (math.isfinite(v) and v >= 0):
                also = ' or "auto"' if name == "seconds_per_mb" else ""
                raise PlannerInputError(f"`{name}` must be a finite number >= 0{also}, got {v!r}")

    def with_(self, **changes: Any) -> PlannerOptions:
        return replace(self, **changes)

    @property
    def price_per_mb(self) -> float:
        """``seconds_per_mb`` as a number (``"auto"`` is resolved by
        :meth:`PlanningProblem.create`, whose options the solvers read)."""
        if isinstance(self.seconds_per_mb, str):
            raise PlannerInputError(
                '`seconds_per_mb = "auto"` is resolved for a fleet: plan through '
                "PlanningProblem.create or plan_round, or give a number"
            )
        return float(self.seconds_per_mb)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key in ("layer_weights", "rank_gains", "saturation"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out


def auto_seconds_per_mb(fleet: Fleet) -> float:
    """The price of ``seconds_per_mb = "auto"``: the seconds the median device's uplink
    (``uplink_mbps`` of ``fleet``, the devices planned) needs to carry one megabyte."""
    if not fleet.devices:
        raise PlannerInputError('`seconds_per_mb = "auto"` needs at least one device')
    return 8.0 / statistics.median(d.uplink_mbps for d in fleet.devices)


def _prior(spec: ModelSpec) -> ProgressPrior | None:
    return progress_prior(spec.name, spec.num_layers)


@dataclass(frozen=True, kw_only=True)
class PlanningProblem:
    """Everything a solver backend needs; build with :meth:`create`."""

    fleet: Fleet
    spec: ModelSpec
    job: JobParams
    options: PlannerOptions
    costs: CostModel = field(compare=False)
    warm_start: Plan | None = field(default=None, compare=False)
    topology: Topology | None = field(default=None, compare=False)

    @classmethod
    def create(
        cls,
        fleet: Fleet,
        spec: ModelSpec,
        job: JobParams | None = None,
        options: PlannerOptions | None = None,
        *,
        calibration: Calibration | None = None,
        warm_start: Plan | None = None,
        topology: Topology | None = None,
    ) -> PlanningProblem:
        job = job or JobParams()
        options = options or PlannerOptions()
        if options.seconds_per_mb == AUTO_PRICE:
            options = options.with_(seconds_per_mb=auto_seconds_per_mb(fleet))
        if topology is not None and options.server_mbps is not None:
            raise PlannerInputError(
                "give either `server_mbps` or a topology, not both: model the server's link "
                "as a link to 'server' in the topology"
            )
        if options.min_depth > spec.num_layers:
            raise PlannerInputError(
                f"`min_depth` {options.min_depth} exceeds the {spec.num_layers} layers of "
                f"{spec.name}"
            )
        if options.coverage_share > 0 and options.coverage_layers > spec.num_layers:
            raise PlannerInputError(
                f"`coverage_layers` {options.coverage_layers} exceeds the {spec.num_layers} "
                f"layers of {spec.name}"
            )
        if options.min_participants > len(fleet):
            raise PlannerInputError(
                f"`min_participants` {options.min_participants} exceeds the fleet's "
                f"{len(fleet)} devices"
            )
        spec.check_ranks(job.ranks)
        if (
            isinstance(options.layer_weights, tuple)
            and len(options.layer_weights) != spec.num_layers
        ):
            raise PlannerInputError(
                f"`layer_weights` has {len(options.layer_weights)} entries; {spec.name} has "
                f"{spec.num_layers} layers"
            )
        if isinstance(options.rank_gains, tuple) and len(options.rank_gains) != len(job.ranks):
            raise PlannerInputError(
                f"`rank_gains` has {len(options.rank_gains)} entries; the rank grid "
                f"{list(job.ranks)} has {len(job.ranks)}"
            )
        for what in ("layer_weights", "rank_gains"):
            if getattr(options, what) == "prior" and _prior(spec) is None:
                raise PlannerInputError(
                    f'`{what} = "prior"`: no progress prior is stored for {spec.name}; '
                    'measure one with benchmarks/progress_prior.py or leave it "auto"'
                )
        if options.saturation == "prior":
            prior = _prior(spec)
            if prior is None or prior.coverage_response is None:
                raise PlannerInputError(
                    f'`saturation = "prior"`: no coverage response is stored for {spec.name}; '
                    'give the response as a list (see docs/planner.md) or leave it "auto"'
                )
            if options.objective != "progress":
                raise PlannerInputError(
                    f"`saturation` applies to objective 'progress' only, not "
                    f'{options.objective!r}; leave it "auto"'
                )
        return cls(
            fleet=fleet,
            spec=spec,
            job=job,
            options=options,
            costs=CostModel(spec, job, calibration),
            warm_start=warm_start,
            topology=topology,
        )

    def _uses_prior(self, what: str) -> bool:
        value = getattr(self.options, what)
        if value == "prior":
            return True
        return (
            value == "auto"
            and self.options.objective == "progress"
            and _prior(self.spec) is not None
        )

    @property
    def layer_weights(self) -> tuple[float, ...]:
        """``w_l`` per layer, resolved from ``options.layer_weights``."""
        L = self.spec.num_layers
        w = self.options.layer_weights
        if self._uses_prior("layer_weights"):
            prior = _prior(self.spec)
            assert prior is not None
            return prior.layer_gains
        if w in ("linear", "auto", "prior"):
            return tuple((layer + 1) / L for layer in range(L))
        if w == "uniform":
            return (1.0,) * L
        return tuple(float(v) for v in w)

    @property
    def rank_gains(self) -> tuple[float, ...]:
        """``g(r)`` at each rank of the job's grid, resolved from ``options.rank_gains``."""
        g = self.options.rank_gains
        if self._uses_prior("rank_gains"):
            prior = _prior(self.spec)
            assert prior is not None
            return prior.response_at(self.job.ranks)
        if isinstance(g, tuple):
            return tuple(float(v) for v in g)
        return tuple(rank_gain(r) for r in self.job.ranks)

    @property
    def saturation(self) -> Saturation | None:
        """The coverage response ``H`` of the saturating progress model, resolved from
        ``options.saturation`` (``None``: the additive model)."""
        value = self.options.saturation
        if self.options.objective != "progress" or value == "none":
            return None
        if isinstance(value, tuple):
            return saturation_curve([(k + 1.0, h) for k, h in enumerate(value)])
        prior = _prior(self.spec)
        if prior is None or prior.coverage_response is None:
            return None
        return saturation_curve(prior.coverage_response)

    def progress_of(self, configs: Sequence[Configuration]) -> float:
        """The saturating progress ``P`` (:mod:`legend.planner.saturation`) of per-device
        configurations in fleet order; only under a coverage response (``saturation``)."""
        curve = self.saturation
        if curve is None:
            raise PlannerInputError(
                "progress_of values plans on the saturating model; this problem is additive "
                '(saturation "none", or "auto" without a stored response)'
            )
        samples = [d.num_samples for d in self.fleet.devices]
        gains = slot_gains(self.layer_weights, self.rank_gains)
        return plan_progress(configs, samples, gains, self.job.ranks, curve)

    def gain_of(self) -> dict[int, float]:
        """``{rank: g(rank)}`` over the job's grid."""
        return dict(zip(self.job.ranks, self.rank_gains, strict=True))

    def utility_per_sample(self, layers: tuple[int, ...], ranks: tuple[int, ...]) -> float:
        """``sum_l w_l g(r_l)`` of a configuration."""
        w = self.layer_weights
        gain = self.gain_of()
        return sum(w[layer] * gain[r] for layer, r in zip(layers, ranks, strict=True))

    def utility(self, device_index: int, layers: tuple[int, ...], ranks: tuple[int, ...]) -> float:
        """``n_i * sum_l w_l g(r_l)`` of one device's configuration."""
        n = self.fleet.devices[device_index].num_samples
        return n * self.utility_per_sample(layers, ranks)

    def priced_seconds(self, total_bytes: float) -> float:
        """What ``progress`` adds to the round time: the server's overhead and the price of
        ``total_bytes`` moved (0 for the other objectives)."""
        if self.options.objective != "progress":
            return 0.0
        return self.options.server_overhead_s + self.options.price_per_mb * total_bytes / 1e6

    def objective_of(self, utility: float, round_time_s: float, total_bytes: float) -> float:
        """The objective of a plan with this utility, round time and bytes (both ways)."""
        return objective_value(
            self.options.objective, utility, round_time_s, self.priced_seconds(total_bytes)
        )

    def digest(self) -> str:
        parts: list[Any] = [
            self.fleet.to_records(),
            self.spec.to_dict(),
            self.job.to_dict(),
            {
                k: v
                for k, v in self.options.to_dict().items()
                if k not in ("time_limit_s", "threads")
            },
            self.costs.calibration.to_json() if self.costs.calibration else None,
            # what "auto" and "prior" resolved to (the stored prior can change)
            [list(self.layer_weights), list(self.rank_gains)],
        ]
        curve = self.saturation
        if curve is not None:
            parts.append([curve.widths.tolist(), curve.slopes.tolist()])
        if self.topology is not None:
            parts.append(self.topology.to_dict())
        return inputs_digest(*parts)


@dataclass(frozen=True, kw_only=True)
class SolverOutcome:
    """What a backend returns: one configuration per device (fleet order) and solver facts."""

    configurations: tuple[Configuration, ...]
    status: str
    solver: str
    solver_version: str = ""
    mip_gap: float | None = None
    objective_value: float | None = None
    deadline_s: float | None = None
    objective_bound: float | None = None
