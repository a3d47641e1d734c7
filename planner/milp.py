"""The catalogue MILP's drivers: O1, O2 and O3 (Dinkelbach) over a backend.

See :mod:`legend.planner.solvers` for when this path runs, and
:mod:`legend.planner.formulation` for the program.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from legend.planner.backends import MilpResult, satisfies, solve_milp
from legend.planner.catalog import Catalogue, FleetCosts, complete_catalogue
from legend.planner.diagnose import explain_infeasibility
from legend.planner.errors import InfeasibleError, SolverError
from legend.planner.formulation import (
    MILP,
    congested_links,
    decode,
    denominator_of,
    encode,
    formulate,
    round_time_of,
    staggered_cuts,
)
from legend.planner.saturation import column_slots, slot_gains
from legend.planner.sweep import SweepResult, best_columns, coupling_rows, priced_columns, sweep
from legend.planner.types import PlanningProblem, SolverOutcome

__all__ = ["MAX_COLUMNS", "solve_milp_problem"]

log = logging.getLogger(__name__)

# Programs above this many device-columns are not built (see solve_milp_problem).
MAX_COLUMNS = 2_000_000
# Dinkelbach: stop when a step improves the ratio by less than this (relative).
DINKELBACH_RTOL = 1e-9
DINKELBACH_MAX_STEPS = 50


class _Clock:
    def __init__(self, limit_s: float) -> None:
        self.end = time.perf_counter() + limit_s
        self.limit_s = limit_s

    def left(self) -> float:
        return self.end - time.perf_counter()


@dataclass(frozen=True, kw_only=True)
class _Context:
    problem: PlanningProblem
    cat: Catalogue
    fc: FleetCosts
    backend: str
    clock: _Clock
    # the (depth, rank sum) catalogue the sweep needs, when the program's differs
    base: Catalogue | None = None


def _decoupled(ctx: _Context) -> tuple[np.ndarray | None, float | None, float]:
    """The sweep's solution of the program without coupling rows (None if it has none), its
    rate and the largest utility any plan reaches (no deadline)."""
    problem = ctx.problem
    base = ctx.base if ctx.base is not None else ctx.cat
    # an upper bound on U: the additive utility bounds the saturating progress
    _, top = best_columns(base, ctx.fc, math.inf)
    u_max = float(np.where(np.isfinite(top), top, 0.0) @ ctx.fc.samples)
    try:
        res = sweep(problem, base, ctx.fc)
    except InfeasibleError:
        return None, None, u_max
    if ctx.base is not None:
        # the sweep's columns in the program's catalogue
        where = {(int(ctx.cat.depth[j]), ctx.cat.ranks[j]): j for j in range(len(ctx.cat))}
        choice = np.asarray(
            [
                where.get((int(base.depth[j]), base.ranks[j]), -1) if j >= 0 else -1
                for j in res.choice
            ],
            dtype=np.int64,
        )
        return choice, _rate(problem, res), u_max
    return res.choice, _rate(problem, res), u_max


def _rate(problem: PlanningProblem, res: SweepResult) -> float | None:
    """The sweep's ratio (an upper bound on the program's: it has no coupling rows, and its
    additive utility bounds the saturating progress)."""
    if problem.options.objective == "progress":
        return res.objective_value if res.objective_value > 0 else None
    return res.utility / res.round_time_s if res.round_time_s > 0 else None


def _checked(
    ctx: _Context,
    milp: MILP,
    *,
    abs_gap: float | None = None,
    what: str,
    utility_floor: float | None = None,
    max_utility: float | None = None,
) -> MilpResult:
    problem, clock = ctx.problem, ctx.clock
    opts = problem.options
    left = clock.left()
    if left <= 0 and milp.start is None:
        raise SolverError(
            f"{ctx.backend}: the time limit of {clock.limit_s:g} s ran out before {what}; "
            "raise time_limit_s"
        )
    if left <= 0:
        res = MilpResult(
            status="NOT_SOLVED",
            values=None,
            objective=None,
            bound=None,
            native_status="not started: the time limit ran out while formulating",
            solver_version="",
        )
    else:
        res = solve_milp(
            milp,
            ctx.backend,
            time_limit_s=left,
            mip_gap=opts.mip_gap,
            abs_gap=abs_gap,
            threads=opts.threads,
        )
    if res.status in ("OPTIMAL", "FEASIBLE"):
        return res
    if res.status == "INFEASIBLE":
        raise InfeasibleError(
            "no plan satisfies the constraints",
            explain_infeasibility(
                problem, milp.deadline_s, utility_floor=utility_floor, max_utility=max_utility
            ),
        )
    if res.status == "NOT_SOLVED" and milp.start is not None:
        # stopped before it found anything better: the warm start stands, with no proven gap
        log.warning("%s stopped at the time limit (%s); keeping the warm start", ctx.backend, what)
        return _warm_start_result(res, milp, "the warm start")
    if res.status == "NOT_SOLVED":
        raise SolverError(
            f"{ctx.backend} stopped at the time limit of {clock.limit_s:g} s without a feasible "
            f"plan ({what}; solver status {res.native_status}); raise time_limit_s"
        )
    raise SolverError(
        f"{ctx.backend} failed while {what}: status {res.status} ({res.native_status})"
    )


#: At most this many rounds of staggered-upload cuts per program (each a solve).
MAX_CUT_ROUNDS = 25


def _solved(ctx: _Context, milp: MILP, **kwargs: Any) -> tuple[MilpResult, MILP]:
    """:func:`_checked`, re-solved with a row at the solution's peak while a staggered
    link's uploads take longer than its ``T`` allows (:func:`staggered_cuts`); the result
    and the program with those rows."""
    res = _checked(ctx, milp, **kwargs)
    for _ in range(MAX_CUT_ROUNDS):
        if res.values is None:
            return res, milp
        cut = staggered_cuts(milp, res.values)
        if cut is None:
            return res, milp
        if ctx.clock.left() <= 0:
            break
        start = np.asarray(res.values, dtype=float).copy()
        start[milp.round_time] = round_time_of(milp, start)
        if start[milp.round_time] <= milp.upper[milp.round_time] and satisfies(cut, start):
            cut = replace(cut, start=start)
        milp = cut
        res = _checked(ctx, milp, **kwargs)
    log.warning(
        "%s: the staggered uploads' rows did not converge (%s)", ctx.backend, kwargs["what"]
    )
    assert res.values is not None and milp.round_time is not None
    limit = milp.upper[milp.round_time]
    if round_time_of(milp, res.values) > limit * (1 + 1e-9) + 1e-9:
        # the solution's uploads take longer than the deadline allows: not a plan
        if milp.start is not None and round_time_of(milp, milp.start) <= limit * (1 + 1e-9):
            return _warm_start_result(res, milp, "the warm start: uploads over the limit"), milp
        raise SolverError(
            f"{ctx.backend}: no plan found whose uploads through the shared links fit "
            f"{limit:.3f} s within the time limit ({kwargs['what']}); raise time_limit_s, or "
            'set contention = "together" in the topology'
        )
    return res, milp


def _with_rows_of(milp: MILP, other: MILP) -> MILP:
    """``milp`` with the rows of ``other`` (the same program with cuts added)."""
    return replace(
        milp,
        matrix=other.matrix,
        row_names=other.row_names,
        row_lower=other.row_lower,
        row_upper=other.row_upper,
    )


def _warm_start_result(res: MilpResult, milp: MILP, note: str) -> MilpResult:
    """``res`` replaced by ``milp``'s warm start: feasible, with no proven bound."""
    assert milp.start is not None
    return replace(
        res,
        status="FEASIBLE",
        values=milp.start,
        objective=float(milp.objective @ milp.start),
        bound=None,
        native_status=f"{res.native_status} ({note})",
    )


