"""The planner's core types: options, the planning problem, configurations, outcomes.

Every other planner module imports its types from here; nothing here imports a solver,
so the planner's modules form no import cycle (``types`` <- ``catalog`` <- ``sweep`` /
``formulation`` <- ``solvers`` <- ``registry`` <- ``api``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from legend.models.spec import ModelSpec
from legend.planner.costs import Calibration, CostModel
from legend.planner.errors import PlannerInputError
from legend.planner.plan import inputs_digest
from legend.planner.profiles import Fleet, JobParams

if TYPE_CHECKING:
    from legend.planner.plan import Plan
    from legend.planner.topology import Topology

__all__ = [
    "DEFAULT_SOLVER",
    "EXACT_BACKENDS",
    "OBJECTIVES",
    "SOLVER_NAMES",
    "TOPOLOGY_BLIND_SOLVERS",
    "Configuration",
    "PlannerOptions",
    "PlanningProblem",
    "SolverOutcome",
    "objective_value",
    "rank_gain",
]

OBJECTIVES = ("rate", "deadline", "min-time")
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


def objective_value(objective: str, utility: float, round_time_s: float) -> float:
    """A plan's objective: ``U / T`` (``rate``), ``U`` (``deadline``) or ``T`` (``min-time``)."""
    if objective == "rate":
        return utility / round_time_s if round_time_s > 0 else 0.0
    if objective == "deadline":
        return utility
    return round_time_s


def rank_gain(rank: int) -> float:
    """Concave utility of a rank, ``g(r) = log2(1 + r)``."""
    return math.log2(1 + rank)


@dataclass(frozen=True, kw_only=True)
class PlannerOptions:
    """What the planner optimises and which optional constraints apply (docs/planner.md).

    Every field is also a key of a job file's ``[planner]`` section and (where it makes
    sense on a command line) a ``legend plan`` flag, with these defaults.

    Parameters
    ----------
    objective
        ``"rate"`` (O3, default): maximise utility per second ``U / T``;
        ``"deadline"`` (O1): maximise ``U`` with every participant within ``deadline_s``;
        ``"min-time"`` (O2): minimise ``T`` with ``U >= utility_floor`` (absolute) or, when
        that is ``None``, ``U >= utility_floor_share * U_max``.
    solver
        One of :data:`SOLVER_NAMES`. ``"auto"`` (default) runs the exact sweep when no
        coupling row is active, Lagrangian bounds for fleet-wide coupling rows on large
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
        ``coverage_share`` of the round's samples (0 disables).
    min_participants
        C9 (only meaningful with ``allow_dropping``).
    layer_weights
        ``w_l`` of the utility: ``"linear"`` (``(l+1)/L``, the default) or ``"uniform"``,
        or an explicit tuple of ``L`` positive weights.
    use_classes
        Compress devices with identical profiles into classes in the MILP (``True``),
        plan every device on its own (``False``), or decide automatically (``None``).
    threads
        Solver threads (``None``: the solver's default).
    """

    objective: str = "rate"
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
    layer_weights: str | tuple[float, ...] = "linear"
    use_classes: bool | None = None  # None: automatic (classes when profiles repeat)
    threads: int | None = None

    def __post_init__(self) -> None:
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
        if self.coverage_layers < 0:
            raise PlannerInputError(f"`coverage_layers` must be >= 0, got {self.coverage_layers!r}")
        if self.threads is not None and self.threads < 1:
            raise PlannerInputError(f"`threads` must be >= 1, got {self.threads!r}")
        if isinstance(self.layer_weights, str) and self.layer_weights not in ("linear", "uniform"):
            raise PlannerInputError(
                f"`layer_weights` must be 'linear', 'uniform' or a tuple of weights, "
                f"got {self.layer_weights!r}"
            )

    def with_(self, **changes: Any) -> PlannerOptions:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if isinstance(out["layer_weights"], tuple):
            out["layer_weights"] = list(out["layer_weights"])
        return out


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
        return cls(
            fleet=fleet,
            spec=spec,
            job=job,
            options=options,
            costs=CostModel(spec, job, calibration),
            warm_start=warm_start,
            topology=topology,
        )

    @property
    def layer_weights(self) -> tuple[float, ...]:
        L = self.spec.num_layers
        w = self.options.layer_weights
        if w == "linear":
            return tuple((layer + 1) / L for layer in range(L))
        if w == "uniform":
            return (1.0,) * L
        return tuple(float(v) for v in w)

    def utility(self, device_index: int, layers: tuple[int, ...], ranks: tuple[int, ...]) -> float:
        """``n_i * sum_l w_l g(r_l)`` of one device's configuration."""
        n = self.fleet.devices[device_index].num_samples
        w = self.layer_weights
        return n * sum(w[layer] * rank_gain(r) for layer, r in zip(layers, ranks, strict=True))

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
        ]
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
