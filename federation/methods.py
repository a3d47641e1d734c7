"""The per-round configuration of every method a run can use (``docs/federation.md``).

========== ====================== ======================= ===============================
method     depth                  ranks                   how assigned
========== ====================== ======================= ===============================
exact      from the output        per layer               the integer program (ours)
greedy     from the output        per layer               LEGEND-style greedy
greedy-    from the output        per layer               the greedy on the progress model
learned                                                   (an ablation)
uniform    all layers             one rank                the same for every device
hetlora    all layers             one rank per device     from device capability
fedra      random layer subset    one rank                random, within the budget
depth-only from the output        one rank for all        the integer program, one rank
rank-only  all layers             per layer               the integer program, full depth
========== ====================== ======================= ===============================

Every method returns a :class:`~legend.planner.plan.Plan`, so runs record and report them
alike. The planner-based methods see the server's *estimated* fleet (EMA of observations).

``greedy`` is the LEGEND baseline and keeps its fixed utility (``sum_l w_l log2(1 + r_l)``
per second, ``w_l = (l+1)/L``) whatever the job's objective. Under the ``progress``
objective the other planner-based methods value plans by the run's progress model
(:mod:`legend.federation.progress`, passed in as ``learned``); ``greedy-learned`` runs the
greedy's moves on that model, so a benchmark separates what the model buys from what
exactness buys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from legend.federation.job import JobConfig
from legend.models.spec import ModelSpec
from legend.planner.api import (
    Configuration,
    PlannerOptions,
    PlanningProblem,
    SolverOutcome,
    make_plan,
    plan_round,
)
from legend.planner.costs import Calibration
from legend.planner.errors import InfeasibleError
from legend.planner.plan import Plan
from legend.planner.profiles import Fleet
from legend.planner.topology import Topology

__all__ = ["plan_for_method", "planner_options", "unread_options"]


#: What the ``progress`` objective charges beside the round time: read only by the methods
#: that plan on it with a solver other than the greedy (whose moves take no price).
PRICE_OPTIONS = (("planner", "seconds_per_mb"), ("planner", "server_overhead_s"))


#: The server's probe of the layers' gains: read only by the methods that plan on the
#: progress model.
PROBE_OPTIONS = (("federation", "probe_examples"),)


def plans_on_progress_model(cfg: JobConfig) -> bool:
    """Whether ``cfg``'s plans read the run's progress model (its layer gains or rank
    response; see :func:`plan_for_method`)."""
    p = cfg.planner
    return (
        cfg.job.method in ("exact", "depth-only", "rank-only", "greedy-learned")
        and p.objective == "progress"
        and (p.layer_weights == "auto" or p.rank_gains == "auto")
    )


def unread_options(cfg: JobConfig) -> tuple[tuple[str, str], ...]:
    """The ``(section, key)`` options ``cfg``'s method does not read: a run that differs from
    ``cfg`` in them alone plans, trains and aggregates the same (so it may be resumed)."""
    priced = (
        cfg.job.method in ("exact", "depth-only", "rank-only")
        and cfg.planner.objective == "progress"
        and cfg.planner.solver != "greedy"
    )
    return (() if priced else PRICE_OPTIONS) + (
        () if plans_on_progress_model(cfg) else PROBE_OPTIONS
    )


def planner_options(cfg: JobConfig, **changes: object) -> PlannerOptions:
    """The job's ``[planner]`` options, with ``changes`` applied."""
    options = cfg.planner.options()
    return options.with_(**changes) if changes else options


def plan_for_method(
    cfg: JobConfig,
    fleet: Fleet,
    spec: ModelSpec,
    *,
    round_index: int,
    calibration: Calibration | None = None,
    warm_start: Plan | None = None,
    topology: Topology | None = None,
    learned: Mapping[str, Any] | None = None,
) -> Plan:
    """The plan of ``cfg.job.method`` for one round over ``fleet`` (estimated profiles).

    ``learned`` holds planner options from the run's progress model (layer weights and rank
    gains); they apply under the ``progress`` objective where the job left them ``"auto"``.

    ``topology`` (restricted to ``fleet``'s devices) reaches the methods whose solver models
    shared links (``exact``, ``depth-only``, ``rank-only`` on an integer-program solver);
    the others plan blind to it, as a topology-blind baseline would.
    """
    method = cfg.job.method
    job = cfg.job_params
    if cfg.planner.solver in ("greedy", "brute-force"):
        topology = None
    common = {"calibration": calibration, "round_index": round_index, "topology": topology}
    changes = _learned_changes(cfg, learned or {})
    if method == "exact":
        options = planner_options(cfg, **changes)
        return plan_round(fleet, spec, job, options, warm_start=warm_start, **common)
    if method in ("greedy", "greedy-learned"):
        blind = {**common, "topology": None}
        if method == "greedy":
            # the LEGEND baseline: its own fixed utility per second under progress
            fixed = (
                {"objective": "rate", "layer_weights": "linear", "rank_gains": "log2"}
                if cfg.planner.objective == "progress"
                else {}
            )
            options = planner_options(cfg, solver="greedy", **fixed)
        else:
            options = planner_options(cfg, solver="greedy", **changes)
        return plan_round(fleet, spec, job, options, **blind)
    if method == "depth-only":
        one_rank = job.with_(ranks=(cfg.train.uniform_rank,))
        one = {k: v for k, v in changes.items() if k != "rank_gains"}
        return plan_round(fleet, spec, one_rank, planner_options(cfg, **one), **common)
    if method == "rank-only":
        options = planner_options(cfg, min_depth=spec.num_layers, **changes)
        return plan_round(fleet, spec, job, options, warm_start=warm_start, **common)
    problem = PlanningProblem.create(
        fleet, spec, job, planner_options(cfg), calibration=calibration
    )
    if method == "uniform":
        configs = _uniform(problem, cfg.train.uniform_rank)
    elif method == "hetlora":
        configs = _hetlora(problem)
    elif method == "fedra":
        configs = _fedra(
            problem, cfg.train.uniform_rank, seed=cfg.job.seed, round_index=round_index
        )
    else:  # pragma: no cover - JobConfig validates the method
        raise ValueError(method)
    outcome = SolverOutcome(configurations=configs, status="FEASIBLE", solver=method)
    return make_plan(problem, outcome, round_index=round_index)