def _start(ctx: _Context, milp: MILP, choice: np.ndarray | None) -> MILP:
    """``milp`` warm-started from ``choice`` when that satisfies every row."""
    if choice is None:
        return milp
    values = encode(milp, ctx.problem, ctx.fc, choice, congested_links(ctx.problem))
    if values is None or not satisfies(milp, values):
        return milp
    return replace(milp, start=values)


def _outcome(
    ctx: _Context,
    milp: MILP,
    values: np.ndarray,
    res: MilpResult,
    *,
    status: str,
    gap: float | None,
    value: float,
    bound: float | None,
    deadline_s: float | None,
) -> SolverOutcome:
    return SolverOutcome(
        configurations=decode(milp, values),
        status=status,
        solver=ctx.backend,
        solver_version=res.solver_version,
        mip_gap=gap,
        objective_value=value,
        deadline_s=deadline_s,
        objective_bound=bound,
    )


def _deadline(ctx: _Context, deadline: float) -> SolverOutcome:
    choice, _, _ = _decoupled(ctx)
    milp = formulate(ctx.problem, ctx.cat, ctx.fc, deadline)
    milp = _start(ctx, milp, choice)
    res, milp = _solved(ctx, milp, what="maximising utility")
    assert res.values is not None
    bound = None if res.bound is None else res.bound * milp.utility_scale
    return _outcome(
        ctx,
        milp,
        res.values,
        res,
        status=res.status,
        gap=res.gap,
        value=milp.utility_value(res.values),
        bound=bound,
        deadline_s=deadline,
    )


