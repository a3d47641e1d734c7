r"""Shared links of a topology at scale: per-link Lagrangian bounds over the round time.

With a topology, a congested link ``e`` shared by the devices ``I_e`` adds to the round
(rows C10 of :mod:`legend.planner.formulation`)

.. math::

    o_{ij} + L_e \le T \quad (i \in I_e), \qquad L_e = \kappa_e \sum_{i \in I_e} B_{j_i},

with ``o_ij`` the device's compute time plus its own transfer in the directions where ``e``
is not congested and ``kappa_e`` the link's seconds per byte over its congested directions.
A link that carries a single device of the fleet only lengthens that device's own time:
its *own time* is ``tau_ij = max(t_ij, o_iej + kappa_e B_j)`` over such links. When every
device is on at most one link shared with others, the links are independent at a fixed
round time ``T``: link ``e`` has ``D = T - L_e`` left for its slowest member, and

.. math::

    V_e(T) = \max \{ \textstyle\sum_{i \in I_e} v_{ij_i} :
        \tau_{ij_i} \le T,\ o_{ij_i} \le D,\ \kappa_e \sum_i B_{j_i} \le T - D \}.

Pricing the link's bytes with ``p_e >= 0`` (utility per second of link time) separates the
devices again, while ``D`` is kept exact:

.. math::

    V_e(T) \le h_e(p_e, T) = \max_{D \le T} \Big[ \sum_{i \in I_e}
        \max_{j:\ \tau_{ij} \le T,\ o_{ij} \le D} (v_{ij} - p_e \kappa_e B_j) + p_e (T - D) \Big].

Each device's best priced column as a function of ``D`` is a running maximum over its
columns in order of ``o``; merging the points where it rises (about one column in ten),
every link's devices at once in order of ``o``, gives ``h_e`` in one pass. ``h_e`` is
convex in ``p_e`` with subgradient ``T - D* - kappa_e sum B*``: each link's price is found
by a bracketing cutting-plane search, all links at once. Devices on no shared link add
``max_{tau_ij <= T} v_ij``.

- O1 ``deadline``: ``sum_e min_p h_e(p, deadline)`` (plus the unlinked devices) bounds the
  optimum.
- O3 ``rate``: ``V(T)`` does not decrease with ``T``, so on ``[T_k, T_{k+1}]``
  ``V(T) / T <= V^ub(T_{k+1}) / T_k``. Tighter, since ``h_e(p, T) - p T`` does not
  decrease with ``T`` either and the priced link time ``p T`` is most of ``h_e``:
  ``V(T) / T <= (F(T_{k+1}) + sum_e (h_e(p_e, T_{k+1}) - p_e T_{k+1})) / T_k + sum_e p_e``
  (``F`` the unlinked devices). The intervals start on a geometric grid between a
  proven lower bound of the round time and ``U_max / rho`` (no plan slower than that beats
  the best rate ``rho`` found); the interval of highest bound is refined (another price step
  at its end, or a split) until the bound is within the gap or the time limit is reached.
  Intervals are first bounded without the links (``p = 0``), which is cheap.

Plans come from the priced choice at a price that keeps each link within ``T`` (a device's
best priced column within ``D*``), improved greedily one device at a time while every row
holds, and evaluated on their true round time (the slowest own time and every shared link's
``L_e + max o``), the same round time :func:`legend.planner.topology.predicted_round_time`
gives. The proven relative gap is ``(bound - objective) / objective``; the status is
``OPTIMAL`` when it is within ``mip_gap``, otherwise ``FEASIBLE``.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass

import numpy as np

from legend.planner.catalog import Catalogue, FleetCosts
from legend.planner.errors import InfeasibleError
from legend.planner.formulation import CongestedLink, congested_links
from legend.planner.lagrange import bounded_outcome
from legend.planner.types import PlanningProblem, SolverOutcome

__all__ = ["applies", "solve_link_lagrangian"]

MB = 1e6
_TOL = 1e-12  # relative slack when comparing times
_PRICE_STEPS = 10  # price steps per round time before an interval counts as settled
_SPLIT_MIN = 2.5e-4  # intervals narrower than this (relative) are not split further


def _shared(
    problem: PlanningProblem,
) -> tuple[tuple[CongestedLink, ...], tuple[CongestedLink, ...]]:
    """The congested links that carry several devices of the fleet, and those with one."""
    links = congested_links(problem)
    return (
        tuple(cl for cl in links if len(cl.devices) > 1),
        tuple(cl for cl in links if len(cl.devices) == 1),
    )


def applies(problem: PlanningProblem) -> bool:
    """Whether the only coupling rows are a topology's shared links (C10) under the
    ``"together"`` contention model, every device is on at most one link shared with other
    devices, and the objective is ``rate`` or ``deadline``."""
    opts = problem.options
    if problem.topology is None or opts.objective not in ("rate", "deadline"):
        return False
    if problem.topology.contention != "together":
        return False
    if opts.server_mbps is not None:
        return False
    if opts.coverage_share > 0 and opts.coverage_layers > 1:
        return False
    if opts.allow_dropping and (opts.min_participants > 0 or opts.min_sample_share > 0):
        return False
    shared, _ = _shared(problem)
    if not shared:
        return False
    seen = np.zeros(len(problem.fleet), dtype=np.int64)
    for cl in shared:
        seen[cl.devices] += 1
    return bool(seen.max() <= 1)


def _own_uncongested(fc: FleetCosts, cl: CongestedLink, idx: np.ndarray) -> np.ndarray:
    """Seconds per byte of the devices' own transfers in the directions ``cl`` leaves free."""
    out = np.zeros(len(idx))
    if not cl.down:
        out += fc.down_s_per_byte[idx]
    if not cl.up:
        out += fc.up_s_per_byte[idx]
    return out


