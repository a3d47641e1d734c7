r"""The exact sweep: the planning program without coupling rows, solved without a solver.

Without the server link (C7), coverage (C8), a participant minimum (C9) or shared links of
a topology (C10), nothing ties one device's choice to another's except the round time
``T``. At a fixed ``T`` every device takes the column of the catalogue
(:mod:`legend.planner.catalog`) with the highest utility among those that fit its memory
and finish within ``T``, so the best utility of the fleet is the step function

.. math::

    U(T) = \sum_i n_i \max \{ u_j : m_j \le M_i,\ t_{ij} \le T \},

non-decreasing, with breakpoints only at the devices' column times ``t_ij``. Each objective
is then a search over those breakpoints:

- O1 ``deadline``: ``U(deadline_s)``, a per-device argmax.
- O2 ``min-time``: the first breakpoint with ``U(T) >= floor``.
- O3 ``rate``: the breakpoint with the largest ``U(T) / T`` (between breakpoints ``U`` is
  constant and ``U / T`` falls, so the maximum sits on one).

Every device must participate unless dropping is allowed, so ``T`` starts at
``T_lb = max_i min_j t_ij``; with dropping at ``min_i min_j t_ij``, a device contributing
nothing until its first column fits. Each device contributes only the breakpoints where
its own best utility rises (its time-utility front); for ``rate`` the search also stops at
``T_hi = U_max T_lb / U(T_lb)``, beyond which no ratio can beat the one at ``T_lb``. The
result is the optimum of the integer program, found by enumeration, so its status is
``OPTIMAL`` with gap 0. Work and memory are linear in the fleet size (chunks of
:data:`~legend.planner.catalog.CHUNK_CELLS` device-column cells).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from legend.planner.catalog import Catalogue, FleetCosts
from legend.planner.errors import InfeasibleError
from legend.planner.types import PlanningProblem, objective_value

__all__ = [
    "SweepResult",
    "best_columns",
    "coupling_rows",
    "fastest_times",
    "separable",
    "sweep",
]

_TIME_TOL = 1e-12  # relative slack when comparing a column's time with T


@dataclass(frozen=True, kw_only=True)
class SweepResult:
    """Per device the chosen column (``-1``: sitting out), the round time the objective was
    evaluated at, and the plan's utility ``U`` (in utility units)."""

    choice: np.ndarray
    round_time_s: float
    utility: float
    objective_value: float


def coupling_rows(problem: PlanningProblem) -> tuple[str, ...]:
    """Names of the active rows that tie devices together (empty: the program separates)."""
    opts = problem.options
    rows = []
    if opts.server_mbps is not None:
        rows.append("C7 server link")
    if opts.coverage_share > 0 and opts.coverage_layers > 0:
        rows.append("C8 coverage")
    if opts.allow_dropping and opts.min_participants > 0:
        rows.append("C9 participants")
    if problem.topology is not None and problem.topology.congested(problem.fleet):
        rows.append("C10 shared links")
    return tuple(rows)


def separable(problem: PlanningProblem) -> bool:
    """Whether the sweep solves ``problem`` exactly (no coupling row is active)."""
    return not coupling_rows(problem)


def _depth_caps(
    cat: Catalogue, fc: FleetCosts, d: int, cols: np.ndarray, limit: np.ndarray | float
) -> np.ndarray:
    """Per device the number of columns of depth ``d`` (sorted by rank sum) that fit its
    memory and finish within ``limit``: the first ``k`` of ``cols``."""
    s = cat.rank_sum[cols].astype(float)
    t0 = fc.time_const + fc.time_per_layer * d
    slope = fc.time_per_rank
    with np.errstate(divide="ignore", invalid="ignore"):
        cap_t = np.where(slope > 0, (limit - t0) / slope, np.where(t0 <= limit, np.inf, -np.inf))
    mem = cat.memory_bytes[cols]
    k_mem = np.searchsorted(mem, fc.memory_capacity * (1 + 1e-9), side="right")
    k = np.searchsorted(s, cap_t * (1 + 1e-9) + 1e-9, side="right")
    k = np.minimum(k, k_mem)
    # the division can round either way: confirm the last column with the cost formula
    for _ in range(2):
        last = np.maximum(k - 1, 0)
        t_last = t0 + slope * s[last]
        over = (k > 0) & (t_last > limit * (1 + _TIME_TOL))
        if not over.any():
            break
        k = np.where(over, k - 1, k)
    return k


