r"""Participation floors (C9, C9s) solved exactly without the MILP: the sweep with a cover.

With ``allow_dropping`` and no other coupling row, the program couples devices only through
the floors on how many devices take part (C9, ``min_participants``) and on the share of the
samples they hold (C9s, ``min_sample_share``). Both are *covering* rows: adding a participant
never breaks them. So at a fixed round time ``T`` and a fixed Dinkelbach price ``lam`` the
best plan is

1. every device's best priced column within ``T`` and its memory,
   ``a_i(T) = max_j (n_i u_j - lam beta_j)`` (``-inf`` where nothing fits);
2. every device with ``a_i(T) > 0`` takes part: it adds value and helps both floors;
3. the floors' deficit is covered at least cost ``sum -a_i`` by devices with
   ``-inf < a_i(T) <= 0``: the cardinality floor alone by the cheapest ones, a sample floor
   by a dynamic program over the (integer) sample counts -- a min-cost covering knapsack,
   exact, vectorised over all candidate ``T`` at once.

``F(lam) = max_T [value(T) - cover(T) - lam T] - lam overhead`` is then exact at every
candidate round time -- the times at which some device's best value rises -- and
Dinkelbach's steps on the ratio (``progress``: ``P / (T + overhead + priced bytes)``;
``rate``: ``U / T``) reach the optimum after finitely many exact steps, as in the sweep.
``deadline`` is one evaluation at ``T = deadline_s``.

The dynamic program's table has one cell per candidate time, participant count still
missing and sample count still missing. Where it would exceed :data:`MAX_CELLS`, or sample
counts are not integers, :func:`applies` says no and the MILP plans the round instead.
"""

from __future__ import annotations

import math

import numpy as np

from legend.planner.catalog import Catalogue, FleetCosts
from legend.planner.errors import InfeasibleError
from legend.planner.sweep import (
    PROGRESS_MAX_STEPS,
    SweepResult,
    _plan_ratio,
    coupling_rows,
    priced_columns,
)
from legend.planner.types import PlanningProblem, objective_value

__all__ = ["MAX_CELLS", "applies", "solve_cover"]

# cells of the covering program's table (candidate times x counts x samples) per Dinkelbach
# step; beyond it the MILP plans the round
MAX_CELLS = 5_000_000
# candidate times per block of the table (bounds its memory)
_BLOCK_CELLS = 500_000
_ROWS = {"C9 participants", "C9s participating samples"}


def applies(problem: PlanningProblem, cat: Catalogue) -> bool:
    """Whether the only coupling rows are C9/C9s, under ``progress``, ``rate`` or
    ``deadline``, with integer sample counts and a covering table (at most every device's
    every column as a candidate time) within :data:`MAX_CELLS`."""
    opts = problem.options
    rows = set(coupling_rows(problem))
    if not rows or not rows <= _ROWS or not opts.allow_dropping:
        return False
    if opts.objective not in ("progress", "rate", "deadline"):
        return False
    samples = np.fromiter((d.num_samples for d in problem.fleet.devices), float)
    if not np.all(samples == np.round(samples)) or not np.all(samples >= 0):
        return False
    need_s, need_p = _floors(problem, samples)
    times = 1 if opts.objective == "deadline" else len(samples) * len(cat)
    return times * (need_p + 1) * (need_s + 1) <= MAX_CELLS


def _floors(problem: PlanningProblem, samples: np.ndarray) -> tuple[int, int]:
    """The sample floor (integer, rounded up) and the participant floor (at least one)."""
    opts = problem.options
    share = opts.min_sample_share
    need_s = math.ceil(share * float(samples.sum()) * (1 - 1e-9)) if share > 0 else 0
    return need_s, max(1, opts.min_participants)