def _min_time(ctx: _Context) -> SolverOutcome:
    problem = ctx.problem
    opts = problem.options
    choice, _, _ = _decoupled(ctx)
    max_utility = None
    if opts.utility_floor is not None:
        floor = float(opts.utility_floor)
    else:
        base = formulate(problem, ctx.cat, ctx.fc, None)
        base = _start(ctx, base, choice)
        r0 = _checked(ctx, base, what="finding the highest utility")
        assert r0.values is not None
        max_utility = base.utility_value(r0.values)
        floor = opts.utility_floor_share * max_utility
    cap = None
    if choice is not None:
        probe = formulate(problem, ctx.cat, ctx.fc, None, utility_floor=floor)
        probe = _start(ctx, probe, choice)
        if probe.start is not None:
            cap = round_time_of(probe, probe.start)
    milp = formulate(problem, ctx.cat, ctx.fc, None, utility_floor=floor, time_cap_s=cap)
    milp = _start(ctx, milp, choice)
    try:
        res, milp = _solved(
            ctx,
            milp,
            what="minimising the round time",
            utility_floor=floor,
            max_utility=max_utility,
        )
    except InfeasibleError:
        if max_utility is not None:
            raise
        base = formulate(problem, ctx.cat, ctx.fc, None)
        r0 = _checked(ctx, base, what="finding the highest utility")
        assert r0.values is not None
        raise InfeasibleError(
            "no plan satisfies the constraints",
            explain_infeasibility(
                problem, None, utility_floor=floor, max_utility=base.utility_value(r0.values)
            ),
        ) from None
    assert res.values is not None
    t = round_time_of(milp, res.values)
    return _outcome(
        ctx,
        milp,
        res.values,
        res,
        status=res.status,
        gap=res.gap,
        value=t,
        bound=res.bound,
        deadline_s=t,
    )