def best_columns(
    cat: Catalogue, fc: FleetCosts, round_time_s: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per device the highest-utility column within ``round_time_s`` and memory (ties: the
    faster one), and its utility per sample; ``-1`` and ``-inf`` where nothing fits."""
    n = len(fc)
    choice = np.full(n, -1, dtype=np.int64)
    best_u = np.full(n, -np.inf)
    best_t = np.full(n, np.inf)
    limit = np.asarray(round_time_s, dtype=float)
    u = cat.utility_per_sample
    for d, cols in cat.by_depth():
        k = _depth_caps(cat, fc, d, cols, limit)
        has = k > 0
        j = cols[np.maximum(k - 1, 0)]
        uj = np.where(has, u[j], -np.inf)
        tj = fc.time_const + fc.time_per_layer * d + fc.time_per_rank * cat.rank_sum[j]
        tol = 1e-12 * np.maximum(1.0, np.abs(np.where(np.isfinite(uj), uj, 0.0)))
        with np.errstate(invalid="ignore"):
            tie = np.abs(uj - best_u) <= tol
        better = has & ((uj > best_u + tol) | (tie & (tj < best_t)))
        choice = np.where(better, j, choice)
        best_u = np.where(better, uj, best_u)
        best_t = np.where(better, tj, best_t)
    return choice, best_u


def fastest_times(cat: Catalogue, fc: FleetCosts) -> np.ndarray:
    """Per device the shortest round time of any column that fits its memory (inf: none)."""
    out = np.full(len(fc), np.inf)
    for d, cols in cat.by_depth():
        first = cols[0]
        fits = cat.memory_bytes[first] <= fc.memory_capacity * (1 + 1e-9)
        t = fc.time_const + fc.time_per_layer * d + fc.time_per_rank * cat.rank_sum[first]
        out = np.where(fits, np.minimum(out, t), out)
    return out


def _breakpoints(
    cat: Catalogue, fc: FleetCosts, t_lo: float, t_hi: float, base: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Times in ``(t_lo, t_hi]`` where the fleet's best utility rises, and by how much
    (weighted by samples), sorted by time. ``base`` is each device's best at ``t_lo``."""
    u = cat.utility_per_sample
    devs: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    for d, cols in cat.by_depth():
        hi = _depth_caps(cat, fc, d, cols, t_hi)
        lo = _depth_caps(cat, fc, d, cols, t_lo)
        # columns of this depth no better than the device's best at t_lo cannot raise it
        lo = np.maximum(lo, np.searchsorted(u[cols], base, side="right"))
        count = np.maximum(hi - lo, 0)
        total = int(count.sum())
        if total == 0:
            continue
        dev = np.repeat(np.arange(len(fc)), count)
        offset = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
        devs.append(dev)
        picks.append(cols[np.repeat(lo, count) + offset])
    if not devs:
        return np.zeros(0), np.zeros(0)
    dev = np.concatenate(devs)
    j = np.concatenate(picks)
    tt = (
        fc.time_const[dev]
        + fc.time_per_layer[dev] * cat.depth[j]
        + fc.time_per_rank[dev] * (cat.rank_sum[j])
    )
    uu = u[j]
    order = np.lexsort((-uu, tt, dev))
    dev, tt, uu = dev[order], tt[order], uu[order]
    # running maximum per device: offset devices so one cumulative maximum serves all
    big = float(u.max()) + 1.0
    run = np.maximum.accumulate(uu + dev * big) - dev * big
    run = np.maximum(run, base[dev])
    first = np.ones(len(dev), dtype=bool)
    first[1:] = dev[1:] != dev[:-1]
    prev = np.where(first, base[dev], np.concatenate(([0.0], run[:-1])))
    inc = (run - prev) * fc.samples[dev]
    rises = inc > 0
    tt, inc = tt[rises], inc[rises]
    order = np.argsort(tt, kind="stable")
    return tt[order], inc[order]


def sweep(problem: PlanningProblem, cat: Catalogue, fc: FleetCosts) -> SweepResult:
    """Solve the separable program exactly (see the module docstring).

    Raises
    ------
    InfeasibleError
        No plan exists (no device fits, or the utility floor cannot be reached); the caller
        explains blocked devices before calling.
    """
    opts = problem.options
    dropping = opts.allow_dropping
    if opts.objective == "deadline":
        assert opts.deadline_s is not None
        return _result(problem, cat, fc, float(opts.deadline_s))

    fastest = fastest_times(cat, fc)
    able = np.isfinite(fastest)
    if not able.any():
        raise InfeasibleError("no plan: no device can run even its smallest configuration")
    t_lb = float(fastest[able].min() if dropping else fastest.max())
    _, base = best_columns(cat, fc, t_lb)
    base_u = np.where(np.isfinite(base), base, 0.0)
    u0 = float(base_u @ fc.samples)
    _, top = best_columns(cat, fc, math.inf)
    u_max = float(np.where(np.isfinite(top), top, 0.0) @ fc.samples)

    if opts.objective == "rate":
        t_hi = t_lb * u_max / u0 * (1 + 1e-9) if u0 > 0 else math.inf
        tt, inc = _breakpoints(cat, fc, t_lb, t_hi, base_u)
        utils = u0 + np.cumsum(inc)
        cand_t = np.concatenate(([t_lb], tt))
        cand_u = np.concatenate(([u0], utils))
        # the fleet's utility at a time is the last entry among equal times
        last = np.ones(len(cand_t), dtype=bool)
        last[:-1] = cand_t[1:] > cand_t[:-1]
        ratio = np.where(last, cand_u / cand_t, -np.inf)
        k = int(np.argmax(ratio))
        return _result(problem, cat, fc, float(cand_t[k]))

    floor = (
        opts.utility_floor if opts.utility_floor is not None else (opts.utility_floor_share * u_max)
    )
    if floor > u_max * (1 + 1e-12):
        raise InfeasibleError(
            "no plan reaches the utility floor",
            (
                f"utility floor: {floor:.6g} exceeds the highest utility {u_max:.6g} any plan "
                "reaches; lower utility_floor or utility_floor_share",
            ),
        )
    if u0 >= floor * (1 - 1e-12):
        return _result(problem, cat, fc, t_lb)
    tt, inc = _breakpoints(cat, fc, t_lb, math.inf, base_u)
    utils = u0 + np.cumsum(inc)
    k = int(np.argmax(utils >= floor * (1 - 1e-12)))
    return _result(problem, cat, fc, float(tt[k]))


def _result(
    problem: PlanningProblem, cat: Catalogue, fc: FleetCosts, round_time_s: float
) -> SweepResult:
    choice, best = best_columns(cat, fc, round_time_s)
    utility = float(np.where(choice >= 0, best, 0.0) @ fc.samples)
    used = choice >= 0
    if used.any():
        t = (
            fc.time_const[used]
            + fc.time_per_layer[used] * cat.depth[choice[used]]
            + fc.time_per_rank[used] * cat.rank_sum[choice[used]]
        )
        actual = float(t.max())
    else:
        actual = 0.0
    value = objective_value(problem.options.objective, utility, actual)
    return SweepResult(choice=choice, round_time_s=actual, utility=utility, objective_value=value)