class _Values:
    """Per device its fitting columns in time order, priced at any ``lam``."""

    def __init__(self, cat: Catalogue, fc: FleetCosts, t_max: float) -> None:
        t = fc.times(slice(None), cat)
        ok = fc.fits(slice(None), cat) & (t <= t_max * (1 + 1e-12))
        t = np.where(ok, t, np.inf)
        self.order = np.argsort(t, axis=1, kind="stable")
        self.t_sorted = np.take_along_axis(t, self.order, axis=1)
        self.n = len(fc)
        self.cat, self.fc = cat, fc

    def _running(self, beta: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """In each device's time order: the best priced value so far and the position of
        the column that first reached it (the fastest of equals)."""
        v = self.fc.samples[:, None] * self.cat.utility_per_sample[None, :] - lam * beta[None, :]
        vs = np.take_along_axis(v, self.order, axis=1)
        vs = np.where(np.isfinite(self.t_sorted), vs, -np.inf)
        run = np.maximum.accumulate(vs, axis=1)
        prev = np.concatenate([np.full((self.n, 1), -np.inf), run[:, :-1]], axis=1)
        rises = vs > prev
        where = np.maximum.accumulate(np.where(rises, np.arange(vs.shape[1])[None, :], -1), axis=1)
        return run, where

    def at(
        self, beta: np.ndarray, lam: float, times: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The candidate round times (``times``, or by default those at which some device's
        best priced value rises, its first fit included: between two of them nothing
        changes, so the best round time is one of them), and at each (rows) per device its
        best priced value within that time and the column (``-inf`` and ``-1`` where
        nothing fits)."""
        run, where = self._running(beta, lam)
        if times is None:
            prev = np.concatenate([np.full((self.n, 1), -np.inf), run[:, :-1]], axis=1)
            times = np.unique(self.t_sorted[(run > prev) & np.isfinite(self.t_sorted)])
        k = np.stack(
            [
                np.searchsorted(self.t_sorted[i], times * (1 + 1e-12), side="right")
                for i in range(self.n)
            ],
            axis=1,
        )
        has = k > 0
        idx = np.maximum(k - 1, 0)
        dev = np.arange(self.n)[None, :]
        a = np.where(has, run[dev, idx], -np.inf)
        pos = where[dev, idx]
        col = np.where(has & (pos >= 0), self.order[dev, np.maximum(pos, 0)], -1)
        return times, a, col


def _shift(dp: np.ndarray, axis: int, m: int) -> np.ndarray:
    """``dp`` over "still missing" states after covering ``m`` more along ``axis``: state
    ``s`` comes from ``s + m``, and state 0 from every ``s <= m``."""
    if m <= 0:
        return dp
    size = dp.shape[axis]
    out = np.full_like(dp, np.inf)
    src = [slice(None)] * dp.ndim
    dst = [slice(None)] * dp.ndim
    if m < size:
        src[axis], dst[axis] = slice(m, size), slice(0, size - m)
        out[tuple(dst)] = dp[tuple(src)]
    low = np.take(dp, np.arange(min(m + 1, size)), axis=axis).min(axis=axis)
    np.moveaxis(out, axis, 0)[0] = low
    return out


def _cover_tables(
    cost: np.ndarray, samples: np.ndarray, miss_p: np.ndarray, miss_s: np.ndarray
) -> list[np.ndarray]:
    """The covering program at every row of ``cost`` ([time, device], ``inf``: not
    available): tables ``[time, participants missing, samples missing]`` of least cost,
    one before any device and one after each."""
    T, n = cost.shape
    P, S = int(miss_p.max(initial=0)), int(miss_s.max(initial=0))
    dp = np.full((T, P + 1, S + 1), np.inf)
    dp[np.arange(T), miss_p, miss_s] = 0.0
    tables = [dp]
    for i in range(n):
        c = cost[:, i]
        if np.isfinite(c).any():
            moved = _shift(_shift(dp, 1, 1), 2, int(samples[i])) + c[:, None, None]
            dp = np.minimum(dp, moved)
        tables.append(dp)
    return tables


def _least_cover(
    cost: np.ndarray, samples: np.ndarray, miss_p: np.ndarray, miss_s: np.ndarray
) -> np.ndarray:
    """Per time the least cost of covering the missing participants and samples (``inf``:
    impossible), in blocks of times that bound the table's memory."""
    per_time = (int(miss_p.max(initial=0)) + 1) * (int(miss_s.max(initial=0)) + 1)
    step = max(1, _BLOCK_CELLS // per_time)
    out = np.empty(len(cost))
    for start in range(0, len(cost), step):
        block = slice(start, start + step)
        final = _cover_tables(cost[block], samples, miss_p[block], miss_s[block])[-1]
        out[block] = final[:, 0, 0]
    return out


def _evaluate(
    a: np.ndarray, samples: np.ndarray, need_s: int, need_p: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per time: the best total priced value of a plan meeting the floors (``-inf``: none);
    and what recovers it: the devices in for their own value, the cover's costs and the
    participants and samples missing without the cover."""
    pos = a > 0
    value = np.where(pos, a, 0.0).sum(axis=1)
    miss_p = np.maximum(need_p - pos.sum(axis=1), 0)
    miss_s = np.maximum(need_s - (pos * samples[None, :]).sum(axis=1), 0)
    cost = np.where(np.isfinite(a) & ~pos, -a, np.inf)
    if miss_p.any() or miss_s.any():
        value = value - _least_cover(cost, samples, miss_p, miss_s)
    return value, pos, cost, miss_p, miss_s


def _recover(cost: np.ndarray, samples: np.ndarray, miss_p: int, miss_s: int) -> np.ndarray:
    """The devices a least-cost cover takes (one time: ``cost`` per device), backwards
    through the tables."""
    n = len(cost)
    tables = _cover_tables(cost[None, :], samples, np.asarray([miss_p]), np.asarray([miss_s]))
    taken = np.zeros(n, dtype=bool)
    p = s = 0
    for i in range(n - 1, -1, -1):
        cur = tables[i + 1][0, p, s]
        before = tables[i][0]
        if before[p, s] <= cur:
            continue
        # the states that lead to (p, s) when device i is added
        m = int(samples[i])
        ps = [p + 1] if p > 0 else [0, 1]
        ss = [s + m] if s > 0 else list(range(m + 1))
        found = [
            (p2, s2)
            for p2 in ps
            for s2 in ss
            if p2 < before.shape[0]
            and s2 < before.shape[1]
            and math.isclose(before[p2, s2] + cost[i], cur, rel_tol=1e-12, abs_tol=1e-12)
        ]
        assert found, "internal: the covering table has no predecessor"
        taken[i] = True
        p, s = found[0]
    return taken


def _plan_at(
    vals: _Values,
    beta: np.ndarray,
    lam: float,
    times: np.ndarray | None,
    samples: np.ndarray,
    need_s: int,
    need_p: int,
) -> np.ndarray | None:
    """The plan (per device a column, ``-1``: out) that maximises its priced value meeting
    the floors minus ``lam`` times its round time, over the candidate times (``times``, or
    :meth:`_Values.at`'s); ``None`` when no candidate time admits a plan."""
    times, a, col = vals.at(beta, lam, times)
    value, pos, cost, miss_p, miss_s = _evaluate(a, samples, need_s, need_p)
    score = value - lam * times
    if not np.isfinite(score).any():
        return None
    row = int(np.argmax(score))
    keep = pos[row].copy()
    if miss_p[row] or miss_s[row]:
        keep |= _recover(cost[row], samples, int(miss_p[row]), int(miss_s[row]))
    return np.where(keep, col[row], -1)


def solve_cover(problem: PlanningProblem, cat: Catalogue, fc: FleetCosts) -> SweepResult:
    """Plan ``problem`` exactly (see the module docstring); only where :func:`applies`.

    Raises
    ------
    InfeasibleError
        No plan meets the floors; the caller explains why.
    """
    opts = problem.options
    samples = np.rint(fc.samples).astype(np.int64)
    need_s, need_p = _floors(problem, fc.samples)
    g = int(np.gcd.reduce(samples)) if len(samples) and samples.any() else 1
    if g > 1:  # sums of multiples of g reach need_s exactly when they reach it rounded up
        samples = samples // g
        need_s = -(-need_s // g)
    if opts.objective == "progress":
        beta, overhead = priced_columns(problem, cat)
    else:
        beta, overhead = np.zeros(len(cat)), 0.0
    if opts.objective == "deadline":
        assert opts.deadline_s is not None
        deadline = float(opts.deadline_s)
        vals = _Values(cat, fc, deadline)
        choice = _plan_at(vals, beta, 0.0, np.asarray([deadline]), samples, need_s, need_p)
        if choice is None:
            raise InfeasibleError("no plan meets the participation floors")
        _, utility, round_time = _plan_ratio(cat, fc, beta, 0.0, choice)
        return SweepResult(
            choice=choice, round_time_s=round_time, utility=utility, objective_value=utility
        )
    vals = _Values(cat, fc, math.inf)
    lam = 0.0
    best: tuple[float, np.ndarray] | None = None
    for _ in range(PROGRESS_MAX_STEPS):
        choice = _plan_at(vals, beta, lam, None, samples, need_s, need_p)
        if choice is None:
            raise InfeasibleError("no plan meets the participation floors")
        ratio = _plan_ratio(cat, fc, beta, overhead, choice)[0]
        if best is None or ratio > best[0]:
            best = (ratio, choice)
        if ratio <= lam * (1 + 1e-12):
            break  # max_T F(T) <= 0 at lam: no plan's ratio exceeds lam (Dinkelbach)
        lam = ratio
    assert best is not None
    ratio, choice = best
    _, utility, round_time = _plan_ratio(cat, fc, beta, overhead, choice)
    priced = overhead + float(beta[choice[choice >= 0]].sum())
    value = objective_value(opts.objective, utility, round_time, priced)
    return SweepResult(
        choice=choice, round_time_s=round_time, utility=utility, objective_value=value
    )