def _dinkelbach(ctx: _Context) -> SolverOutcome:
    problem = ctx.problem
    opts = problem.options
    choice, start_rate, u_max = _decoupled(ctx)
    if choice is not None and ctx.base is not None:
        choice = _improve_saturating(problem, ctx.cat, ctx.fc, choice)
    cap = None
    ws_rate = None
    if choice is not None:
        probe = _start(ctx, formulate(problem, ctx.cat, ctx.fc, None), choice)
        if probe.start is not None:
            t0 = denominator_of(probe, probe.start)
            if t0 > 0:
                ws_rate = probe.utility_value(probe.start) / t0
                # no plan of rate >= ws_rate takes longer than U_max / ws_rate
                cap = u_max / ws_rate * (1 + 1e-9)
    milp = formulate(problem, ctx.cat, ctx.fc, None, time_cap_s=cap)
    milp = _start(ctx, milp, choice)
    # every plan's denominator is at least this (round time, plus overhead under progress)
    t_lb = milp.time_lower_bound_s + milp.overhead_s
    lam = start_rate / milp.utility_scale if start_rate is not None else 0.0
    verified = start_rate is None
    best: tuple[float, np.ndarray, float] | None = None  # ratio, values, denominator
    if milp.start is not None:
        t0 = denominator_of(milp, milp.start)
        if t0 > 0:
            best = (float(milp.utility @ milp.start) / t0, milp.start, t0)
    if best is not None:
        # Start from the warm start's own ratio, a plan's: where coupling rows (shared
        # links, floors, saturation) make the decoupled rate only an upper bound, a step at
        # that bound favours short rounds and returns a plan worse than the warm start (a
        # wasted solve); without them the warm start is the decoupled optimum and its ratio
        # is that rate, which the first step verifies.
        lam, verified = best[0], True
    last: MilpResult | None = None
    ratio_ub = math.inf
    converged = False
    for step in range(DINKELBACH_MAX_STEPS):
        if step > 0 and ctx.clock.left() <= 0:
            break
        abs_gap = opts.mip_gap * lam * t_lb if lam > 0 else None
        sub = milp.with_rate(lam)
        if best is not None:
            sub = replace(sub, start=best[1])
        res, sub = _solved(
            ctx, sub, abs_gap=abs_gap, what=f"Dinkelbach step {step + 1} (lambda={lam:.6g})"
        )
        assert res.values is not None
        milp = _with_rows_of(milp, sub)
        last = res
        u = float(milp.utility @ res.values)
        t = denominator_of(milp, res.values)
        ratio = u / t if t > 0 else 0.0
        if best is None or ratio > best[0]:
            best = (ratio, res.values, t)
        if lam > 0 and t_lb > 0 and res.bound is not None:
            # every plan has U - lam D <= bound - lam * overhead (D its denominator, the
            # constant overhead left out of the program), so U / D <= lam + that / D_lb
            ratio_ub = min(ratio_ub, lam + max(res.bound - lam * milp.overhead_s, 0.0) / t_lb)
        if (
            res.status == "OPTIMAL"
            and best[0] > 0
            and (ratio_ub - best[0]) / best[0] <= opts.mip_gap
        ):
            # the best plan is proven within the gap: a further step would only tighten
            # the proof (a solve of the same program at its ratio)
            converged = True
            break
        if (
            lam > 0
            and ratio <= lam * (1 + DINKELBACH_RTOL)
            and (verified or ratio >= lam * (1 - DINKELBACH_RTOL))
        ):
            converged = True
            break
        lam, verified = best[0], True
    assert best is not None and last is not None
    ratio, values, _denominator = best
    gap = None if not math.isfinite(ratio_ub) or ratio <= 0 else max(0.0, ratio_ub - ratio) / ratio
    optimal = (
        converged and last.status == "OPTIMAL" and gap is not None and gap <= opts.mip_gap + 1e-9
    )
    bound = None if not math.isfinite(ratio_ub) else ratio_ub * milp.utility_scale
    return _outcome(
        ctx,
        milp,
        values,
        last,
        status="OPTIMAL" if optimal else "FEASIBLE",
        gap=gap,
        value=ratio * milp.utility_scale,
        bound=bound,
        deadline_s=round_time_of(milp, values),
    )


