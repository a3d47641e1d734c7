"""Exact oracle for tiny instances, solver ``brute-force``.

Enumerates every valid configuration of every device (a contiguous block of layers ending
at the output, at least ``min_depth`` deep, one rank of the grid per layer, ranks
non-decreasing toward the output when ``monotone_ranks``; the empty configuration too when
``allow_dropping``) and every combination of them, and returns the best combination for the
objective. It shares nothing with the integer program but the cost model's
:meth:`~legend.planner.costs.CostModel.evaluate` and the utility, so it is the reference the
IP backends and the greedy are tested against.

Constraint semantics (the same as the integer program's, docs/planner.md):

- round time ``T`` is the slowest participant's time (``deadline`` objective: every
  participant finishes within ``deadline_s``);
- memory: every participant fits its device;
- server link: the round lasts at least as long as the server's link needs for the
  round's bytes in both directions (``T >= bytes / server_mbps``);
- coverage: each of the top ``coverage_layers`` layers is trained on at least
  ``coverage_share`` of the participants' samples;
- ``min_participants`` and ``min_sample_share`` (with ``allow_dropping``), and at least one
  participant always.

Objectives: ``deadline`` maximises ``U``; ``rate`` maximises ``U / T``; ``min-time``
minimises ``T`` subject to ``U >= floor`` (``utility_floor``, or ``utility_floor_share``
times the largest ``U`` of any feasible combination), breaking ties by larger ``U``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from legend.planner.backends import legend_version
from legend.planner.catalog import count_configurations, device_configurations
from legend.planner.diagnose import blocked_devices, explain_infeasibility
from legend.planner.errors import InfeasibleError, PlannerInputError
from legend.planner.greedy import check_fleet_options
from legend.planner.saturation import column_slots, slot_gains
from legend.planner.types import Configuration, PlanningProblem, SolverOutcome

__all__ = [
    "MAX_COMBINATIONS",
    "count_configurations",
    "device_configurations",
    "solve_bruteforce",
]

MAX_COMBINATIONS = 2_000_000
_REL_TOL = 1e-9


def _count(sizes: list[int]) -> int:
    total = 1
    for s in sizes:
        total *= s
    return total


def solve_bruteforce(problem: PlanningProblem) -> SolverOutcome:
    """Solver backend ``brute-force``: exhaustive search (status ``OPTIMAL``, gap 0).

    Raises
    ------
    PlannerInputError
        The instance has more than :data:`MAX_COMBINATIONS` combinations.
    InfeasibleError
        No combination satisfies the constraints.
    """
    opts = problem.options
    fleet = problem.fleet
    L = problem.spec.num_layers
    check_fleet_options(problem)
    per_device_count = count_configurations(
        L, len(problem.job.ranks), min_depth=opts.min_depth, monotone=opts.monotone_ranks
    )
    if per_device_count > MAX_COMBINATIONS:
        raise PlannerInputError(
            f"brute-force would enumerate {per_device_count:,} configurations per device "
            f"({L} layers, {len(problem.job.ranks)} ranks); the limit is "
            f"{MAX_COMBINATIONS:,}. Use an IP solver (--solver auto) or a smaller model "
            "or rank grid"
        )
    all_configs = device_configurations(
        L, problem.job.ranks, min_depth=opts.min_depth, monotone=opts.monotone_ranks
    )
    deadline = opts.deadline_s if opts.objective == "deadline" else None

    # Per device: the configurations that fit memory (and the deadline, if fixed).
    per_device: list[list[Configuration]] = []
    times: list[NDArray[np.float64]] = []
    nbytes: list[NDArray[np.float64]] = []
    utils: list[NDArray[np.float64]] = []
    depths: list[NDArray[np.int64]] = []
    for i, device in enumerate(fleet.devices):
        kept: list[Configuration] = [((), ())] if opts.allow_dropping else []
        row_t, row_b, row_u, row_d = (
            [0.0] * len(kept),
            [0.0] * len(kept),
            [0.0] * len(kept),
            [0] * len(kept),
        )
        for layers, ranks in all_configs:
            cost = problem.costs.evaluate(device, layers, ranks)
            if cost.memory_bytes > device.memory_bytes * (1 + _REL_TOL):
                continue
            if deadline is not None and cost.time_s > deadline * (1 + _REL_TOL):
                continue
            kept.append((layers, ranks))
            row_t.append(cost.time_s)
            row_b.append(cost.upload_bytes + cost.download_bytes)
            row_u.append(problem.utility(i, layers, ranks))
            row_d.append(len(layers))
        per_device.append(kept)
        times.append(np.array(row_t))
        nbytes.append(np.array(row_b))
        utils.append(np.array(row_u))
        depths.append(np.array(row_d, dtype=np.int64))

    if all(len(kept) == 1 for kept in per_device) and opts.allow_dropping:
        raise InfeasibleError(
            "no plan: no device can run even its smallest configuration",
            tuple(str(b) for b in blocked_devices(problem, deadline)),
        )
    if not opts.allow_dropping and any(not kept for kept in per_device):
        raise InfeasibleError(
            "no plan: some devices cannot run even their smallest configuration",
            tuple(str(b) for b in blocked_devices(problem, deadline)),
        )
    sizes = [len(k) for k in per_device]
    count = _count(sizes)
    if count > MAX_COMBINATIONS:
        raise PlannerInputError(
            f"brute-force would enumerate {count:,} combinations ({len(sizes)} devices, up to "
            f"{max(sizes)} configurations each); the limit is {MAX_COMBINATIONS:,}. Use an IP "
            "solver (--solver auto) or a smaller fleet, model or rank grid"
        )

    # Combination arrays by broadcasting: axis i indexes device i's configurations.
    n = len(per_device)
    shape = [1] * n

    def axis(values: NDArray[np.float64] | NDArray[np.int64], i: int) -> NDArray[np.float64]:
        s = list(shape)
        s[i] = len(values)
        return np.asarray(values, dtype=np.float64).reshape(s)

    total_u = np.zeros(sizes)
    round_t = np.zeros(sizes)
    total_b = np.zeros(sizes)
    participants = np.zeros(sizes)
    taking_part = np.zeros(sizes)  # the participants' samples
    for i in range(n):
        total_u = total_u + axis(utils[i], i)
        round_t = np.maximum(round_t, axis(times[i], i))
        total_b = total_b + axis(nbytes[i], i)
        participants = participants + axis((depths[i] > 0).astype(np.float64), i)
        n_i = float(fleet.devices[i].num_samples)
        taking_part = taking_part + axis(n_i * (depths[i] > 0).astype(np.float64), i)

    curve = problem.saturation
    if curve is not None:
        # saturating progress: per rank slot of a layer its coverage in mean-sized devices
        gains = slot_gains(problem.layer_weights, problem.rank_gains)
        n_bar = float(np.mean([d.num_samples for d in fleet.devices]))
        grid = problem.job.ranks
        slot_cover = [np.zeros(sizes) for _ in range(gains.size)]
        for i, device in enumerate(fleet.devices):
            # a device sitting out ((), ()) trains no slot: a row of zeros
            slots = column_slots([ranks for _, ranks in per_device[i]], L, grid)
            for q in range(gains.size):
                slot_cover[q] = slot_cover[q] + axis(device.num_samples / n_bar * slots[:, q], i)
        total_u = n_bar * sum(
            g * curve(c) for g, c in zip(gains.ravel(), slot_cover, strict=True) if g > 0
        )
    need = max(1, opts.min_participants if opts.allow_dropping else 0)
    feasible = participants >= need
    if opts.allow_dropping and opts.min_sample_share > 0:
        total = float(sum(d.num_samples for d in fleet.devices))
        feasible &= taking_part >= opts.min_sample_share * total * (1 - 1e-9)
    if opts.server_mbps is not None:
        # C7: the round lasts at least as long as the server's link needs for its bytes
        round_t = np.maximum(round_t, total_b / (opts.server_mbps * 1e6 / 8))
        if deadline is not None:
            feasible &= round_t <= deadline * (1 + _REL_TOL)
    cover = min(opts.coverage_layers, L)
    if cover > 0 and opts.coverage_share > 0:
        covered = np.zeros(sizes)
        trained = np.zeros(sizes)
        for i, device in enumerate(fleet.devices):
            covered = covered + axis(device.num_samples * (depths[i] >= cover), i)
            trained = trained + axis(device.num_samples * (depths[i] > 0), i)
        feasible &= covered >= opts.coverage_share * trained * (1 - _REL_TOL)
    if not feasible.any():
        raise InfeasibleError(
            "no combination of configurations satisfies the constraints "
            f"(server link, coverage, participants) over {count:,} combinations",
            explain_infeasibility(problem, deadline),
        )

    value: float
    if opts.objective == "deadline":
        score = np.where(feasible, total_u, -np.inf)
        flat = int(np.argmax(score))
        value = float(total_u.flat[flat])
    elif opts.objective in ("rate", "progress"):
        denom = round_t
        if opts.objective == "progress":
            denom = round_t + opts.server_overhead_s + opts.price_per_mb * total_b / 1e6
        rate = np.where(feasible & (denom > 0), total_u / np.where(denom > 0, denom, 1), -np.inf)
        flat = int(np.argmax(rate))
        value = float(rate.flat[flat])
    else:
        u_max = float(total_u[feasible].max())
        floor = (
            float(opts.utility_floor)
            if opts.utility_floor is not None
            else opts.utility_floor_share * u_max
        )
        ok = feasible & (total_u >= floor * (1 - _REL_TOL))
        if not ok.any():
            raise InfeasibleError(
                f"the utility floor {floor:.6g} exceeds the largest feasible utility "
                f"{u_max:.6g}; lower `utility_floor`"
            )
        t_min = float(round_t[ok].min())
        ties = ok & (round_t <= t_min * (1 + 1e-12))
        flat = int(np.argmax(np.where(ties, total_u, -np.inf)))
        value = float(round_t.flat[flat])
    index = np.unravel_index(flat, sizes)
    configurations = tuple(per_device[i][int(k)] for i, k in enumerate(index))
    return SolverOutcome(
        configurations=configurations,
        status="OPTIMAL",
        solver="brute-force",
        solver_version=legend_version(),
        mip_gap=0.0,
        objective_value=value if math.isfinite(value) else None,
        deadline_s=deadline,
    )
