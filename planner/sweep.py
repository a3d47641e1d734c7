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
- ``progress``: the ratio ``U / (T + c + sum_i beta_j(i))`` also prices each device's bytes
  (``beta_j = p * 2 B_j``, ``p`` seconds per byte, ``c`` the server's overhead), so a
  device's best column at ``T`` depends on the ratio itself. Dinkelbach's method solves it
  exactly: for the ratio ``lambda`` of the current plan, maximise
  ``sum_i max_j (n_i u_j - lambda beta_j) - lambda (T + c)`` over the same breakpoints (per
  device the running maximum of its priced values in time order), take the plan found,
  and repeat until the maximum is 0; a finite program takes a few steps, each exact.

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

from legend.planner.catalog import CHUNK_CELLS, Catalogue, FleetCosts
from legend.planner.errors import InfeasibleError
from legend.planner.types import PlanningProblem, objective_value

__all__ = [
    "SweepResult",
    "best_columns",
    "coupling_rows",
    "fastest_times",
    "priced_columns",
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
    if opts.allow_dropping and opts.min_sample_share > 0:
        rows.append("C9s participating samples")
    if problem.topology is not None and problem.topology.congested(problem.fleet):
        rows.append("C10 shared links")
    if problem.saturation is not None:
        rows.append("SAT saturating progress")
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
    if opts.objective == "progress":
        return _progress(problem, cat, fc, t_lb)
    _, base = best_columns(cat, fc, t_lb)
    base_u = np.where(np.isfinite(base), base, 0.0)
    u0 = float(base_u @ fc.samples)
    _, top = best_columns(cat, fc, math.inf)
    u_max = float(np.where(np.isfinite(top), top, 0.0) @ fc.samples)

    if opts.objective == "rate":
        return _result(problem, cat, fc, _rate_time(cat, fc, t_lb))

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


def _rate_time(cat: Catalogue, fc: FleetCosts, t_lb: float) -> float:
    """The breakpoint ``T >= t_lb`` of the largest ``U(T) / T``."""
    _, base = best_columns(cat, fc, t_lb)
    base_u = np.where(np.isfinite(base), base, 0.0)
    u0 = float(base_u @ fc.samples)
    _, top = best_columns(cat, fc, math.inf)
    u_max = float(np.where(np.isfinite(top), top, 0.0) @ fc.samples)
    t_hi = t_lb * u_max / u0 * (1 + 1e-9) if u0 > 0 else math.inf
    tt, inc = _breakpoints(cat, fc, t_lb, t_hi, base_u)
    cand_t = np.concatenate(([t_lb], tt))
    cand_u = u0 + np.concatenate(([0.0], np.cumsum(inc)))
    # the fleet's utility at a time is the last entry among equal times
    last = np.ones(len(cand_t), dtype=bool)
    last[:-1] = cand_t[1:] > cand_t[:-1]
    ratio = np.where(last, cand_u / cand_t, -np.inf)
    return float(cand_t[int(np.argmax(ratio))])


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


# Dinkelbach steps of the ``progress`` sweep (each exact; a handful suffice in practice)
PROGRESS_MAX_STEPS = 100


def priced_columns(problem: PlanningProblem, cat: Catalogue) -> tuple[np.ndarray, float]:
    """Per column the price of its bytes in seconds (both ways), and the server overhead:
    what ``progress`` adds to a plan's round time."""
    opts = problem.options
    return opts.price_per_mb * 2.0 * cat.bytes_one_way / 1e6, opts.server_overhead_s


def _device_chunks(idx: np.ndarray, width: int) -> list[np.ndarray]:
    """``idx`` cut into pieces of at most ``CHUNK_CELLS / width`` devices."""
    size = max(1, CHUNK_CELLS // max(width, 1))
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def _priced_best(
    cat: Catalogue, fc: FleetCosts, beta: np.ndarray, lam: float, round_time_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per device the column maximising ``n_i u_j - lam beta_j`` among those that fit its
    memory and finish within ``round_time_s`` (ties: the faster), and that value; ``-1``
    and ``-inf`` where nothing fits.

    Within one depth the columns that fit are a prefix of the depth's list (sorted by rank
    sum, so by time and memory), found by binary search; the best of the prefix is then an
    argmax over at most that depth's columns, never a device-by-catalogue time matrix.
    """
    n = len(fc)
    out = np.full(n, -1, dtype=np.int64)
    best_v = np.full(n, -np.inf)
    best_t = np.full(n, np.inf)
    u = cat.utility_per_sample
    for d, cols in cat.by_depth():
        k = _depth_caps(cat, fc, d, cols, round_time_s)
        value = u[cols]
        price = lam * beta[cols]
        position = np.arange(len(cols))
        for rows in _device_chunks(np.flatnonzero(k > 0), len(cols)):
            v = fc.samples[rows, None] * value[None, :] - price[None, :]
            v[position[None, :] >= k[rows, None]] = -np.inf
            a = np.argmax(v, axis=1)  # the first maximum: the smallest rank sum, the fastest
            va = v[np.arange(len(rows)), a]
            j = cols[a]
            t = fc.time_const[rows] + fc.time_per_layer[rows] * d
            t = t + fc.time_per_rank[rows] * cat.rank_sum[j]
            tol = 1e-12 * np.maximum(1.0, np.abs(va))
            old = best_v[rows]
            with np.errstate(invalid="ignore"):
                tie = np.abs(va - old) <= tol
            better = (va > old + tol) | (tie & (t < best_t[rows]))
            out[rows] = np.where(better, j, out[rows])
            best_v[rows] = np.where(better, va, old)
            best_t[rows] = np.where(better, t, best_t[rows])
    return out, best_v


def _priced_choice(
    cat: Catalogue,
    fc: FleetCosts,
    beta: np.ndarray,
    lam: float,
    round_time_s: float,
    dropping: bool,
) -> np.ndarray:
    """:func:`_priced_best`'s columns; with dropping a device whose best is not positive
    sits out (``-1``)."""
    choice, value = _priced_best(cat, fc, beta, lam, round_time_s)
    return np.where(value > 0, choice, -1) if dropping else choice


def _plan_ratio(
    cat: Catalogue, fc: FleetCosts, beta: np.ndarray, overhead: float, choice: np.ndarray
) -> tuple[float, float, float]:
    """``(ratio, utility, round time)`` of a choice under the ``progress`` objective."""
    used = choice >= 0
    j = choice[used]
    utility = float(cat.utility_per_sample[j] @ fc.samples[used])
    t = fc.time_const[used] + fc.time_per_layer[used] * cat.depth[j]
    t = t + fc.time_per_rank[used] * cat.rank_sum[j]
    round_time = float(t.max()) if used.any() else 0.0
    denominator = round_time + overhead + float(beta[j].sum())
    return (utility / denominator if denominator > 0 else 0.0), utility, round_time


@dataclass(frozen=True)
class _PricedBest:
    """The maximiser of ``F(T)`` over the breakpoints: its round time, ``F`` there, and the
    progress ``P`` and priced bytes ``B`` of the plan it stands for."""

    round_time_s: float
    value: float
    progress: float
    priced_s: float


def _priced_best_time(
    cat: Catalogue,
    fc: FleetCosts,
    beta: np.ndarray,
    lam: float,
    overhead: float,
    t_lb: float,
    t_hi: float,
    dropping: bool,
) -> _PricedBest:
    """The round time ``T`` in ``[t_lb, t_hi]`` maximising
    ``F(T) = sum_i max_{j: t_ij <= T} (n_i u_j - lam beta_j) - lam (T + overhead)``.

    ``F`` is a step function minus a line, so its maximum sits at ``t_lb`` or where some
    device's best priced value rises. Along with each rise the change of the plan's
    progress and priced bytes is kept, so the plan's ratio needs no second pass.
    """
    u = cat.utility_per_sample
    base_p = base_b = 0.0
    times: list[np.ndarray] = []
    d_val: list[np.ndarray] = []
    d_p: list[np.ndarray] = []
    d_b: list[np.ndarray] = []
    base_col, base = _priced_best(cat, fc, beta, lam, t_lb)
    if dropping:
        out = ~(base > 0)
        base = np.where(out, 0.0, base)
        base_col = np.where(out, -1, base_col)
    has = base_col >= 0
    base_p += float(fc.samples[has] @ u[base_col[has]])
    base_b += float(beta[base_col[has]].sum())
    dev_parts, col_parts, t_parts, v_parts = [], [], [], []
    for d, cols in cat.by_depth():
        # the columns a device reaches between t_lb and t_hi: a window of the depth's list
        k_lo = _depth_caps(cat, fc, d, cols, t_lb)
        k_hi = _depth_caps(cat, fc, d, cols, t_hi)
        value = u[cols]
        price = lam * beta[cols]
        position = np.arange(len(cols))
        for rows in _device_chunks(np.flatnonzero(k_hi > k_lo), len(cols)):
            v = fc.samples[rows, None] * value[None, :] - price[None, :]
            outside = (position[None, :] < k_lo[rows, None]) | (
                position[None, :] >= k_hi[rows, None]
            )
            v[outside] = -np.inf
            # along a depth, times grow with the rank sum for every device: a column can
            # raise the device's best only if it beats every faster column of its depth
            before = np.maximum.accumulate(
                np.concatenate([base[rows, None], v[:, :-1]], axis=1), axis=1
            )
            r, k = np.nonzero(v > before)
            if not len(r):
                continue
            dev = rows[r]
            j = cols[k]
            dev_parts.append(dev)
            col_parts.append(j)
            t_parts.append(
                fc.time_const[dev]
                + fc.time_per_layer[dev] * d
                + fc.time_per_rank[dev] * cat.rank_sum[j]
            )
            v_parts.append(v[r, k])
    if dev_parts:
        dev = np.concatenate(dev_parts)
        col = np.concatenate(col_parts)
        tt = np.concatenate(t_parts)
        vv = np.concatenate(v_parts)
        order = np.lexsort((-vv, tt, dev))
        dev, tt, vv, col = dev[order], tt[order], vv[order], col[order]
        # running maximum per device in time order, from its base: offset the devices'
        # segments apart so that one cumulative maximum serves all
        first = np.ones(len(dev), dtype=bool)
        first[1:] = dev[1:] != dev[:-1]
        seg = np.cumsum(first) - 1
        run = np.maximum(vv, base[dev])
        offset = seg * (4.0 * float(np.abs(run).max()) + 1.0)
        run = np.maximum.accumulate(run + offset) - offset
        prev = np.where(first, base[dev], np.concatenate(([0.0], run[:-1])))
        rise = run - prev > 0
        dev, tt, col, inc = dev[rise], tt[rise], col[rise], (run - prev)[rise]
        # the column each rise replaces: the device's previous rise, or its base column
        first = np.ones(len(dev), dtype=bool)
        first[1:] = dev[1:] != dev[:-1]
        old = np.where(first, base_col[dev], np.concatenate(([-1], col[:-1])))
        u_old = np.where(old >= 0, u[np.maximum(old, 0)], 0.0)
        b_old = np.where(old >= 0, beta[np.maximum(old, 0)], 0.0)
        times.append(tt)
        d_val.append(inc)
        d_p.append(fc.samples[dev] * (u[col] - u_old))
        d_b.append(beta[col] - b_old)
    if times:
        tt = np.concatenate(times)
        order = np.argsort(tt, kind="stable")
        tt = tt[order]
        cum_v = np.cumsum(np.concatenate(d_val)[order])
        cum_p = np.cumsum(np.concatenate(d_p)[order])
        cum_b = np.cumsum(np.concatenate(d_b)[order])
    else:
        tt = cum_v = cum_p = cum_b = np.zeros(0)
    cand_t = np.concatenate(([t_lb], tt))
    cand_v = np.concatenate(([0.0], cum_v))
    last = np.ones(len(cand_t), dtype=bool)
    last[:-1] = cand_t[1:] > cand_t[:-1]
    # F up to the constant sum of the bases (the same for every T)
    score = np.where(last, cand_v - lam * cand_t, -np.inf)
    best = int(np.argmax(score))
    progress = base_p + (float(cum_p[best - 1]) if best > 0 else 0.0)
    priced = base_b + (float(cum_b[best - 1]) if best > 0 else 0.0)
    value = progress - lam * (float(cand_t[best]) + overhead + priced)
    return _PricedBest(
        round_time_s=float(cand_t[best]), value=value, progress=progress, priced_s=priced
    )


def _progress(problem: PlanningProblem, cat: Catalogue, fc: FleetCosts, t_lb: float) -> SweepResult:
    """The ``progress`` objective by Dinkelbach's method over exact sweeps."""
    dropping = problem.options.allow_dropping
    beta, overhead = priced_columns(problem, cat)
    _, top = best_columns(cat, fc, math.inf)
    p_max = float(np.where(np.isfinite(top), top, 0.0) @ fc.samples)
    # Start from the best plan at the round time of the unpriced rate optimum (Dinkelbach
    # at that fixed T, a few cheap passes), or at the shortest round: the global steps
    # below then mostly confirm it.
    starts = [_priced_choice(cat, fc, beta, 0.0, t_lb, dropping)]
    lam = _plan_ratio(cat, fc, beta, overhead, starts[0])[0]
    if not dropping:
        t_rate = _rate_time(cat, fc, t_lb)
        for _ in range(4):
            cand = _priced_choice(cat, fc, beta, lam, t_rate, dropping)
            ratio = _plan_ratio(cat, fc, beta, overhead, cand)[0]
            if ratio <= lam * (1 + 1e-9):
                break
            starts.append(cand)
            lam = ratio
    t_best = t_lb
    for _ in range(PROGRESS_MAX_STEPS):
        # a plan of ratio >= lam has T + overhead <= P_max / lam
        t_hi = (p_max / lam - overhead) * (1 + 1e-9) if lam > 0 else math.inf
        found = _priced_best_time(cat, fc, beta, lam, overhead, t_lb, max(t_hi, t_lb), dropping)
        denominator = found.round_time_s + overhead + found.priced_s
        ratio = found.progress / denominator if denominator > 0 else 0.0
        if ratio <= lam * (1 + 1e-12):
            # max_T F(T) <= 0: no plan's ratio exceeds lam (Dinkelbach)
            break
        lam, t_best = ratio, found.round_time_s
    choice = _priced_choice(cat, fc, beta, lam, t_best, dropping)
    if starts and _plan_ratio(cat, fc, beta, overhead, choice)[0] < lam * (1 - 1e-9):
        # lam came from a starting plan that no step improved on
        choice = max(starts, key=lambda c: _plan_ratio(cat, fc, beta, overhead, c)[0])
    ratio, utility, round_time = _plan_ratio(cat, fc, beta, overhead, choice)
    return SweepResult(
        choice=choice, round_time_s=round_time, utility=utility, objective_value=ratio
    )
