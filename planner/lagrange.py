r"""Fleet-wide coupling rows at scale: Lagrangian bounds over the round time, and plans.

The rows that tie all devices together -- the server link (C7), coverage (C8) and the
participant minimum in devices and in samples (C9, C9s) -- are few, ``k <= 3 + D``.
Price them with multipliers ``y >= 0`` and the program separates again: at a round time
``T`` every device takes the column of the catalogue that maximises its *priced* value

.. math::

    c_{ij}(y) = n_i u_j - \sum_r y_r a_{r,ij}

(``a_r`` the column's use of row ``r``: bytes both ways for C7, uncovered samples for C8,
minus one participant for C9, minus the device's samples for C9s), and for every ``y``

.. math::

    V(T) \le L(y, T) = \sum_i \max_{j \in F_i(T)} c_{ij}(y) + \sum_r y_r b_r(T),

where ``V(T)`` is the best utility of a plan that lasts at most ``T`` and ``F_i(T)`` are
the columns that fit device ``i``'s memory and finish within ``T`` (C7's right-hand side is
``b(T) = s T`` for a link of ``s`` bytes per second). ``L`` is the Lagrangian bound, which
for a multiple-choice program equals its LP relaxation.

- O1 ``deadline``: ``min_y L(y, deadline)`` bounds the optimum.
- O3 ``rate``: on a geometric grid ``T_0 < T_1 < ...`` of round times,
  ``V(T) / T <= L(y, T_{k+1}) / T_k`` for ``T`` in ``[T_k, T_{k+1}]`` (``V`` and ``L`` do not
  decrease with ``T``), so ``max_k L(y, T_{k+1}) / T_k`` bounds the best rate; for a fixed
  ``y`` every ``L(y, T_k)`` comes from one pass over the fleet (each device's priced
  front, binned onto the grid).
- ``progress``: the denominator ``T + c + sum_i beta_{j_i}`` (``c`` the server's overhead,
  ``beta_j`` the price of column ``j``'s bytes in seconds) depends on the choice. For a
  ratio ``lambda >= 0`` price every column's bytes at ``lambda beta_j`` (one more fixed
  multiplier) and let ``G_k`` be the bound above of the values ``n_i u_j - lambda beta_j``
  at ``T_{k+1}``. A plan of round time ``T`` in ``[T_k, T_{k+1}]`` with progress ``P`` and
  priced bytes ``B`` has ``P - lambda B <= G_k``, so its ratio is at most
  ``(G_k + lambda B) / (T_k + c + B) <= max(lambda, G_k / (T_k + c))`` (a mediant):
  ``max(lambda, max_k G_k / (T_k + c))`` bounds the best ratio for every ``lambda``. It is
  tightest at the optimum's ratio, so ``lambda`` follows the best plan found (Dinkelbach
  steps), first on the coarse grid, then on the fine one, where coarse intervals whose
  bound still exceeds the plan by more than half of ``mip_gap`` are refined as well.

The multipliers minimise the bound by Kelley's cutting planes (a convex function of ``y``
of a few dimensions). Plans come from the priced choice at the best ``y`` and the most
promising round times, repaired to the rows (coverage upgrades, or byte cuts under a fixed
deadline) and evaluated on their true round time (the slowest device, or the server link's
time for the round's bytes). The plan's proven relative gap is
``(bound - objective) / objective``; it is ``FEASIBLE`` unless the gap is within
``mip_gap``. A plan found this way is never worse than what the bound says is possible
minus that gap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from legend.planner.catalog import Catalogue, FleetCosts
from legend.planner.errors import InfeasibleError
from legend.planner.sweep import fastest_times, priced_columns
from legend.planner.types import PlanningProblem, SolverOutcome

__all__ = ["applies", "solve_lagrangian"]

MB = 1e6
_GRID_RATIO = 1.0 + 1e-4  # consecutive round times of the fine grid
_MAX_CUTS = 60
_DINKELBACH_STEPS = 8  # ``progress``: steps of the ratio that prices the bytes, coarse grid
_REFINE_STEPS = 12  # ``progress``: Dinkelbach steps and refinements on the fine grid


def applies(problem: PlanningProblem) -> bool:
    """Whether the coupling rows are only fleet-wide ones (no shared links of a topology)
    and the objective is ``progress``, ``rate`` or ``deadline``."""
    topo = problem.topology
    if topo is not None and topo.congested(problem.fleet):
        return False
    if problem.saturation is not None:
        return False
    return problem.options.objective in ("progress", "rate", "deadline")


@dataclass(frozen=True, kw_only=True)
class _Rows:
    """Coupling rows in the form ``sum_i n_i^e_r a_r[j_i] <= b_r(T)``."""

    names: tuple[str, ...]
    coef: np.ndarray  # [row, column] use per column (participating columns only)
    by_samples: np.ndarray  # [row] whether the use is multiplied by the device's samples
    rhs_const: np.ndarray  # [row]
    rhs_per_s: np.ndarray  # [row] coefficient of T in the right-hand side

    def rhs(self, t: float | np.ndarray) -> np.ndarray:
        return self.rhs_const[:, None] + self.rhs_per_s[:, None] * np.atleast_1d(t)[None, :]


def _rows(problem: PlanningProblem, cat: Catalogue) -> _Rows:
    opts = problem.options
    names, coef, by_samples, const, per_s = [], [], [], [], []
    if opts.server_mbps is not None:
        names.append("C7")
        coef.append(2.0 * cat.bytes_one_way / MB)
        by_samples.append(False)
        const.append(0.0)
        per_s.append(opts.server_mbps / 8.0)  # MB per second
    if opts.coverage_share > 0 and opts.coverage_layers > 1:
        for r in range(2, min(opts.coverage_layers, cat.num_layers) + 1):
            names.append(f"C8[{cat.num_layers - r}]")
            # q n_i - n_i [d_j >= r] <= 0 summed over participants
            coef.append(opts.coverage_share - (cat.depth >= r).astype(float))
            by_samples.append(True)
            const.append(0.0)
            per_s.append(0.0)
    if opts.allow_dropping and opts.min_participants > 0:
        names.append("C9")
        coef.append(-np.ones(len(cat)))
        by_samples.append(False)
        const.append(-float(opts.min_participants))
        per_s.append(0.0)
    if opts.allow_dropping and opts.min_sample_share > 0:
        names.append("C9s")
        coef.append(-np.ones(len(cat)))
        by_samples.append(True)
        # in the scaled samples n_i / mean(n) the fleet's samples sum to its size
        const.append(-opts.min_sample_share * len(problem.fleet) * (1 - 1e-9))
        per_s.append(0.0)
    return _Rows(
        names=tuple(names),
        coef=np.asarray(coef, dtype=float).reshape(len(names), len(cat)),
        by_samples=np.asarray(by_samples, dtype=bool),
        rhs_const=np.asarray(const, dtype=float),
        rhs_per_s=np.asarray(per_s, dtype=float),
    )


class _Fleet:
    """Each device's columns in time order (those within ``t_far``), for repeated pricing."""

    def __init__(self, cat: Catalogue, fc: FleetCosts, t_far: float, scale: float) -> None:
        self.cat, self.fc = cat, fc
        n = len(fc)
        orders, times = [], []
        width = 0
        for sl in fc.chunks(len(cat)):
            t = fc.times(sl, cat)
            t = np.where(fc.fits(sl, cat) & (t <= t_far * (1 + 1e-12)), t, np.inf)
            o = np.argsort(t, axis=1, kind="stable")
            ts = np.take_along_axis(t, o, axis=1)
            width = max(width, int(np.isfinite(ts).sum(axis=1).max(initial=0)))
            orders.append(o)
            times.append(ts)
        self.times = np.concatenate(times)[:, :width]
        # entries past a device's columns point at a sentinel column priced -inf
        order = np.concatenate(orders)[:, :width]
        self.order = np.where(np.isfinite(self.times), order, len(cat)).astype(np.int32)
        self.n = n
        self.samples = fc.samples / scale

    def priced(self, rows: _Rows, u: np.ndarray, y: np.ndarray, cost: np.ndarray) -> np.ndarray:
        """``c_ij(y) = n_i u_j - cost_j - sum_r y_r a_r,ij`` over each device's time-ordered
        columns (``-inf`` beyond its columns); ``cost`` is the price of each column's bytes
        under ``progress`` (zero otherwise)."""
        alpha = u - (y[rows.by_samples] @ rows.coef[rows.by_samples])
        beta = -cost - (y[~rows.by_samples] @ rows.coef[~rows.by_samples])
        c = np.append(alpha, -np.inf)[self.order]
        c *= self.samples[:, None]
        c += np.append(beta, 0.0)[self.order]
        return c


