"""The planner's public entry point: :func:`plan_round`.

A :class:`PlanningProblem` bundles the fleet, the model's shape, the job and the
:class:`PlannerOptions`; a solver backend (registered in :data:`SOLVERS`) turns it into
per-device configurations, and :func:`make_plan` turns configurations into a
:class:`~legend.planner.plan.Plan` with every prediction filled in from the cost model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from legend.models.spec import ModelSpec
from legend.planner.costs import Calibration, CostModel
from legend.planner.errors import PlannerInputError
from legend.planner.plan import DevicePlan, Plan, inputs_digest
from legend.planner.profiles import Fleet, JobParams

if TYPE_CHECKING:
    from legend.planner.topology import Topology

__all__ = [
    "OBJECTIVES",
    "SOLVERS",
    "TOPOLOGY_BLIND_SOLVERS",
    "Configuration",
    "PlannerOptions",
    "PlanningProblem",
    "SolverOutcome",
    "make_plan",
    "plan_round",
    "rank_gain",
    "register_solver",
]

OBJECTIVES = ("rate", "deadline", "min-time")
DEFAULT_SOLVER = "pulp-highs"
# Heuristic and enumerating planners that do not model a network topology.
TOPOLOGY_BLIND_SOLVERS = ("greedy", "brute-force")

# A device's configuration: (layers ascending, ranks one per layer); () = not participating.
Configuration = tuple[tuple[int, ...], tuple[int, ...]]


def rank_gain(rank: int) -> float:
    """Concave utility of a rank, ``g(r) = log2(1 + r)``."""
    return math.log2(1 + rank)


@dataclass(frozen=True, kw_only=True)
class PlannerOptions:
    """What the planner optimises and which optional constraints apply (METHOD.md s. 4).

    Parameters
    ----------
    objective
        ``"rate"`` (O3, default): maximise utility per second ``U / T``;
        ``"deadline"`` (O1): maximise ``U`` with every participant within ``deadline_s``;
        ``"min-time"`` (O2): minimise ``T`` with ``U >= utility_floor`` (absolute) or, when
        that is ``None``, ``U >= utility_floor_share * U_max``.
    solver
        A key of :data:`SOLVERS`.
    time_limit_s, mip_gap
        Solver limits; a time-limited stop returns ``FEASIBLE`` with the proven gap.
    monotone_ranks
        C4: ranks do not decrease toward the output.
    min_depth
        C3: minimum number of adapted layers of a participant.
    allow_dropping
        Let the program leave devices out (``z`` free); otherwise every device participates.
    server_mbps
        C7: capacity of the server's link (both directions together), ``None`` = unlimited.
    coverage_layers, coverage_share
        C8: each of the top ``coverage_layers`` layers is trained on at least
        ``coverage_share`` of the round's samples (0 disables).
    min_participants
        C9 (only meaningful with ``allow_dropping``).
    layer_weights
        ``w_l`` of the utility: ``"linear"`` (``(l+1)/L``, the default) or ``"uniform"``,
        or an explicit tuple of ``L`` positive weights.
    use_classes
        Plan per device class (``True``), per device (``False``) or choose automatically.
    class_bucket_ratio
        Form classes from profiles rounded *down* to the grid ``ratio**k`` (conservative:
        every plan stays feasible for every member); ``None`` groups equal profiles only.
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
    use_classes: bool | None = None  # None: automatic (class formulation for large fleets)
    class_bucket_ratio: float | None = None  # round profiles down to ratio**k to form classes
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
        if self.class_bucket_ratio is not None and not (
            math.isfinite(self.class_bucket_ratio) and self.class_bucket_ratio > 1
        ):
            raise PlannerInputError(
                f"`class_bucket_ratio` must be > 1 (e.g. 1.25), got {self.class_bucket_ratio!r}"
            )
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


Solver = Callable[[PlanningProblem], SolverOutcome]
SOLVERS: dict[str, Solver] = {}


def register_solver(name: str) -> Callable[[Solver], Solver]:
    """Decorator adding a backend to :data:`SOLVERS` under ``name``."""

    def deco(fn: Solver) -> Solver:
        SOLVERS[name] = fn
        return fn

    return deco