def _learned_changes(cfg: JobConfig, learned: Mapping[str, Any]) -> dict[str, Any]:
    """The progress model's options that apply to ``cfg`` (see :func:`plan_for_method`)."""
    p = cfg.planner
    if p.objective != "progress":
        return {}
    out: dict[str, Any] = {}
    for key in ("layer_weights", "rank_gains"):
        if key in learned and getattr(p, key) == "auto":
            out[key] = learned[key]
    return out


def _fits_memory(
    problem: PlanningProblem, index: int, layers: tuple[int, ...], ranks: tuple[int, ...]
) -> bool:
    device = problem.fleet.devices[index]
    return problem.costs.evaluate(device, layers, ranks).memory_bytes <= device.memory_bytes


def _full(problem: PlanningProblem) -> tuple[int, ...]:
    return tuple(range(problem.spec.num_layers))


def _uniform(problem: PlanningProblem, rank: int) -> tuple[Configuration, ...]:
    """FedIT-style: all layers at one rank for everyone; the largest grid rank <= ``rank`` that
    fits every device's memory. A device that cannot hold even the lowest rank sits out."""
    layers = _full(problem)
    n = len(problem.fleet.devices)
    for r in sorted((g for g in problem.job.ranks if g <= rank), reverse=True):
        ranks = (r,) * len(layers)
        if all(_fits_memory(problem, i, layers, ranks) for i in range(n)):
            return tuple((layers, ranks) for _ in range(n))
    r = problem.job.ranks[0]
    ranks = (r,) * len(layers)
    configs = tuple(
        (layers, ranks) if _fits_memory(problem, i, layers, ranks) else ((), ()) for i in range(n)
    )
    return _require_someone(problem, configs)


def _hetlora(problem: PlanningProblem) -> tuple[Configuration, ...]:
    """HetLoRA-style: all layers, one rank per device from its capability: the largest grid rank
    whose full-depth round time stays within the unavoidable straggler time (the slowest
    device's full-depth time at the lowest rank) and whose memory fits."""
    layers = _full(problem)
    L = len(layers)
    grid = problem.job.ranks
    devices = problem.fleet.devices
    base_times = [
        problem.costs.evaluate(d, layers, (grid[0],) * L).time_s
        for i, d in enumerate(devices)
        if _fits_memory(problem, i, layers, (grid[0],) * L)
    ]
    if not base_times:
        return _require_someone(problem, tuple(((), ()) for _ in devices))
    budget = max(base_times)
    configs: list[Configuration] = []
    for _i, device in enumerate(devices):
        chosen: Configuration = ((), ())
        for r in grid:
            ranks = (r,) * L
            cost = problem.costs.evaluate(device, layers, ranks)
            if cost.memory_bytes > device.memory_bytes:
                break
            if cost.time_s <= budget * (1 + 1e-9) or r == grid[0]:
                chosen = (layers, ranks)
        configs.append(chosen)
    return tuple(configs)


def _fedra(
    problem: PlanningProblem, rank: int, *, seed: int, round_index: int
) -> tuple[Configuration, ...]:
    """FedRA-style: each round every device trains a random subset of layers, its size
    proportional to the device's compute relative to the fastest (at least one layer), at one
    rank; shrunk until it fits memory."""
    L = problem.spec.num_layers
    devices = problem.fleet.devices
    fastest = max(d.tflops for d in devices)
    rng = np.random.default_rng([seed, round_index, 7])
    r = max((g for g in problem.job.ranks if g <= rank), default=problem.job.ranks[0])
    configs: list[Configuration] = []
    for i, device in enumerate(devices):
        size = max(1, round(L * device.tflops / fastest))
        order = rng.permutation(L)
        chosen: Configuration = ((), ())
        while size >= 1:
            layers = tuple(sorted(int(v) for v in order[:size]))
            if _fits_memory(problem, i, layers, (r,) * size):
                chosen = (layers, (r,) * size)
                break
            size -= 1
        configs.append(chosen)
    return _require_someone(problem, tuple(configs))


def _require_someone(
    problem: PlanningProblem, configs: tuple[Configuration, ...]
) -> tuple[Configuration, ...]:
    if any(layers for layers, _ in configs):
        return configs
    reasons = []
    for device in problem.fleet.devices:
        L = problem.spec.num_layers
        need = problem.costs.evaluate(device, (L - 1,), (problem.job.ranks[0],)).memory_bytes
        reasons.append(
            f"device {device.device_id!r}: memory: needs {need / 1e9:.3f} GB, "
            f"has {device.memory_gb:.3f} GB"
        )
    raise InfeasibleError(f"method {problem.options.solver!r}: no device can train", tuple(reasons))


def with_estimates(fleet: Fleet, estimates: dict[str, tuple[float, float, float]]) -> Fleet:
    """The fleet as the server believes it is: (tflops, uplink_mbps, downlink_mbps) per device."""
    devices = []
    for d in fleet.devices:
        tflops, up, down = estimates.get(d.device_id, (d.tflops, d.uplink_mbps, d.downlink_mbps))
        devices.append(replace(d, tflops=tflops, uplink_mbps=up, downlink_mbps=down))
    return Fleet(devices=tuple(devices), source=fleet.source)