@dataclass(frozen=True, kw_only=True)
class _Eval:
    bound: float
    grad: np.ndarray
    top: np.ndarray  # round times (interval upper ends) by decreasing bound
    values: np.ndarray  # the bound of every interval


def _choice(fl: _Fleet, c: np.ndarray, t: float, dropping: bool) -> np.ndarray:
    """Per device the column (catalogue index) of highest priced value within ``t``; ``-1``
    when nothing fits or (with dropping) sitting out is better."""
    ok = fl.times <= t * (1 + 1e-12)
    vals = np.where(ok, c, -np.inf)
    k = vals.argmax(axis=1)
    best = vals[np.arange(fl.n), k]
    choice = fl.order[np.arange(fl.n), k].astype(np.int64)
    bad = ~np.isfinite(best)
    if dropping:
        bad |= best < 0
    return np.where(bad, -1, choice)


def _usage(rows: _Rows, fl: _Fleet, choice: np.ndarray) -> np.ndarray:
    part = choice >= 0
    safe = np.maximum(choice, 0)
    use = rows.coef[:, safe] * part[None, :]
    use = np.where(rows.by_samples[:, None], use * fl.samples[None, :], use)
    return use.sum(axis=1)


@dataclass(frozen=True, kw_only=True)
class _Priced:
    """What ``progress`` adds to a plan's round time: per column the price of its bytes in
    seconds (``beta``), and the server's overhead; zero for the other objectives."""

    beta: np.ndarray
    overhead: float

    @classmethod
    def of(cls, problem: PlanningProblem, cat: Catalogue) -> _Priced:
        if problem.options.objective != "progress":
            return cls(beta=np.zeros(len(cat)), overhead=0.0)
        beta, overhead = priced_columns(problem, cat)
        return cls(beta=beta, overhead=overhead)