def _load_backends() -> None:
    # Backends register themselves on import; solver libraries load inside each backend.
    from legend.planner import solvers  # noqa: F401


def make_plan(
    problem: PlanningProblem,
    outcome: SolverOutcome,
    *,
    solve_time_s: float = 0.0,
    round_index: int | None = None,
) -> Plan:
    """Turn a backend's configurations into a :class:`Plan` with predictions and objective."""
    devices: list[DevicePlan] = []
    total_utility = 0.0
    round_time = 0.0
    for index, (device, (layers, ranks)) in enumerate(
        zip(problem.fleet.devices, outcome.configurations, strict=True)
    ):
        cost = problem.costs.evaluate(device, layers, ranks)
        util = problem.utility(index, layers, ranks) if layers else 0.0
        total_utility += util
        if layers:
            round_time = max(round_time, cost.time_s)
        devices.append(
            DevicePlan(
                device_id=device.device_id,
                layers=layers,
                ranks=ranks,
                predicted_time_s=cost.time_s,
                predicted_compute_s=cost.compute_s,
                predicted_download_s=cost.download_s,
                predicted_upload_s=cost.upload_s,
                predicted_upload_bytes=cost.upload_bytes,
                predicted_download_bytes=cost.download_bytes,
                predicted_memory_bytes=cost.memory_bytes,
                trainable_params=cost.trainable_params,
                utility=util,
            )
        )
    if problem.topology is not None:
        from legend.planner.topology import predicted_round_time

        round_time = predicted_round_time(
            problem.topology,
            problem.fleet,
            problem.costs,
            {d.device_id: (d.layers, d.ranks) for d in devices},
        )
    objective = problem.options.objective
    if objective == "rate":
        value = total_utility / round_time if round_time > 0 else 0.0
    elif objective == "deadline":
        value = total_utility
    else:
        value = round_time
    return Plan(
        devices=tuple(devices),
        status=outcome.status,
        solver=outcome.solver,
        solver_version=outcome.solver_version,
        objective=objective,
        objective_value=value,
        round_time_s=round_time,
        utility=total_utility,
        mip_gap=outcome.mip_gap,
        solve_time_s=solve_time_s,
        model=problem.spec.name,
        num_layers=problem.spec.num_layers,
        ranks=problem.job.ranks,
        inputs_digest=problem.digest(),
        round=round_index,
        options=problem.options.to_dict(),
        job=problem.job.to_dict(),
    )


def plan_round(
    fleet: Fleet,
    spec: ModelSpec,
    job: JobParams | None = None,
    options: PlannerOptions | None = None,
    *,
    calibration: Calibration | None = None,
    warm_start: Plan | None = None,
    round_index: int | None = None,
    topology: Topology | None = None,
) -> Plan:
    """Plan one round: choose every device's LoRA depth and ranks.

    With a ``topology`` (:mod:`legend.planner.topology`), links shared by several devices
    add contention rows to the exact program and the plan's round time includes them.

    Raises
    ------
    PlannerInputError
        Bad options or an unknown solver (exit status 2 on the CLI).
    InfeasibleError
        No configuration fits; the message names each blocked device (exit 3).
    SolverError
        The solver failed or stopped without a feasible plan (exit 4).
    """
    problem = PlanningProblem.create(
        fleet,
        spec,
        job,
        options,
        calibration=calibration,
        warm_start=warm_start,
        topology=topology,
    )
    _load_backends()
    name = problem.options.solver
    if name not in SOLVERS:
        raise PlannerInputError(
            f"unknown solver {name!r}; expected one of {', '.join(sorted(SOLVERS))}"
        )
    if topology is not None and name in TOPOLOGY_BLIND_SOLVERS:
        raise PlannerInputError(
            f"solver {name!r} does not model a topology; use pulp-highs, pulp-cbc or "
            "cvxpy-highs with --topology"
        )
    start = time.perf_counter()
    outcome = SOLVERS[name](problem)
    return make_plan(
        problem, outcome, solve_time_s=time.perf_counter() - start, round_index=round_index
    )


def describe_options(options: PlannerOptions) -> Mapping[str, Any]:
    return options.to_dict()