def _improve_saturating(
    problem: PlanningProblem, cat: Catalogue, fc: FleetCosts, choice: np.ndarray
) -> np.ndarray:
    """A better warm start for the saturating program: from the sweep's additive plan, move
    one device at a time to the column that most raises the saturating ratio
    ``P / (T + c + p MB)``, until no move does (a local optimum; the MILP proves or beats
    it). Only where the saturation rows are the only coupling rows and every device takes
    part; otherwise ``choice`` is returned unchanged."""
    opts = problem.options
    curve = problem.saturation
    if curve is None or coupling_rows(problem) != ("SAT saturating progress",):
        return choice
    if opts.allow_dropping or (choice < 0).any():
        return choice
    L = problem.spec.num_layers
    slots = column_slots(cat.ranks, L, problem.job.ranks)  # [C, Q]
    gains = slot_gains(problem.layer_weights, problem.rank_gains).ravel()
    n_bar = float(fc.samples.mean())
    w = fc.samples / n_bar
    times = fc.times(slice(None), cat)
    allowed = fc.fits(slice(None), cat)
    if not allowed[np.arange(len(choice)), choice].all():
        return choice
    price, overhead = priced_columns(problem, cat)  # seconds per device-column, per round
    choice = choice.copy()

    def ratio_of(cover: np.ndarray, t: np.ndarray, priced: np.ndarray) -> np.ndarray:
        return n_bar * (curve(cover) * gains).sum(axis=-1) / (t + overhead + priced)

    idx = np.arange(len(choice))
    for _ in range(50):
        moved = False
        for i in range(len(choice)):
            cover = (slots[choice] * w[:, None]).sum(axis=0)
            base = cover - slots[choice[i]] * w[i]
            others = np.delete(idx, i)
            t_rest = float(times[others, choice[others]].max()) if len(others) else 0.0
            priced_rest = float(price[choice[others]].sum())
            cand = np.flatnonzero(allowed[i])
            values = ratio_of(
                base[None, :] + slots[cand] * w[i],
                np.maximum(t_rest, times[i, cand]),
                priced_rest + price[cand],
            )
            current = float(
                ratio_of(
                    cover[None, :],
                    np.asarray([max(t_rest, times[i, choice[i]])]),
                    np.asarray([priced_rest + price[choice[i]]]),
                )[0]
            )
            k = int(np.argmax(values))
            if values[k] > current * (1 + 1e-12):
                choice[i] = cand[k]
                moved = True
        if not moved:
            break
    return choice


def solve_milp_problem(
    problem: PlanningProblem, cat: Catalogue, fc: FleetCosts, backend: str
) -> SolverOutcome:
    """Solve ``problem``'s MILP with ``backend`` for its objective.

    A program of more than :data:`MAX_COLUMNS` device-columns is not built (it would take
    minutes and gigabytes before the solver starts): the plan without coupling rows is
    returned when it satisfies them (``FEASIBLE``, no proven gap, path ``sweep-unproven``),
    otherwise :class:`SolverError` says so.
    """
    opts = problem.options
    base = None
    if problem.saturation is not None:
        # exact over every configuration, not only the additively best per (depth, rank sum)
        full = complete_catalogue(problem)
        if full is not None:
            cat, base = full, cat
    ctx = _Context(
        problem=problem,
        cat=cat,
        fc=fc,
        backend=backend,
        clock=_Clock(opts.time_limit_s),
        base=base,
    )
    size = len(fc) * len(cat)
    if size > MAX_COLUMNS:
        return _too_large(ctx, size)
    if opts.objective == "deadline":
        assert opts.deadline_s is not None
        return _deadline(ctx, float(opts.deadline_s))
    if opts.objective == "min-time":
        return _min_time(ctx)
    return _dinkelbach(ctx)


def _too_large(ctx: _Context, size: int) -> SolverOutcome:
    problem = ctx.problem
    choice, _, _ = _decoupled(ctx)
    why = (
        f"the MILP would have {size:,} device-columns (more than {MAX_COLUMNS:,}), too large "
        f"to build and solve within {problem.options.time_limit_s:g} s"
    )
    if choice is not None and problem.options.objective != "deadline":
        log.warning("%s; returning the plan without the coupling rows, unproven", why)
        cfg = tuple(ctx.cat.configuration(int(j)) for j in choice)
        return SolverOutcome(
            configurations=cfg,
            status="FEASIBLE",
            solver="sweep-unproven",
            solver_version="legend",
            mip_gap=None,
            objective_value=None,
        )
    raise SolverError(
        f'{ctx.backend}: {why}; plan fewer devices per round, set contention = "together" '
        "in the topology (the per-link Lagrangian planner solves that model at scale), or drop "
        "the shared links' rows (plan without the topology)"
    )
