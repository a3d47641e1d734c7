"""The planner's public entry point: :func:`plan_round`.

A :class:`PlanningProblem` bundles the fleet, the model's shape, the job and the
:class:`PlannerOptions`; a solver backend (registered in :data:`SOLVERS`) turns it into
per-device configurations, and :func:`make_plan` turns configurations into a
:class:`~legend.planner.plan.Plan` with every prediction filled in from the cost model.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from legend.models.spec import ModelSpec
from legend.planner.costs import Calibration
from legend.planner.errors import PlannerInputError
from legend.planner.plan import DevicePlan, Plan
from legend.planner.profiles import Fleet, JobParams
from legend.planner.registry import SOLVERS, get_solver
from legend.planner.types import (
    DEFAULT_SOLVER,
    EXACT_BACKENDS,
    OBJECTIVES,
    SOLVER_NAMES,
    TOPOLOGY_BLIND_SOLVERS,
    Configuration,
    PlannerOptions,
    PlanningProblem,
    SolverOutcome,
    rank_gain,
)

if TYPE_CHECKING:
    from legend.planner.topology import Topology

__all__ = [
    "DEFAULT_SOLVER",
    "EXACT_BACKENDS",
    "OBJECTIVES",
    "SOLVERS",
    "SOLVER_NAMES",
    "TOPOLOGY_BLIND_SOLVERS",
    "Configuration",
    "PlannerOptions",
    "PlanningProblem",
    "SolverOutcome",
    "make_plan",
    "plan_round",
    "rank_gain",
]


def make_plan(
    problem: PlanningProblem,
    outcome: SolverOutcome,
    *,
    solve_time_s: float = 0.0,
    round_index: int | None = None,
) -> Plan:
    """Turn a backend's configurations into a :class:`Plan` with predictions and objective.

    Costs of the planner's contiguous top blocks are computed for the whole fleet at once
    from the cost model's affine coefficients (:func:`~legend.planner.catalog.fleet_costs`);
    any other layer set (a baseline's) is evaluated device by device.
    """
    configs = outcome.configurations
    L = problem.spec.num_layers
    contiguous = all(
        not layers or (layers[-1] == L - 1 and layers[0] == L - len(layers))
        for layers, _ranks in configs
    )
    per_sample: dict[Configuration, float] = {}
    for cfg in configs:
        if cfg not in per_sample:
            per_sample[cfg] = problem.utility_per_sample(*cfg)
    devices: list[DevicePlan] = []
    total_utility = 0.0
    round_time = 0.0
    if contiguous:
        devices, total_utility, round_time = _vector_devices(problem, configs, per_sample)
    else:
        for device, (layers, ranks) in zip(problem.fleet.devices, configs, strict=True):
            cost = problem.costs.evaluate(device, layers, ranks)
            util = device.num_samples * per_sample[(layers, ranks)] if layers else 0.0
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
    if problem.saturation is not None:
        # the saturating progress of the whole plan (DevicePlan.utility stays additive)
        total_utility = problem.progress_of(configs)
    if problem.options.server_mbps is not None:
        # C7: the round lasts at least as long as the server's link needs for its bytes
        moved = sum(d.predicted_upload_bytes + d.predicted_download_bytes for d in devices)
        round_time = max(round_time, moved / (problem.options.server_mbps * 1e6 / 8))
    if problem.topology is not None:
        from legend.planner.topology import predicted_round_time

        round_time = predicted_round_time(
            problem.topology,
            problem.fleet,
            problem.costs,
            {d.device_id: (d.layers, d.ranks) for d in devices},
        )
    objective = problem.options.objective
    moved = sum(d.predicted_upload_bytes + d.predicted_download_bytes for d in devices)
    value = problem.objective_of(total_utility, round_time, moved)
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
        objective_bound=outcome.objective_bound,
        solve_time_s=solve_time_s,
        model=problem.spec.name,
        num_layers=problem.spec.num_layers,
        ranks=problem.job.ranks,
        inputs_digest=problem.digest(),
        round=round_index,
        options=problem.options.to_dict(),
        job=problem.job.to_dict(),
    )


def _vector_devices(
    problem: PlanningProblem,
    configs: tuple[Configuration, ...],
    per_sample: dict[Configuration, float],
) -> tuple[list[DevicePlan], float, float]:
    from legend.planner.catalog import fleet_costs, shared_costs

    fc = fleet_costs(problem)
    (m0, m1, m2), (b0, b1) = shared_costs(problem)
    depth = np.fromiter((len(c[0]) for c in configs), float, len(configs))
    rank_sum = np.fromiter((sum(c[1]) for c in configs), float, len(configs))
    part = depth > 0
    nbytes = np.where(part, b0 + b1 * rank_sum, 0.0)
    compute = np.where(
        part, fc.compute_const + fc.compute_per_layer * depth + fc.compute_per_rank * rank_sum, 0.0
    )
    down = nbytes * fc.down_s_per_byte
    up = nbytes * fc.up_s_per_byte
    time = compute + down + up
    memory = np.where(part, m0 + m1 * depth + m2 * rank_sum, 0.0)
    params = np.where(
        part, problem.costs.head_params() + problem.spec.params_per_rank * rank_sum, 0.0
    )
    util = np.fromiter((per_sample[c] for c in configs), float, len(configs)) * fc.samples
    util = np.where(part, util, 0.0)
    devices = [
        DevicePlan(
            device_id=device.device_id,
            layers=layers,
            ranks=ranks,
            predicted_time_s=t,
            predicted_compute_s=c,
            predicted_download_s=dn,
            predicted_upload_s=upl,
            predicted_upload_bytes=b,
            predicted_download_bytes=b,
            predicted_memory_bytes=m,
            trainable_params=int(p),
            utility=u,
        )
        for device, (layers, ranks), t, c, dn, upl, b, m, p, u in zip(
            problem.fleet.devices,
            configs,
            time.tolist(),
            compute.tolist(),
            down.tolist(),
            up.tolist(),
            nbytes.tolist(),
            memory.tolist(),
            params.tolist(),
            util.tolist(),
            strict=True,
        )
    ]
    round_time = float(time[part].max()) if part.any() else 0.0
    return devices, float(util.sum()), round_time


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
    name = problem.options.solver
    solve = get_solver(name)
    if topology is not None and name in TOPOLOGY_BLIND_SOLVERS:
        raise PlannerInputError(
            f"solver {name!r} does not model a topology; use auto, highs, pulp-highs, "
            "pulp-cbc or cvxpy-highs with --topology"
        )
    start = time.perf_counter()
    outcome = solve(problem)
    return make_plan(
        problem, outcome, solve_time_s=time.perf_counter() - start, round_index=round_index
    )