class _Model:
    """Every device's columns with their own time ``tau``, link time ``o``, bytes and value;
    devices on a shared link in rows sorted by ``o``, merged per link."""

    def __init__(self, problem: PlanningProblem, cat: Catalogue, fc: FleetCosts) -> None:
        opts = problem.options
        self.cat, self.fc = cat, fc
        self.dropping = opts.allow_dropping
        n = len(fc)
        self.n = n
        self.scale = float(fc.samples.mean())
        shared, single = _shared(problem)
        self.shared = shared
        self.single = single
        link_of = np.full(n, -1, dtype=np.int64)
        for k, cl in enumerate(shared):
            link_of[cl.devices] = k
        self.link_of = link_of
        self.kappa = np.asarray([cl.s_per_byte * MB for cl in shared])  # s per MB
        # per device: seconds per byte added to o (own transfer where the shared link is free)
        o_spb = np.zeros(n)
        for cl in shared:
            o_spb[cl.devices] = _own_uncongested(fc, cl, cl.devices)
        self.o_spb = o_spb
        # singleton links: (device, seconds per byte of the link, own free-direction s/byte)
        self.single_dev = np.asarray([int(cl.devices[0]) for cl in single], dtype=np.int64)
        self.single_k = np.asarray([cl.s_per_byte for cl in single])
        self.single_own = np.asarray(
            [float(_own_uncongested(fc, cl, cl.devices)[0]) for cl in single]
        )
        # every congested link's members, flat: (link, device, own free-direction s/byte)
        every = (*shared, *single)
        self.member_link = np.repeat(np.arange(len(every)), [len(cl.devices) for cl in every])
        self.member_dev = np.concatenate([cl.devices for cl in every] or [np.zeros(0, int)])
        self.member_own = np.concatenate(
            [_own_uncongested(fc, cl, cl.devices) for cl in every] or [np.zeros(0)]
        )
        self.link_spb = np.asarray([cl.s_per_byte for cl in every])
        self.bytes_mb = cat.bytes_one_way / MB
        self.u = cat.utility_per_sample
        self.v_scale = fc.samples / self.scale

    # -- per-device column costs ----------------------------------------------------------
    def compute(self, rows: np.ndarray) -> np.ndarray:
        fc, cat = self.fc, self.cat
        return (
            fc.compute_const[rows, None]
            + fc.compute_per_layer[rows, None] * cat.depth[None, :]
            + fc.compute_per_rank[rows, None] * cat.rank_sum[None, :]
        )

    def own_times(self, rows: np.ndarray) -> np.ndarray:
        """``tau[i, j]``: the device's own time, with the links it alone uses."""
        t = self.fc.times(rows, self.cat)
        if len(self.single_dev):
            hit = np.isin(self.single_dev, rows)
            if hit.any():
                pos = {int(r): k for k, r in enumerate(rows)}
                c = None
                for s in np.flatnonzero(hit):
                    d = int(self.single_dev[s])
                    if c is None:
                        c = self.compute(rows)
                    k = pos[d]
                    extra = c[k] + self.cat.bytes_one_way * (self.single_own[s] + self.single_k[s])
                    t[k] = np.maximum(t[k], extra)
        return t

    def link_o(self, rows: np.ndarray) -> np.ndarray:
        return self.compute(rows) + self.cat.bytes_one_way[None, :] * self.o_spb[rows, None]


@dataclass(frozen=True, kw_only=True)
class _Free:
    """Devices on no shared link: the fleet's best utility as a step function of ``T``."""

    times: np.ndarray  # sorted
    cum: np.ndarray  # utility once every time up to times[k] is allowed
    t_min: float  # below this some device has no column (without dropping)

    def value(self, t: float) -> float:
        if t < self.t_min * (1 - _TOL):
            return -math.inf
        k = int(np.searchsorted(self.times, t * (1 + _TOL), side="right"))
        return float(self.cum[k - 1]) if k > 0 else 0.0