def solve_lagrangian(problem: PlanningProblem, cat: Catalogue, fc: FleetCosts) -> SolverOutcome:
    """Plan ``problem`` (fleet-wide coupling rows only; see the module docstring)."""
    opts = problem.options
    dropping = opts.allow_dropping
    scale = float(fc.samples.mean())
    rows = _rows(problem, cat)
    u = cat.utility_per_sample
    deadline = float(opts.deadline_s) if opts.objective == "deadline" else None
    progress = opts.objective == "progress"
    priced = _Priced.of(problem, cat)
    fastest = fastest_times(cat, fc)
    able = np.isfinite(fastest)
    if not able.any():
        raise InfeasibleError("no plan: no device can run even its smallest configuration")
    t_lo = float(fastest[able].min() if dropping else fastest.max())
    if deadline is not None:
        t_far = deadline
    else:
        # beyond t_far every column fits and the link never binds: nothing changes
        t_cols = float(np.max(np.where(able, _slowest_fit(cat, fc), 0.0)))
        t_link = 0.0
        if opts.server_mbps is not None:
            t_link = 2.0 * float(cat.bytes_one_way.max()) * len(fc) / (opts.server_mbps * MB / 8)
        t_far = max(t_lo, t_cols, t_link) * (1 + 1e-9)
    fl = _Fleet(cat, fc, t_far, scale)
    if fl.times.shape[1] == 0:
        from legend.planner.diagnose import blocked_devices

        raise InfeasibleError(
            f"no plan: no device finishes any configuration within {t_far:.6g} s",
            tuple(str(b) for b in blocked_devices(problem, deadline)),
        )
    ymax = _y_box(rows, fl, u)

    def evaluator(lam: float):  # type: ignore[no-untyped-def]
        """The bound over round-time intervals ``[lower, upper]`` (``upper`` sorted), with
        the bytes priced at the ratio ``lam`` (``progress``; 0 otherwise)."""
        cost = lam * priced.beta

        def evaluate(y: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> _Eval:
            c = fl.priced(rows, u, y, cost)
            run = np.maximum.accumulate(c, axis=1)
            if dropping:
                np.maximum(run, 0.0, out=run)
            inc = np.empty_like(run)
            np.subtract(run[:, 1:], run[:, :-1], out=inc[:, 1:])
            # a device's first column counts in full, even when its priced value is
            # negative (with dropping, against sitting out at 0)
            inc[:, 0] = run[:, 0]
            rises = inc > 0
            if not dropping:
                rises[:, 0] = np.isfinite(run[:, 0])
            b = np.searchsorted(upper, fl.times[rises] * (1 - 1e-12), side="left")
            within = b < len(upper)
            g = np.cumsum(np.bincount(b[within], weights=inc[rises][within], minlength=len(upper)))
            if not dropping:
                # below the slowest device's first column no plan exists
                g = np.where(upper >= t_lo * (1 - 1e-12), g, -np.inf)
            rhs = y @ rows.rhs(upper)
            denoms = np.ones(len(upper)) if deadline is not None else lower + priced.overhead
            values = (g + rhs) / denoms
            order = np.argsort(-values, kind="stable")
            k = int(order[0])
            ch = _choice(fl, c, float(upper[k]), dropping)
            grad = (rows.rhs(float(upper[k]))[:, 0] - _usage(rows, fl, ch)) / float(denoms[k])
            return _Eval(bound=float(values[k]), grad=grad, top=upper[order[:8]], values=values)

        return evaluate

    def plan_at(lam: float, y: np.ndarray, top: np.ndarray) -> _Plan:
        return _best_plan(problem, cat, fc, fl, rows, y, top, priced, lam)

    clock_end = time.perf_counter() + opts.time_limit_s
    if deadline is not None:
        upper = lower = np.asarray([deadline])
    else:
        upper = _geometric(t_lo, t_far, 1.02)
        lower = np.concatenate(([upper[0]], upper[:-1]))
    # the coarse pass only finds the promising round times and a starting price
    coarse_tol = 1e-6 if deadline is not None else 1e-3
    lam = 0.0
    best_y, best = _kelley(evaluator(lam), upper, lower, ymax, rows, clock_end, tol=coarse_tol)
    plan: _Plan | None = None
    if progress:
        # Dinkelbach on the coarse grid: price the bytes at the best plan's ratio
        plan = plan_at(lam, best_y, best.top)
        for _ in range(_DINKELBACH_STEPS):
            if plan.value <= lam * (1 + 1e-4) or time.perf_counter() > clock_end:
                break
            lam = plan.value
            best_y, best = _kelley(
                evaluator(lam), upper, lower, ymax, rows, clock_end, y0=best_y, tol=coarse_tol
            )
            plan = max(plan, plan_at(lam, best_y, best.top), key=lambda p: p.value)
    if deadline is None:
        # refine the most promising coarse intervals on a fine grid; keep the coarse
        # bound elsewhere, so that the bound holds over every round time
        upper, lower = _refine(upper, lower, np.isin(upper, best.top[:4]))
    for _ in range(_REFINE_STEPS if progress else 1):
        if deadline is None:
            best_y, best = _kelley(
                evaluator(lam), upper, lower, ymax, rows, clock_end, y0=best_y, tol=1e-6
            )
        cand = plan_at(lam, best_y, best.top)
        plan = cand if plan is None else max(plan, cand, key=lambda p: p.value)
        # every plan's ratio is at most max(lam, bound) (see the module docstring)
        bound = max(lam, best.bound)
        if (
            not progress
            or bound - plan.value <= opts.mip_gap * plan.value
            or time.perf_counter() > clock_end
        ):
            break
        # a Dinkelbach step where the plan's ratio rose by more than a quarter of the gap
        # asked for, and the fine grid where coarse intervals keep the bound loose
        step = plan.value > lam * (1 + max(opts.mip_gap / 4, 1e-9))
        wide = upper > lower * _GRID_RATIO * (1 + 1e-9)
        loose = wide & (best.values > plan.value * (1 + opts.mip_gap / 2))
        if not step and not loose.any():
            break
        if step:
            lam = plan.value
        upper, lower = _refine(upper, lower, loose)
    assert plan is not None
    return bounded_outcome(
        cat,
        plan.choice,
        solver="lagrangian",
        value=plan.value,
        bound=bound,
        scale=scale,
        round_time=plan.round_time,
        mip_gap=opts.mip_gap,
    )


def bounded_outcome(
    cat: Catalogue,
    choice: np.ndarray,
    *,
    solver: str,
    value: float,
    bound: float,
    scale: float,
    round_time: float,
    mip_gap: float,
) -> SolverOutcome:
    """The outcome of a plan of objective ``value`` with a proven ``bound`` (both in units
    of ``scale``): its gap, and ``OPTIMAL`` when that is within ``mip_gap``."""
    finite = math.isfinite(bound)
    gap = max(0.0, bound - value) / value if value > 0 and finite else None
    return SolverOutcome(
        configurations=tuple(cat.configuration(int(j)) for j in choice),
        status="OPTIMAL" if gap is not None and gap <= mip_gap else "FEASIBLE",
        solver=solver,
        solver_version="legend",
        mip_gap=gap,
        objective_value=value * scale,
        deadline_s=round_time,
        objective_bound=max(bound, value) * scale if finite else None,
    )


def _geometric(lo: float, hi: float, ratio: float) -> np.ndarray:
    if hi <= lo * (1 + 1e-12):
        return np.asarray([lo])
    n = math.ceil(math.log(hi / lo) / math.log(ratio))
    return lo * ratio ** np.arange(n + 1)


def _refine(upper: np.ndarray, lower: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, ...]:
    """The intervals ``[lower, upper]`` with those in ``which`` cut on the fine grid."""
    parts_u, parts_l = [upper[~which]], [lower[~which]]
    for k in np.flatnonzero(which):
        fine = _geometric(lower[k], upper[k], _GRID_RATIO)
        parts_u.append(fine)
        parts_l.append(np.concatenate(([fine[0]], fine[:-1])))
    upper = np.concatenate(parts_u)
    lower = np.concatenate(parts_l)
    order = np.argsort(upper, kind="stable")
    return upper[order], lower[order]


def _slowest_fit(cat: Catalogue, fc: FleetCosts) -> np.ndarray:
    """Per device the longest round time of any column that fits its memory."""
    out = np.zeros(len(fc))
    for d, cols in cat.by_depth():
        fits = cat.memory_bytes[cols][None, :] <= fc.memory_capacity[:, None] * (1 + 1e-9)
        k = fits.sum(axis=1)
        last = cols[np.maximum(k - 1, 0)]
        t = fc.time_const + fc.time_per_layer * d + fc.time_per_rank * cat.rank_sum[last]
        out = np.where(k > 0, np.maximum(out, t), out)
    return out


def _y_box(rows: _Rows, fl: _Fleet, u: np.ndarray) -> np.ndarray:
    """Upper bounds of the multipliers: beyond them a row's price exceeds any utility."""
    top = float(fl.samples.max() * u.max()) * 4.0 + 1.0
    out = []
    for r in range(len(rows.names)):
        a = np.abs(rows.coef[r])
        smallest = float(a[a > 0].min()) if (a > 0).any() else 1.0
        if rows.by_samples[r]:
            smallest *= float(fl.samples.min())
        out.append(top / smallest)
    return np.asarray(out)


def _kelley(evaluate, upper, lower, ymax, rows, clock_end, y0=None, tol=1e-6):  # type: ignore[no-untyped-def]
    """Minimise the convex bound over ``0 <= y <= ymax`` by cutting planes."""
    from scipy.optimize import linprog

    k = len(rows.names)
    y = np.zeros(k) if y0 is None else np.asarray(y0, dtype=float)
    cuts_a: list[np.ndarray] = []
    cuts_b: list[float] = []
    best_y, best = y, evaluate(y, upper, lower)
    ev = best
    for _ in range(_MAX_CUTS):
        cuts_a.append(ev.grad)
        cuts_b.append(ev.bound - float(ev.grad @ y))
        if k == 0 or time.perf_counter() > clock_end:
            break
        # min z s.t. z >= b_t + a_t . y
        c = np.concatenate([np.zeros(k), [1.0]])
        a_ub = np.column_stack([np.asarray(cuts_a), -np.ones(len(cuts_a))])
        res = linprog(
            c,
            A_ub=a_ub,
            b_ub=-np.asarray(cuts_b),
            bounds=[(0.0, float(m)) for m in ymax] + [(None, None)],
            method="highs",
        )
        if res.status != 0:
            break
        floor = float(res.x[-1])
        if best.bound - floor <= tol * max(1.0, abs(best.bound)):
            break
        y = np.asarray(res.x[:k])
        ev = evaluate(y, upper, lower)
        if ev.bound < best.bound:
            best_y, best = y, ev
    return best_y, best


@dataclass(frozen=True, kw_only=True)
class _Plan:
    choice: np.ndarray
    value: float  # the objective, in units of the mean number of samples
    round_time: float


def _best_plan(problem, cat, fc, fl, rows, y, candidates, priced, lam):  # type: ignore[no-untyped-def]
    """The best repaired plan over candidate round times, each device taking its best column
    at the prices ``y`` and (``progress``) its bytes priced at the ratio ``lam``."""
    opts = problem.options
    dropping = opts.allow_dropping
    u = cat.utility_per_sample
    c = fl.priced(rows, u, y, lam * priced.beta)
    best: _Plan | None = None
    for t in np.unique(candidates):
        choice = _choice(fl, c, float(t), dropping)
        choice = _repair(problem, cat, fl, rows, c, choice, float(t))
        if choice is None:
            continue
        value, round_time = _value(problem, cat, fc, fl, choice, priced)
        if best is None or value > best.value:
            best = _Plan(choice=choice, value=value, round_time=round_time)
    if best is None:
        raise InfeasibleError(
            "no plan found that meets the server link, coverage and participant rows together"
        )
    return best


def _value(problem, cat, fc, fl, choice, priced):  # type: ignore[no-untyped-def]
    opts = problem.options
    part = choice >= 0
    safe = np.maximum(choice, 0)
    util = float((fl.samples * cat.utility_per_sample[safe] * part).sum())
    t = fc.time_const + fc.time_per_layer * cat.depth[safe] + fc.time_per_rank * cat.rank_sum[safe]
    round_time = float(t[part].max()) if part.any() else 0.0
    if opts.server_mbps is not None:
        moved = 2.0 * float(cat.bytes_one_way[safe][part].sum())
        round_time = max(round_time, moved / (opts.server_mbps * MB / 8))
    if opts.objective == "deadline":
        return util, round_time
    denominator = round_time + priced.overhead + float(priced.beta[safe][part].sum())
    return (util / denominator if denominator > 0 else 0.0), round_time


def _repair(problem, cat, fl, rows, c, choice, t):  # type: ignore[no-untyped-def]
    """Make ``choice`` satisfy the rows at round time ``t`` with the least priced loss, or
    None. C7 binds only under a fixed deadline (otherwise the round simply lasts longer)."""
    opts = problem.options
    fixed = opts.objective == "deadline"
    ok = fl.times <= t * (1 + 1e-12)
    cols = np.minimum(fl.order, len(cat) - 1)  # the sentinel is priced -inf: never taken
    n = fl.n
    idx = np.arange(n)
    for _ in range(4 * len(rows.names) + 4):
        use = _usage(rows, fl, choice)
        rhs = rows.rhs(t)[:, 0]
        over = use - rhs
        viol = [
            r
            for r, name in enumerate(rows.names)
            if over[r] > 1e-9 * max(1.0, abs(rhs[r])) and (fixed or name != "C7")
        ]
        if not viol:
            return choice
        r = viol[0]
        # per device: the column within t that most reduces row r per unit of priced loss
        cur = np.maximum(choice, 0)
        a_cur = rows.coef[r][cur] * (choice >= 0)
        a_new = rows.coef[r][cols]
        if rows.by_samples[r]:
            a_cur = a_cur * fl.samples
            a_new = a_new * fl.samples[:, None]
        pos = np.argmax(cols == cur[:, None], axis=1)
        c_cur = np.where(choice >= 0, c[idx, pos], 0.0)
        cut = a_cur[:, None] - a_new
        loss = c_cur[:, None] - c
        good = ok & (cut > 0) & np.isfinite(c)
        score = np.where(good, cut / np.maximum(loss, 1e-12), -np.inf)
        flat = np.argsort(-score, axis=None)
        need = over[r]
        taken = np.zeros(n, dtype=bool)
        for f in flat:
            i, k = divmod(int(f), cols.shape[1])
            if not np.isfinite(score[i, k]):
                break
            if taken[i]:
                continue
            choice[i] = cols[i, k]
            taken[i] = True
            need -= cut[i, k]
            if need <= 0:
                break
        if need > 0:
            return None
    return None