def _free_steps(model: _Model, rows: np.ndarray, t_far: float) -> _Free:
    """:class:`_Free` for devices ``rows`` (each device's best value within ``T``)."""
    ts: list[np.ndarray] = []
    incs: list[np.ndarray] = []
    t_min = 0.0
    cat, fc = model.cat, model.fc
    step = max(1, 2_000_000 // max(len(cat), 1))
    for s in range(0, len(rows), step):
        r = rows[s : s + step]
        tau = model.own_times(r)
        ok = fc.fits(r, cat) & (tau <= t_far * (1 + 1e-9))
        tau = np.where(ok, tau, np.inf)
        order = np.argsort(tau, axis=1, kind="stable")
        tt = np.take_along_axis(tau, order, axis=1)
        vv = model.v_scale[r, None] * model.u[order]
        vv = np.where(np.isfinite(tt), vv, -np.inf)
        run = np.maximum.accumulate(vv, axis=1)
        if model.dropping:
            run = np.maximum(run, 0.0)
            prev = np.concatenate([np.zeros((len(r), 1)), run[:, :-1]], axis=1)
        else:
            first = np.isfinite(tt[:, 0])
            if not first.all():
                raise InfeasibleError("no plan: some device cannot run any configuration")
            t_min = max(t_min, float(tt[:, 0].max()))
            prev = np.concatenate([np.zeros((len(r), 1)), run[:, :-1]], axis=1)
        inc = run - prev
        rises = (inc > 0) & np.isfinite(tt)
        if not model.dropping:
            rises[:, 0] = True
        ts.append(tt[rises])
        incs.append(inc[rises])
    t = np.concatenate(ts) if ts else np.zeros(0)
    inc = np.concatenate(incs) if incs else np.zeros(0)
    order = np.argsort(t, kind="stable")
    return _Free(times=t[order], cum=np.cumsum(inc[order]), t_min=t_min)


@dataclass(frozen=True, kw_only=True)
class _Eval:
    h: np.ndarray  # [link] bound
    slack: np.ndarray  # [link] T - D* - kappa sum B*
    d_star: np.ndarray  # [link] D of the maximiser


class _Linked:
    """Devices on shared links: rows of columns sorted by ``o``, merged per link."""

    def __init__(self, model: _Model, t_far: float) -> None:
        cat, fc = model.cat, model.fc
        rows = np.flatnonzero(model.link_of >= 0)
        rows = rows[np.argsort(model.link_of[rows], kind="stable")]
        self.rows = rows
        link = model.link_of[rows]
        self.link = link
        E = len(model.shared)
        self.E = E
        kappa = model.kappa
        self.kappa = kappa
        self.model_bytes = model.bytes_mb
        bmin = float(model.bytes_mb.min()) if len(cat) else 0.0
        count = np.bincount(link, minlength=E)
        self.count = count
        # the least bytes the other members of the link move
        others = kappa[link] * bmin * (count[link] - 1)
        if model.dropping:
            others = np.zeros(len(rows))
        tau = model.own_times(rows)
        o = model.link_o(rows)
        ok = (
            fc.fits(rows, cat)
            & (tau <= t_far * (1 + 1e-9))
            & (
                o + kappa[link, None] * model.bytes_mb[None, :] + others[:, None]
                <= t_far * (1 + 1e-9)
            )
        )
        if not model.dropping and not ok.any(axis=1).all():
            raise InfeasibleError("no plan: some device on a shared link cannot run in time")
        o = np.where(ok, o, np.inf)
        order = np.argsort(o, axis=1, kind="stable")
        width = int(ok.sum(axis=1).max(initial=0))
        extra = 1 if model.dropping else 0
        order = order[:, :width]
        OO = np.take_along_axis(o, order, axis=1)
        TAU = np.take_along_axis(np.where(ok, tau, np.inf), order, axis=1)
        COL = np.where(np.isfinite(OO), order, -2)
        BB = np.where(np.isfinite(OO), model.bytes_mb[order], 0.0)
        V = np.where(np.isfinite(OO), model.v_scale[rows, None] * model.u[order], -np.inf)
        if extra:
            # sitting out: no time, no bytes, no value
            z = np.zeros((len(rows), 1))
            OO = np.concatenate([z, OO], axis=1)
            TAU = np.concatenate([z, TAU], axis=1)
            COL = np.concatenate([np.full((len(rows), 1), -1), COL], axis=1)
            BB = np.concatenate([z, BB], axis=1)
            V = np.concatenate([z, V], axis=1)
        self.OO, self.TAU, self.COL, self.BB, self.V = OO, TAU, COL, BB, V
        self.W = OO.shape[1]
        self.dropping = model.dropping

    def prepare(self, t_lo: float) -> None:
        """Split the rows: a device whose every column is within its link's smallest
        possible ``D`` and within ``t_lo`` never depends on ``D`` or ``T`` (*static*: only
        its best priced column counts, per rank sum); the others are merged per link by
        ``o``."""
        OO, TAU, link, E = self.OO, self.TAU, self.link, self.E
        fin = np.isfinite(OO)
        omin = np.where(fin, OO, np.inf).min(axis=1)
        omax = np.where(fin, OO, -np.inf).max(axis=1)
        taumax = np.where(fin, TAU, -np.inf).max(axis=1)
        d_lo = np.full(E, -np.inf)
        np.maximum.at(d_lo, link, omin)
        static = (omax <= d_lo[link]) & (taumax <= t_lo) & (omin < d_lo[link])
        if self.dropping:
            static[:] = False
        self.static = static
        dyn = np.flatnonzero(~static)
        self.dyn = dyn
        wd = int(fin[dyn].sum(axis=1).max(initial=1))
        self.Od = OO[dyn, :wd]
        self.TAUd = TAU[dyn, :wd]
        self.BBd = self.BB[dyn, :wd]
        self.Vd = self.V[dyn, :wd]
        self.link_d = link[dyn]
        self.count_d = np.bincount(self.link_d, minlength=E)
        # static rows: best value per rank-sum level
        st = np.flatnonzero(static)
        self.st = st
        self.link_s = link[st]
        cols = self.COL[st]
        levels, level_of = np.unique(self.model_bytes, return_inverse=True)
        self.level_b = levels
        nl = len(levels)
        ok = cols >= 0
        r, k = np.nonzero(ok)
        lv = level_of[cols[r, k]]
        vals = self.V[st][r, k]
        F = np.full(len(st) * nl, -np.inf)
        np.maximum.at(F, r * nl + lv, vals)
        J = np.zeros(len(st) * nl, dtype=np.int64)
        hit = vals >= F[r * nl + lv]
        J[(r * nl + lv)[hit]] = k[hit]
        self.Fs = F.reshape(len(st), nl)
        self.Js = J.reshape(len(st), nl)
        # every dynamic entry's place in the order (link, o): only the entries where a
        # device's best priced column rises are merged, kept in this order
        flat_o = self.Od.ravel()
        ids = np.flatnonzero(np.isfinite(flat_o))
        perm = ids[np.lexsort((flat_o[ids], np.repeat(self.link_d, wd)[ids]))]
        rank = np.full(len(flat_o), -1, dtype=np.int64)
        rank[perm] = np.arange(len(perm))
        self.rank = rank
        self.mark = np.zeros(len(perm), dtype=bool)  # scratch of evaluate
        self.where = np.zeros(len(perm), dtype=np.int64)

    def _static(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = (p * self.kappa)[self.link_s]
        val = self.Fs - q[:, None] * self.level_b[None, :]
        k = val.argmax(axis=1)
        r = np.arange(len(k))
        return val[r, k], self.level_b[k], k

    def evaluate(
        self, t: float, p: np.ndarray, choice: bool = False
    ) -> tuple[_Eval, np.ndarray | None]:
        """``h_e(p_e, t)`` of every link, the subgradient and ``D*``; with ``choice``, per
        row the position of its best priced column within ``D*``."""
        E = self.E
        sv, sb, sk = self._static(p)
        s_val = np.bincount(self.link_s, weights=sv, minlength=E)
        s_b = np.bincount(self.link_s, weights=sb, minlength=E)
        wd = self.Od.shape[1]
        q = (p * self.kappa)[self.link_d]
        w = self.Vd - q[:, None] * self.BBd
        np.putmask(w, self.TAUd > t * (1 + _TOL), -np.inf)
        run = np.maximum.accumulate(w, axis=1)
        rise = np.empty(run.shape, dtype=bool)
        np.greater(run[:, 0], -np.inf, out=rise[:, 0])
        np.greater(run[:, 1:], run[:, :-1], out=rise[:, 1:])
        # the rises, row by row in order of o: a device's best priced column up to there
        fi = np.flatnonzero(rise)
        if not len(fi):
            inf = np.full(E, -np.inf)
            none = np.full(len(self.rows), -1, dtype=np.int64)
            return _Eval(h=inf, slack=inf, d_star=np.full(E, np.inf)), none if choice else None
        row = fi // wd
        rv = run.ravel()[fi]
        rb = self.BBd.ravel()[fi]
        first = np.ones(len(fi), dtype=bool)
        first[1:] = row[1:] != row[:-1]
        inc = rv.copy()
        inc[1:] -= np.where(first[1:], 0.0, rv[:-1])
        db = rb.copy()
        db[1:] -= np.where(first[1:], 0.0, rb[:-1])
        # ... merged per link in order of o
        mark, where = self.mark, self.where
        rk = self.rank[fi]
        mark[rk] = True
        where[rk] = np.arange(len(fi))
        order = where[np.flatnonzero(mark)]
        mark[rk] = False
        lm = self.link_d[row[order]]
        o_m = self.Od.ravel()[fi[order]]
        seg_len = np.bincount(lm, minlength=E)
        seg_start = np.cumsum(seg_len) - seg_len
        cum = _seg_cumsum(inc[order], seg_start, seg_len)
        cb = _seg_cumsum(db[order], seg_start, seg_len)
        cnt = _seg_cumsum(first[order].astype(np.int64), seg_start, seg_len)
        # a link's bound only at the last of entries with equal o
        last = np.ones(len(lm), dtype=bool)
        last[:-1] = (lm[1:] != lm[:-1]) | (o_m[1:] > o_m[:-1])
        g = cum + s_val[lm] + p[lm] * (t - o_m)
        valid = last & (cnt == self.count_d[lm]) & (o_m <= t * (1 + _TOL))
        g = np.where(valid, g, -np.inf)
        h = np.full(E, -np.inf)
        nz = seg_len > 0
        h[nz] = np.maximum.reduceat(g, seg_start[nz])
        hr = np.repeat(h, seg_len)
        hit = valid & (g >= hr - 1e-12 * np.abs(hr))
        big = len(g)
        k = np.full(E, big)
        k[nz] = np.minimum.reduceat(np.where(hit, np.arange(big), big), seg_start[nz])
        ok = k < big
        kk = np.minimum(k, big - 1)
        d_star = np.where(ok, o_m[kk], np.inf)
        slack = np.where(ok, (t - d_star) - self.kappa * (cb[kk] + s_b), -np.inf)
        ev = _Eval(h=h, slack=slack, d_star=d_star)
        if not choice:
            return ev, None
        # per row its last rise within D*: the best priced column there
        out = np.full(len(self.rows), -1, dtype=np.int64)
        within = self.Od.ravel()[fi] <= d_star[self.link_d[row]] * (1 + _TOL)
        n_dyn = len(self.dyn)
        n_in = np.bincount(row, weights=within, minlength=n_dyn).astype(np.int64)
        row_start = np.searchsorted(row, np.arange(n_dyn))
        best = fi[np.clip(row_start + n_in - 1, 0, len(fi) - 1)] % wd
        out[self.dyn] = np.where((n_in > 0) & ok[self.link_d], best, -1)
        out[self.st] = np.where(ok[self.link_s], self.Js[np.arange(len(sk)), sk], -1)
        return ev, out


def _seg_cumsum(x: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at every segment."""
    c = np.cumsum(x)
    before = np.zeros(len(start), dtype=c.dtype)
    nz = start > 0
    before[nz] = c[start[nz] - 1]
    return c - np.repeat(before, length)


class _Prices:
    """Per link a bracketing cutting-plane search for the price minimising ``h_e(., T)``."""

    def __init__(self, linked: _Linked, t: float, p0: np.ndarray | None) -> None:
        self.linked, self.t = linked, t
        E = linked.E
        ev, _ = linked.evaluate(t, np.zeros(E))
        self.steps = 1
        self.best = ev.h.copy()
        self.p_best = np.zeros(E)
        self.lo = np.zeros(E)
        self.h_lo, self.g_lo = ev.h.copy(), ev.slack.copy()
        self.hi = np.full(E, np.nan)  # a price with slack >= 0
        self.h_hi = np.full(E, np.inf)
        self.g_hi = np.full(E, np.nan)
        done = ev.slack >= 0
        self.hi[done] = 0.0
        self.h_hi[done], self.g_hi[done] = ev.h[done], ev.slack[done]
        guess = _first_price(linked, ev, t)
        # how far to look beyond the bracket: close to a neighbour's price, far otherwise
        self.factor = np.full(E, 4.0)
        if p0 is not None:
            warm = p0 > 0
            guess = np.where(warm, p0, guess)
            self.factor = np.where(warm, 1.02, 4.0)
        self.guess = guess
        self.p_next = np.where(done, 0.0, guess)
        self.settled = done.copy()

    @property
    def bound(self) -> float:
        return float(self.best.sum())

    def step(self, rel: float = 1e-5) -> None:
        linked, t = self.linked, self.t
        todo = ~self.settled
        if not todo.any():
            return
        p = np.where(todo, self.p_next, self.p_best)
        ev, _ = linked.evaluate(t, p)
        self.steps += 1
        better = todo & (ev.h < self.best)
        self.best = np.where(better, ev.h, self.best)
        self.p_best = np.where(better, p, self.p_best)
        up = todo & (ev.slack < 0)
        dn = todo & (ev.slack >= 0)
        self.lo = np.where(up, p, self.lo)
        self.h_lo = np.where(up, ev.h, self.h_lo)
        self.g_lo = np.where(up, ev.slack, self.g_lo)
        self.hi = np.where(dn, p, self.hi)
        self.h_hi = np.where(dn, ev.h, self.h_hi)
        self.g_hi = np.where(dn, ev.slack, self.g_hi)
        has_hi = np.isfinite(self.h_hi)
        # both tangents: their crossing is the next price and a floor under the minimum
        with np.errstate(invalid="ignore", divide="ignore"):
            den = self.g_hi - self.g_lo
            cross = (self.h_lo - self.h_hi + self.g_hi * self.hi - self.g_lo * self.lo) / den
            floor = self.h_lo + self.g_lo * (cross - self.lo)
        cross = np.where(has_hi & (den > 0), cross, np.nan)
        near = has_hi & (self.best - floor <= rel * np.maximum(1.0, np.abs(self.best)))
        self.settled |= todo & (near | (has_hi & (self.hi - self.lo <= 1e-12 * self.hi)))
        # no price below the bracket yet (only p = 0): step down from the upper end
        no_lo = has_hi & (self.lo <= 0) & (self.hi > 0)
        self.p_next = np.where(
            has_hi,
            np.where(no_lo, self.hi / self.factor, np.clip(cross, self.lo, self.hi)),
            np.where(self.lo > 0, self.lo * self.factor, self.guess),
        )
        self.factor = np.where(no_lo | ~has_hi, np.minimum(self.factor**2, 16.0), self.factor)
        bad = ~np.isfinite(self.p_next)
        self.p_next = np.where(bad, 0.5 * (self.lo + np.nan_to_num(self.hi)), self.p_next)

    def p_feasible(self) -> np.ndarray:
        """Per link a price whose maximiser keeps the link within ``T`` (or the best one)."""
        return np.where(np.isfinite(self.h_hi), np.nan_to_num(self.hi), self.p_best)


def _first_price(linked: _Linked, ev: _Eval, t: float) -> np.ndarray:
    """A first price for binding links: the value per second of the round."""
    h = np.where(np.isfinite(ev.h), ev.h, 0.0)
    return np.maximum(h / max(t, 1e-12), 1e-9)


def solve_link_lagrangian(
    problem: PlanningProblem, cat: Catalogue, fc: FleetCosts
) -> SolverOutcome:
    """Plan ``problem`` (shared links of a topology; see the module docstring)."""
    return _Solver(problem, cat, fc).solve()


class _Solver:
    def __init__(self, problem: PlanningProblem, cat: Catalogue, fc: FleetCosts) -> None:
        self.problem, self.cat, self.fc = problem, cat, fc
        self.opts = problem.options
        self.clock_end = time.perf_counter() + self.opts.time_limit_s
        self.model = _Model(problem, cat, fc)

    # -- plans -----------------------------------------------------------------------------
    def _priced_plan(self, t: float, prices: _Prices | None) -> np.ndarray | None:
        """Per linked row the position of its best priced column at a price that keeps
        its link within ``t``."""
        linked = self.linked
        if linked is None:
            return None
        p = prices.p_feasible() if prices is not None else np.zeros(linked.E)
        _, pos = linked.evaluate(t, p, choice=True)
        return pos

    def _columns(self, t: float, pos: np.ndarray | None) -> np.ndarray:
        """Per device a catalogue column (-1: out): linked rows from ``pos``, the others
        their best column within ``t``."""
        model, linked = self.model, self.linked
        choice = np.full(model.n, -1, dtype=np.int64)
        if self.free_rows is not None and len(self.free_rows):
            choice[self.free_rows] = self._free_choice(t)
        if linked is None or pos is None:
            return choice
        safe = np.maximum(pos, 0)
        cols = np.where(pos >= 0, linked.COL[np.arange(len(pos)), safe], -3)
        if (cols < -1).any():
            if not model.dropping:
                raise InfeasibleError("no plan found that keeps every shared link within the round")
            cols = np.where(cols < -1, -1, cols)
        choice[linked.rows] = cols
        return choice

    def _plan_at(self, t: float, prices: _Prices | None) -> np.ndarray:
        """Per device a catalogue column (-1: out) of a plan that lasts at most ``t``."""
        pos = self._priced_plan(t, prices)
        if pos is not None:
            pos = self._fill(t, pos)
        return self._columns(t, pos)

    def _free_choice(self, t: float) -> np.ndarray:
        model = self.model
        rows = self.free_rows
        assert rows is not None
        tau = model.own_times(rows)
        ok = model.fc.fits(rows, model.cat) & (tau <= t * (1 + _TOL))
        v = np.where(ok, model.u[None, :], -np.inf)
        j = v.argmax(axis=1)
        has = ok.any(axis=1)
        if model.dropping:
            return np.where(has, j, -1)
        return np.where(has, j, -1)

    def _fill(self, t: float, pos: np.ndarray) -> np.ndarray:
        """Greedy upgrades, one device per link and step, while every row holds."""
        linked = self.linked
        assert linked is not None
        E = linked.E
        pos = pos.copy()
        lim = t * (1 + _TOL)
        every = np.arange(len(pos))
        link, kappa = linked.link, linked.kappa

        def current(table: np.ndarray, empty: float) -> np.ndarray:
            return np.where(pos >= 0, table[every, np.maximum(pos, 0)], empty)

        # the upgrades worth a look: more value, within T on their own and with the link
        # carrying only their bytes (the others' bytes only add)
        values, own, o = linked.V, linked.TAU, linked.OO
        cand = (
            (values > current(values, -np.inf)[:, None])
            & (own <= lim)
            & (o + kappa[link, None] * linked.BB <= lim)
        )
        er, ek = np.nonzero(cand)  # by row, rows by link
        eo, eb, ev, el = linked.OO[er, ek], linked.BB[er, ek], linked.V[er, ek], link[er]
        active = np.ones(E, dtype=bool)
        for _ in range(2 * int(linked.count.max(initial=1)) + 4):
            if time.perf_counter() > self.clock_end:
                break
            sel = np.flatnonzero(active[el])
            if not len(sel):
                break
            cur_o, cur_b = current(linked.OO, -np.inf), current(linked.BB, 0.0)
            cur_v = current(linked.V, -np.inf)
            load = np.bincount(link, weights=cur_b, minlength=E)
            first = np.full(E, -np.inf)
            np.maximum.at(first, link, cur_o)
            is_top = cur_o >= first[link]
            tops = np.bincount(link, weights=is_top.astype(float), minlength=E)
            second = np.full(E, -np.inf)
            np.maximum.at(second, link, np.where(is_top, -np.inf, cur_o))
            other_o = np.where(is_top & (tops[link] < 1.5), second[link], first[link])
            r, lk = er[sel], el[sel]
            span = np.maximum(eo[sel], other_o[r]) + kappa[lk] * (load[lk] - cur_b[r] + eb[sel])
            gain = np.where(span <= lim, ev[sel] - cur_v[r], -np.inf)
            floor = 1e-12 * np.maximum(1.0, np.abs(np.where(np.isfinite(cur_v), cur_v, 0.0)))
            good = gain > floor[r]
            best = np.full(E, -np.inf)
            np.maximum.at(best, lk[good], gain[good])
            # per link the first device, and its first column, of the largest gain
            win = np.flatnonzero(good & (gain >= best[lk]))
            active[:] = False
            if not len(win):
                break
            links, at = np.unique(lk[win], return_index=True)
            pick = sel[win[at]]
            pos[er[pick]] = ek[pick]
            active[links] = True
        return pos

    def _value(self, choice: np.ndarray) -> tuple[float, float]:
        """Utility (scaled) and true round time of per-device columns ``choice``."""
        model, cat, fc = self.model, self.cat, self.fc
        part = choice >= 0
        if not part.any():
            return 0.0, 0.0
        safe = np.maximum(choice, 0)
        util = float((model.v_scale * model.u[safe] * part).sum())
        d = cat.depth[safe]
        s = cat.rank_sum[safe]
        t = fc.time_const + fc.time_per_layer * d + fc.time_per_rank * s
        comp = fc.compute_const + fc.compute_per_layer * d + fc.compute_per_rank * s
        nbytes = cat.bytes_one_way[safe]
        round_time = float(t[part].max())
        on = part[model.member_dev]
        dev, link = model.member_dev[on], model.member_link[on]
        if len(dev):
            nl = len(model.link_spb)
            load = model.link_spb * np.bincount(link, weights=nbytes[dev], minlength=nl)
            top = np.full(nl, -np.inf)
            np.maximum.at(top, link, comp[dev] + nbytes[dev] * model.member_own[on])
            round_time = max(round_time, float((top + load).max()))
        return util, round_time

    def _objective(self, util: float, round_time: float) -> float:
        if self.opts.objective == "deadline":
            return util
        return util / round_time if round_time > 0 else 0.0

    # -- bounds ------------------------------------------------------------------------------
    def _bound_at(self, t: float, prices: _Prices | None) -> float:
        b = 0.0
        if self.free is not None:
            b += self.free.value(t)
        if prices is not None:
            b += prices.bound
        return b

    def _rate_bound(self, lo: float, hi: float, prices: _Prices | None) -> float:
        """A bound of ``V(T) / T`` on ``[lo, hi]``: ``h_e(p, T) - p T`` does not decrease
        with ``T``, so ``V(T) <= F(hi) + sum_e (h_e(p_e, hi) - p_e hi) + T sum_e p_e``."""
        fixed = self.free.value(hi) if self.free is not None else 0.0
        slope = 0.0
        if prices is not None:
            fixed += float((prices.best - prices.p_best * hi).sum())
            slope = float(prices.p_best.sum())
        if not fixed > -math.inf:
            return -math.inf
        return fixed / (lo if fixed >= 0 else hi) + slope

    def solve(self) -> SolverOutcome:
        model, opts = self.model, self.opts
        deadline = float(opts.deadline_s) if opts.objective == "deadline" else None
        # U_max: every device at its best column that fits its memory
        fits_best = np.zeros(model.n)
        for sl in self.fc.chunks(len(self.cat)):
            fits_best[sl] = np.where(self.fc.fits(sl, self.cat), model.u[None, :], 0.0).max(axis=1)
        u_max = float((model.v_scale * fits_best).sum())
        linked_rows = np.flatnonzero(model.link_of >= 0)
        free_rows = np.flatnonzero(model.link_of < 0)
        self.free_rows = free_rows
        t_far = deadline if deadline is not None else self._slowest_bound()
        self.linked = _Linked(model, t_far) if len(linked_rows) else None
        self.free = _free_steps(model, free_rows, t_far) if len(free_rows) else None
        if deadline is not None:
            if self.linked is not None:
                self.linked.prepare(deadline)
            return self._deadline(deadline)
        t_lo = self._t_lo()
        if self.linked is not None:
            self.linked.prepare(t_lo)
        # every device on its own, links ignored: a cheap bound of V(T)
        self.nolink = _free_steps(model, np.arange(model.n), t_far)
        return self._rate(u_max, t_far, t_lo)

    def _slowest_bound(self) -> float:
        """A round time beyond which every column fits and no link binds."""
        model, cat, fc = self.model, self.cat, self.fc
        top = 0.0
        for sl in fc.chunks(len(cat)):
            rows = np.arange(sl.start, sl.stop)
            tau = model.own_times(rows)
            o = model.link_o(rows)
            ok = fc.fits(rows, cat)
            top = max(top, float(np.where(ok, np.maximum(tau, o), 0.0).max(initial=0.0)))
        bmax = float(cat.bytes_one_way.max())
        link = max((cl.s_per_byte * bmax * len(cl.devices) for cl in model.shared), default=0.0)
        return (top + link) * (1 + 1e-9)

    def _deadline(self, deadline: float) -> SolverOutcome:
        prices = None
        if self.linked is not None:
            prices = _Prices(self.linked, deadline, None)
            for _ in range(40):
                if prices.settled.all() or time.perf_counter() > self.clock_end:
                    break
                prices.step()
        bound = self._bound_at(deadline, prices)
        if not math.isfinite(bound):
            raise InfeasibleError("no plan meets the deadline on the shared links")
        choice = self._plan_at(deadline, prices)
        util, round_time = self._value(choice)
        return self._outcome(choice, util, round_time, bound)

    def _rate(self, u_max: float, t_far: float, t_lo: float) -> SolverOutcome:
        linked = self.linked
        best: list = [0.0, None]  # rate, choice
        tried: set[float] = set()

        def consider(t: float, prices: _Prices | None) -> None:
            if t in tried:
                return
            tried.add(t)
            try:
                pos = self._priced_plan(t, prices)
                choice = self._columns(t, pos)
            except InfeasibleError:
                return
            util, rt = self._value(choice)
            r = util / rt if rt > 0 else 0.0
            if best[1] is not None and r < best[0] * 0.99:
                return
            if pos is not None:
                # upgrades are worth their cost only near the best plan
                choice = self._columns(t, self._fill(t, pos))
                util, rt = self._value(choice)
                r = util / rt if rt > 0 else 0.0
            if best[1] is None or r > best[0]:
                best[0], best[1] = r, choice

        state: dict[float, _Prices] = {}

        def prices_at(t: float) -> _Prices | None:
            if linked is None:
                return None
            if t not in state:
                pr = _Prices(linked, t, self._p_guess(state, t))
                if not any(x.steps >= _PRICE_STEPS for x in state.values()):
                    # the first price vector: converge it, it seeds every other
                    while pr.steps < 2 * _PRICE_STEPS and not pr.settled.all():
                        pr.step()
                state[t] = pr
            return state[t]

        def settled(t: float) -> bool:
            pr = state.get(t)
            return pr is None or bool(pr.settled.all()) or pr.steps >= _PRICE_STEPS

        # (-bound on the rate, lo, hi, whether the bound includes the links, bound of V)
        heap: list[tuple[float, float, float, bool, float]] = []

        def push(lo: float, hi: float, exact: bool, cap: float = math.inf) -> None:
            # V does not decrease with T: a bound of V at a later time also holds
            if exact:
                pr = prices_at(hi)
                b = min(cap, self._bound_at(hi, pr))
                r = min(b / lo, self._rate_bound(lo, hi, pr))
            else:
                b = min(cap, self.nolink.value(hi))
                r = b / lo
            if b > -math.inf and r > -math.inf:
                heapq.heappush(heap, (-r, lo, hi, exact or linked is None, b))

        # intervals [lo, hi] of round times; beyond ``cap`` no plan beats U_max / cap
        grid = _geometric(t_lo, t_far, 1.01)
        lows = np.concatenate(([t_lo], grid[:-1]))
        for lo, hi in zip(lows, grid, strict=True):
            if hi > lo:
                push(float(lo), float(hi), False)
        target = self.opts.mip_gap
        while heap:
            nb, lo, hi, exact, vcap = heap[0]
            if -nb <= best[0] * (1 + target) or time.perf_counter() > self.clock_end:
                break
            heapq.heappop(heap)
            if not exact:
                push(lo, hi, True, vcap)
                continue
            pr = prices_at(hi)
            if not settled(hi):
                assert pr is not None
                pr.step()
                push(lo, hi, True, vcap)
                continue
            consider(hi, pr)
            if hi / lo <= 1.0 + max(_SPLIT_MIN, target / 2):
                heapq.heappush(heap, (nb, lo, hi, exact, vcap))
                break
            mid = math.sqrt(lo * hi)
            push(lo, mid, True, vcap)
            push(mid, hi, True, vcap)
        if best[1] is None and heap:
            consider(heap[0][2], prices_at(heap[0][2]))
        bound = max(-heap[0][0] if heap else 0.0, best[0])
        if best[1] is None:
            raise InfeasibleError("no plan found that keeps every shared link within the round")
        util, rt = self._value(best[1])
        return self._outcome(best[1], util, rt, bound)

    def _t_lo(self) -> float:
        model, linked, free = self.model, self.linked, self.free
        cands = []
        if linked is not None:
            tau0 = linked.TAU.min(axis=1)
            o0 = linked.OO[:, 1:].min(axis=1) if model.dropping else linked.OO[:, 0]
            if model.dropping:
                cands.append(
                    float(tau0[tau0 > 0].min(initial=np.inf)) if (tau0 > 0).any() else np.inf
                )
            else:
                bmin = np.where(np.isfinite(linked.OO), linked.BB, np.inf).min(axis=1)
                E = linked.E
                lo_o = np.full(E, -np.inf)
                np.maximum.at(lo_o, linked.link, o0)
                lo_b = np.bincount(linked.link, weights=bmin, minlength=E)
                cands.append(max(float(tau0.max()), float((lo_o + linked.kappa * lo_b).max())))
            del o0
        if free is not None:
            if model.dropping:
                cands.append(float(free.times[0]) if len(free.times) else np.inf)
            else:
                cands.append(free.t_min)
        t = (min(cands) if model.dropping else max(cands)) if cands else 0.0
        return max(t, 1e-12)

    def _p_guess(self, state: dict[float, _Prices], t: float) -> np.ndarray | None:
        if not state:
            return None
        good = [s for s, pr in state.items() if pr.steps >= _PRICE_STEPS or pr.settled.all()]
        if not good:
            return None
        near = min(good, key=lambda s: abs(math.log(s / t)))
        pr = state[near]
        return pr.p_best

    def _outcome(
        self, choice: np.ndarray, util: float, round_time: float, bound: float
    ) -> SolverOutcome:
        return bounded_outcome(
            self.cat,
            choice,
            solver="link-lagrangian",
            value=self._objective(util, round_time),
            bound=bound,
            scale=self.model.scale,
            round_time=round_time,
            mip_gap=self.opts.mip_gap,
        )


def _geometric(lo: float, hi: float, ratio: float) -> np.ndarray:
    if hi <= lo * (1 + 1e-12):
        return np.asarray([lo])
    n = math.ceil(math.log(hi / lo) / math.log(ratio))
    return lo * ratio ** np.arange(1, n + 1)
