"""The LEGEND-style greedy planner ("LCD" reconstruction, docs/planner.md), solver ``greedy``.

Per device, start from the output layer (or the top ``min_depth`` layers) at the lowest
rank of the grid; then repeatedly apply the move with the best utility gain per second of
round time:

- *deepen*: add the next layer below the current block at the lowest rank, or
- *raise*: lift one adapted layer to the next rank of the grid (with ``monotone_ranks`` only
  when the layer above already has a higher rank, so ranks stay non-decreasing toward the
  output),

among the moves that keep the device within the deadline and its memory. The device stops
when no move fits. The deadline depends on the objective:

``deadline``
    ``options.deadline_s``.
``rate``
    Candidate deadlines are the devices' minimal and maximal configuration times; the
    greedy runs at each and keeps the plan with the best ``U / T`` (``T`` the slowest
    participant of the resulting plan). Large candidate sets are searched coarse-to-fine
    (at most :data:`MAX_CANDIDATES` per pass).
``min-time``
    The smallest candidate deadline whose plan reaches the utility floor, refined by
    bisection between that candidate and the largest one that failed. A relative floor
    (``utility_floor_share``) is taken of the greedy's own maximum utility (no deadline), a
    lower bound on the exact maximum when memory binds.

Optional constraints: ``min_depth`` (the starting block), ``monotone_ranks``,
``allow_dropping`` with ``min_participants`` and ``min_sample_share`` (devices whose minimal
configuration misses the deadline or memory sit the round out; the deadline is raised until
enough devices, holding enough samples, take part), ``server_mbps`` (the round's bytes in both
directions must pass the server's link within the slowest participant's time; moves of all
devices compete for it in order of gain per second), and layer coverage, which the greedy meets
conservatively by giving every participant at least ``coverage_layers`` layers.

Everything is vectorised over (candidate deadline, device) rows with NumPy; devices with
identical profiles share one row unless the server link couples them. Without the server
link, every row's greedy without a deadline is run once and recorded move by move; under a
candidate deadline a row makes the same moves up to the first one that misses it, and goes
on from there. Costs come from :meth:`~legend.planner.costs.CostModel.table`, so the greedy
sees exactly the cost model the integer program sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from legend.planner.backends import legend_version
from legend.planner.diagnose import blocked_devices, fleet_reasons
from legend.planner.errors import InfeasibleError, PlannerInputError
from legend.planner.types import (
    RATIO_OBJECTIVES,
    Configuration,
    PlanningProblem,
    SolverOutcome,
    objective_value,
)

__all__ = [
    "MAX_CANDIDATES",
    "GreedyResult",
    "check_fleet_options",
    "greedy_configurations",
    "larger_configurations",
    "minimal_configuration_reasons",
    "solve_greedy",
]

MAX_CANDIDATES = 48  # candidate deadlines evaluated per pass of the rate search
_MAX_ROWS = 400_000  # rows (candidate x device) per vectorised batch
_REL_TOL = 1e-9
_REFINE_STEPS = 30

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def _utility_tables(problem: PlanningProblem) -> tuple[FloatArray, FloatArray]:
    """Utility per sample of the greedy's moves: ``w_l * g(r)`` for every layer and rank.

    Returns the gain of adding layer ``l`` at the lowest rank of the grid (``[layer]``) and
    of raising it from rank index ``k`` to ``k + 1`` (``[layer, k]``). The only place the
    greedy reads the layer weights ``w_l`` and the rank gain ``g``.
    """
    w = np.asarray(problem.layer_weights, dtype=np.float64)
    g = np.asarray(problem.rank_gains, dtype=np.float64)
    return w * g[0], w[:, None] * np.diff(g)[None, :]


def _layer_sum(per_layer: FloatArray, layers: int) -> FloatArray:
    """Per row, the sum of ``layers`` layers that each cost ``per_layer`` (summed as NumPy
    sums a row of a ``[row, layer]`` table)."""
    return np.repeat(per_layer[:, None], layers, axis=1).sum(axis=1)


def _least_limit(time_s: FloatArray, dt: FloatArray) -> FloatArray:
    """The smallest limit ``x`` under which a move of ``dt`` from ``time_s`` fits, i.e. the
    smallest float with ``dt <= x - time_s`` (as the greedy computes it: the room first)."""
    x = time_s + dt
    short = np.flatnonzero(~(dt <= x - time_s))
    x[short] = np.nextafter(x[short], np.inf)
    # Where time_s <= x <= 2 time_s, x - time_s is exact (Sterbenz), so the rounded sum, or
    # the float above it, is the least; elsewhere search float by float.
    rest = np.flatnonzero(~((time_s <= x) & (x <= 2.0 * time_s)))
    if rest.size:
        t, d = time_s[rest], dt[rest]
        y = x[rest]
        up = ~(d <= y - t)
        while up.any():
            y[up] = np.nextafter(y[up], np.inf)
            up = ~(d <= y - t)
        while True:
            below = np.nextafter(y, -np.inf)
            fits = d <= below - t
            if not fits.any():
                break
            y = np.where(fits, below, y)
        x[rest] = y
    return x


@dataclass(frozen=True, kw_only=True)
class _Tables:
    """Linear cost coefficients per distinct profile and rank of the grid.

    Every layer costs the same, so a coefficient is one per rank: ``time_coef`` is
    ``[profile, rank index]``; memory and bytes do not depend on the device (``mem_coef``
    and ``bytes_coef`` are ``[rank index]``). ``bytes_*`` count both directions (what the
    server's link carries).
    """

    time_const: FloatArray
    time_coef: FloatArray
    mem_const: float
    mem_coef: FloatArray
    bytes_const: float
    bytes_coef: FloatArray


@dataclass(frozen=True, kw_only=True)
class _Rows:
    """The result of greedy runs, one row per (deadline, device).

    ``rank_index`` (``[row, layer]``, -1 where the layer carries no LoRA) is left out
    (``None``) where only the totals are asked for.
    """

    depth: IntArray
    rank_index: IntArray | None
    time_s: FloatArray
    utility: FloatArray
    nbytes: FloatArray | None
    participates: NDArray[np.bool_]


@dataclass(kw_only=True)
class _State:
    """Participating rows of a run: fixed inputs and the state the moves update in place.

    ``levels`` is the rank state: with monotone ranks the number of layers at each rank
    level (``[row, K]``), otherwise each layer's rank index (``[row, L]``, -1 outside the
    block).
    """

    prof: IntArray
    cap: FloatArray
    limit: FloatArray
    weight: FloatArray
    group: IntArray
    time_s: FloatArray
    mem: FloatArray
    nbytes: FloatArray
    utility: FloatArray
    depth: IntArray
    levels: IntArray


@dataclass(frozen=True, kw_only=True)
class _Path:
    """Every row's greedy without a deadline, move by move (``[step, unique row]``).

    ``time_s``, ``mem`` and ``utility`` are the state after ``step`` moves, for ``step`` up
    to the row's number of ``moves``; ``reach[s]`` is the smallest limit under which the
    moves ``0..s`` all fit. The rank state: with monotone ranks ``levels[step, row]``
    (layers per rank level), otherwise ``rank_step[row, layer, k]``, the move that brought
    the layer to rank index ``k`` (-1: from the start, the dtype's maximum: never).
    """

    moves: IntArray
    time_s: FloatArray
    mem: FloatArray
    utility: FloatArray
    reach: FloatArray
    levels: NDArray[np.integer]
    rank_step: NDArray[np.int16]


_NEVER = np.iinfo(np.int16).max


@dataclass(frozen=True, kw_only=True)
class GreedyResult:
    """Configurations in fleet order and the deadline the greedy planned them for."""

    configurations: tuple[Configuration, ...]
    deadline_s: float
    round_time_s: float
    utility: float


class _Greedy:
    """Precomputed arrays of one planning problem; :meth:`run` does the greedy."""

    def __init__(self, problem: PlanningProblem) -> None:
        self.problem = problem
        self._free_rows: tuple[_Rows, _Path | None] | None = None
        opts = problem.options
        fleet = problem.fleet
        spec = problem.spec
        self.L = spec.num_layers
        self.ranks = np.asarray(problem.job.ranks, dtype=np.int64)
        self.K = len(self.ranks)
        # With monotone ranks (and more than one rank) the rank state is one count per rank
        # level; otherwise one rank index per layer (see _State).
        self.monotone = opts.monotone_ranks and self.K > 1
        coverage_depth = (
            min(opts.coverage_layers, self.L)
            if opts.coverage_layers > 0 and opts.coverage_share > 0
            else 0
        )
        self.start_depth = max(opts.min_depth, coverage_depth)
        self.server_bps = None if opts.server_mbps is None else opts.server_mbps * 1e6 / 8

        # Distinct cost profiles: the cost model sees speed, links, local steps and setup time
        # (frozen-prefix features still to compute) only.
        # Profiles are numbered in the order of their first device.
        from legend.planner.catalog import fleet_costs, setup_seconds, shared_costs

        devices = fleet.devices
        n = len(devices)
        keys = [
            np.fromiter((d.tflops for d in devices), np.float64, n),
            np.fromiter((d.uplink_mbps for d in devices), np.float64, n),
            np.fromiter((d.downlink_mbps for d in devices), np.float64, n),
            np.fromiter((problem.job.steps_for(d) for d in devices), np.float64, n),
            setup_seconds(problem),
        ]
        order = np.lexsort(keys[::-1])  # stable: the first device of a profile comes first
        same = np.ones(max(n - 1, 0), dtype=bool)  # as the device before it in that order
        for key in keys:
            sorted_key = key[order]
            same &= sorted_key[1:] == sorted_key[:-1]
        starts = np.concatenate([np.ones(min(n, 1), dtype=bool), ~same])
        firsts = order[starts]
        number = np.empty(len(firsts), dtype=np.int64)
        number[np.argsort(firsts)] = np.arange(len(firsts))
        profile_of = np.empty(n, dtype=np.int64)
        profile_of[order] = number[np.cumsum(starts) - 1]
        representative_index = np.sort(firsts)
        # Costs from the cost model's affine coefficients (checked against it), vectorised:
        # every layer costs the same, and each coefficient is affine in the rank.
        fc = fleet_costs(problem)
        reps = representative_index
        (m0, m1, m2), (b0, b1) = shared_costs(problem)
        r = self.ranks.astype(np.float64)
        self.tables = tc = _Tables(
            time_const=fc.time_const[reps],
            time_coef=fc.time_per_layer[reps, None] + fc.time_per_rank[reps, None] * r[None, :],
            mem_const=m0,
            mem_coef=m1 + m2 * r,
            # Both directions cross the server's link: download of the slice, upload.
            bytes_const=2.0 * b0,
            bytes_coef=2.0 * b1 * r,
        )
        self.profile_of = profile_of
        self.capacity = np.array([d.memory_bytes for d in fleet.devices])
        self.samples = np.array([d.num_samples for d in fleet.devices], dtype=np.float64)

        # Rows the greedy runs on: devices with the same cost profile and memory make the
        # same moves (a device's sample count scales all its gains alike), so they share a
        # row, unless the server link couples devices: then moves of different devices
        # compete and every device is its own row.
        if self.server_bps is None:
            row_keys = np.stack([profile_of.astype(np.float64), self.capacity], axis=1)
            _, first, inverse = np.unique(row_keys, axis=0, return_index=True, return_inverse=True)
            self.unique_devices = first.astype(np.int64)
            self.row_of_device = inverse.reshape(-1).astype(np.int64)
        else:
            self.unique_devices = np.arange(len(fleet), dtype=np.int64)
            self.row_of_device = np.arange(len(fleet), dtype=np.int64)
        n_unique = len(self.unique_devices)
        self.row_samples = np.bincount(self.row_of_device, weights=self.samples, minlength=n_unique)
        self.row_counts = np.bincount(self.row_of_device, minlength=n_unique).astype(np.float64)

        self.add_gain, self.raise_gain = _utility_tables(problem)
        self.raise_dt = np.diff(tc.time_coef, axis=1)  # [profile, k]: k -> k+1
        self.raise_dm = np.diff(tc.mem_coef)  # [k]
        self.raise_db = np.diff(tc.bytes_coef)

        # Minimal configuration (start_depth top layers at the lowest rank) and maximal one.
        n = len(fleet)
        per_layer_min = tc.time_coef[profile_of, 0]
        self.min_time = tc.time_const[profile_of] + _layer_sum(per_layer_min, self.start_depth)
        self.min_mem = tc.mem_const + _layer_sum(np.full(n, tc.mem_coef[0]), self.start_depth)
        self.min_bytes = tc.bytes_const + _layer_sum(np.full(n, tc.bytes_coef[0]), self.start_depth)
        self.max_time = tc.time_const[profile_of] + _layer_sum(tc.time_coef[profile_of, -1], self.L)
        self.memory_ok = self.min_mem <= self.capacity * (1 + _REL_TOL)
        # the same per unique row, for the runs resumed from the path without a deadline
        ud = self.unique_devices
        self.row_prof = profile_of[ud]
        self.row_cap = self.capacity[ud] * (1 + _REL_TOL)
        self.row_memory_ok = self.memory_ok[ud]
        self.row_min_time = self.min_time[ud]
        self.row_add_dt = tc.time_coef[self.row_prof, 0]
        self.row_raise_dt = self.raise_dt[self.row_prof]

    # -- the greedy ---------------------------------------------------------------------
    def run(
        self,
        deadlines: FloatArray,
        rows_of: IntArray,
        groups: IntArray,
        *,
        ranks: bool = True,
        record: bool = False,
    ) -> tuple[_Rows, _Path | None]:
        """Greedy for each row ``r``: greedy row ``rows_of[r]`` under deadline ``deadlines[r]``.

        Rows whose minimal configuration misses the deadline or memory do not participate.
        ``groups[r]`` names the candidate a row belongs to (rows of one group share the
        server link's byte budget). Utilities are per sample of the row's devices. With
        ``record`` (rows ``0..n-1`` of the unique rows, no server link) the path of every
        row comes back too.
        """
        L = self.L
        n_rows = len(rows_of)
        devices = self.unique_devices[rows_of]
        limit = deadlines * (1 + _REL_TOL) + 1e-12
        participates = self.memory_ok[devices] & (self.min_time[devices] <= limit)
        time_s = np.where(participates, self.min_time[devices], 0.0)
        nbytes = np.where(participates, self.min_bytes[devices], 0.0)
        # C7 state per group: bytes through the server's link and the slowest participant's
        # time; a move must keep ``used <= server_bps * slowest``.
        link: tuple[FloatArray, FloatArray] | None = None
        if self.server_bps is not None:
            n_groups = int(groups.max()) + 1 if n_rows else 0
            used: FloatArray = np.bincount(groups, weights=nbytes, minlength=n_groups).astype(
                np.float64
            )
            slowest = np.zeros(n_groups)
            np.maximum.at(slowest, groups, time_s)
            link = (used, slowest)
        rows = np.flatnonzero(participates)
        dev = devices[rows]
        n = len(rows)
        depth = np.full(n, self.start_depth, dtype=np.int64)
        if self.monotone:
            levels = np.zeros((n, self.K), dtype=np.int64)
            levels[:, 0] = self.start_depth
        else:
            levels = np.full((n, L), -1, dtype=np.int64)
            levels[:, L - self.start_depth :] = 0
        st = _State(
            prof=self.profile_of[dev],
            cap=self.capacity[dev] * (1 + _REL_TOL),
            limit=limit[rows],
            weight=np.asarray(self.row_samples[rows_of[rows]], dtype=np.float64),
            group=groups[rows],
            time_s=time_s[rows],
            mem=self.min_mem[dev],
            nbytes=nbytes[rows],
            utility=np.full(n, self.add_gain[L - self.start_depth :].sum()),
            depth=depth,
            levels=levels,
        )
        path = None
        if record:
            path = self._new_path(n_rows, rows, st)
        self._simulate(st, link, path, rows)
        return self._scatter(n_rows, rows, st, participates, ranks=ranks), path

    def _scatter(
        self,
        n_rows: int,
        rows: IntArray,
        st: _State,
        participates: NDArray[np.bool_],
        *,
        ranks: bool,
    ) -> _Rows:
        """Results of the participating ``rows`` of ``st`` spread over all ``n_rows`` rows."""
        depth = np.zeros(n_rows, dtype=np.int64)
        depth[rows] = st.depth
        time_s = np.zeros(n_rows)
        time_s[rows] = st.time_s
        utility = np.zeros(n_rows)
        utility[rows] = st.utility
        nbytes = None
        if self.server_bps is not None:
            nbytes = np.zeros(n_rows)
            nbytes[rows] = st.nbytes
        rank_index = None
        if ranks:
            rank_index = np.full((n_rows, self.L), -1, dtype=np.int64)
            rank_index[rows] = self._rank_index(st.depth, st.levels)
        return _Rows(
            depth=depth,
            rank_index=rank_index,
            time_s=time_s,
            utility=utility,
            nbytes=nbytes,
            participates=participates,
        )

    def _rank_index(self, depth: IntArray, levels: IntArray) -> IntArray:
        """Each layer's rank index (-1 outside the block) from the rank state."""
        if not self.monotone:
            return levels
        # from the bottom of the block: levels[0] layers at level 0, levels[1] at level 1, ...
        L = self.L
        bounds = (L - depth)[:, None] + np.cumsum(levels, axis=1)  # end of each level's block
        layer = np.arange(L)[None, None, :]
        rank_index = (layer >= bounds[:, :, None]).sum(axis=1)
        rank_index = np.where(np.arange(L)[None, :] >= (L - depth)[:, None], rank_index, -1)
        return rank_index.astype(np.int64)

    def _simulate(
        self,
        st: _State,
        link: tuple[FloatArray, FloatArray] | None,
        path: _Path | None,
        path_rows: IntArray,
        rows: IntArray | None = None,
    ) -> None:
        """The greedy's moves on every row of ``st`` until none fits.

        Per row, the moves are columns: the raises (with monotone ranks one per rank level,
        since only the topmost layer of a level may be raised and every layer costs the same;
        otherwise one per layer), then *deepen*. Each step takes, per row, the column with
        the best utility gain per second among those that fit: ``argmax`` takes the first
        best, so the lowest level or layer wins a tie and a raise beats deepen at equal gain
        per second. A move changes one or two columns of its row, so only those are updated.
        A row without a move is done. ``path`` (indexed by ``path_rows[row]``) records every
        step. ``rows``: only these rows of ``st`` (default: all).
        """
        L, K = self.L, self.K
        mono = self.monotone
        n_raise = 0 if K == 1 else (K - 1 if mono else L)
        C = n_raise + 1
        add = C - 1
        at = np.arange(len(st.time_s)) if rows is None else rows  # rows of ``st`` worked on
        n = len(at)
        if n == 0:
            return
        tc = self.tables
        prof, cap, limit, weight, group = (
            st.prof[at],
            st.cap[at],
            st.limit[at],
            st.weight[at],
            st.group[at],
        )
        time_s, mem, nbytes = st.time_s[at], st.mem[at], st.nbytes[at]
        utility, depth, levels = st.utility[at], st.depth[at], st.levels[at]
        timed = not np.isinf(limit).all()

        # Per column: the move's time, memory and bytes, its gain and gain per second
        # (-inf where the move is not open: no layer left to add, or at the top rank).
        dt = np.empty((n, C))
        dm = np.empty((n, C))
        db = np.empty((n, C)) if link is not None else None
        gain = np.empty((n, C))
        dt[:, add] = tc.time_coef[prof, 0]
        dm[:, add] = tc.mem_coef[0]
        gain[:, add] = self.add_gain[np.maximum(L - 1 - depth, 0)]
        if db is not None:
            db[:, add] = tc.bytes_coef[0]
        pos = np.zeros((n, 0), dtype=np.int64)
        open_r = np.zeros((n, 0), dtype=bool)
        if mono:
            # the topmost layer of level k sits below every layer of the levels above it
            above = np.cumsum(levels[:, ::-1], axis=1)[:, ::-1]  # layers at level >= k
            pos = np.ascontiguousarray(L - 1 - above[:, 1:])
            dt[:, :add] = self.raise_dt[prof]
            dm[:, :add] = self.raise_dm[None, :]
            if db is not None:
                db[:, :add] = self.raise_db[None, :]
            gain[:, :add] = self.raise_gain[np.clip(pos, 0, L - 1), np.arange(K - 1)[None, :]]
            open_r = levels[:, :-1] > 0
        elif n_raise:
            kk = np.clip(levels, 0, K - 2)
            dt[:, :add] = self.raise_dt[prof[:, None], kk]
            dm[:, :add] = self.raise_dm[kk]
            if db is not None:
                db[:, :add] = self.raise_db[kk]
            gain[:, :add] = self.raise_gain[np.arange(L)[None, :], kk]
            open_r = (levels >= 0) & (levels < K - 1)
        rate = gain / np.maximum(dt, 1e-300)
        rate[:, :add][~open_r] = -np.inf
        rate[depth >= L, add] = -np.inf

        def rerate(f: IntArray, is_open: NDArray[np.bool_] | bool = True) -> None:
            """Gain per second of flat columns ``f`` from their gain and time."""
            r = gain.reshape(-1)[f] / np.maximum(dt.reshape(-1)[f], 1e-300)
            rate.reshape(-1)[f] = np.where(is_open, r, -np.inf)

        n_alive = n
        step = 0
        while True:
            fits = dm <= (cap - mem)[:, None]
            if timed:
                fits &= dt <= (limit - time_s)[:, None]
            if link is not None:
                assert db is not None
                fits &= link[0][group][:, None] + db <= self._link_cap(
                    np.maximum(link[1][group][:, None], time_s[:, None] + dt)
                )
            r = np.where(fits, rate, -np.inf)
            best = r.argmax(axis=1)
            flat = np.arange(len(best)) * C + best
            ratio = r.reshape(-1)[flat]
            has = np.isfinite(ratio)
            if link is not None:
                assert db is not None
                has = self._server_accept(
                    has,
                    ratio * weight,
                    db.reshape(-1)[flat],
                    time_s + dt.reshape(-1)[flat],
                    group,
                    link,
                )
            m = np.flatnonzero(has)
            if m.size == 0:
                break
            fm = flat[m]
            b = best[m]
            mdt = dt.reshape(-1)[fm]
            t_before = time_s[m]
            time_s[m] = t_before + mdt
            mem[m] += dm.reshape(-1)[fm]
            utility[m] += gain.reshape(-1)[fm]
            if db is not None:
                nbytes[m] += db.reshape(-1)[fm]
            is_add = b == add
            ma = m[is_add]
            mr = m[~is_add]
            br = b[~is_add]
            # (flat indices into the working arrays, all C-contiguous)
            # deepen: the next layer below the block, at the lowest rank
            new_layer = L - 1 - depth[ma]
            depth[ma] += 1
            fa = ma * C + add
            gain.reshape(-1)[fa] = self.add_gain[np.maximum(new_layer - 1, 0)]
            rerate(fa, new_layer > 0)
            fr = mr * C + br
            if mono:
                lv = levels.reshape(-1)
                lv[ma * K] += 1
                rerate(ma * C)  # level 0 has a layer to raise
                # raise the topmost layer of level k: level k's top moves one layer down
                fk = mr * K + br
                fp = mr * (K - 1) + br
                raised_layer = pos.reshape(-1)[fp]
                pos.reshape(-1)[fp] = raised_layer - 1
                left = lv[fk] - 1
                lv[fk] = left
                lv[fk + 1] += 1
                raised_to = br + 1
                gain.reshape(-1)[fr] = self.raise_gain[np.maximum(raised_layer - 1, 0), br]
                rerate(fr, left > 0)
                up = br + 1 < add
                rerate(fr[up] + 1)  # level k + 1 has a layer to raise
            else:
                raised_layer = br
                levels.reshape(-1)[ma * L + new_layer] = 0
                if n_raise:
                    fn = ma * C + new_layer
                    dt.reshape(-1)[fn] = self.raise_dt[prof[ma], 0]
                    dm.reshape(-1)[fn] = self.raise_dm[0]
                    if db is not None:
                        db.reshape(-1)[fn] = self.raise_db[0]
                    gain.reshape(-1)[fn] = self.raise_gain[new_layer, 0]
                    rerate(fn)
                    fl = mr * L + br
                    raised_to = levels.reshape(-1)[fl] + 1
                    levels.reshape(-1)[fl] = raised_to
                    kk = np.minimum(raised_to, K - 2)
                    dt.reshape(-1)[fr] = self.raise_dt[prof[mr], kk]
                    dm.reshape(-1)[fr] = self.raise_dm[kk]
                    if db is not None:
                        db.reshape(-1)[fr] = self.raise_db[kk]
                    gain.reshape(-1)[fr] = self.raise_gain[br, kk]
                    rerate(fr, raised_to < K - 1)
            if path is not None:
                u = path_rows[at[m]]
                path.time_s[step + 1][u] = time_s[m]
                path.mem[step + 1][u] = mem[m]
                path.utility[step + 1][u] = utility[m]
                path.moves[u] = step + 1
                reach = _least_limit(t_before, mdt)
                if step:
                    reach = np.maximum(path.reach[step - 1][u], reach)
                path.reach[step][u] = reach
                if mono:
                    path.levels[step + 1][u] = levels[m]
                else:
                    path.rank_step[u[is_add], new_layer, 0] = step
                    if n_raise:
                        path.rank_step[u[~is_add], raised_layer, raised_to] = step
            step += 1
            if m.size < n_alive:
                # Rows without a move are done (with a server link they may not move again).
                rate[~has] = -np.inf
                n_alive = m.size
                if 4 * n_alive < 3 * len(has):
                    done = np.flatnonzero(~has)
                    self._hand_back(st, at[done], done, time_s, mem, nbytes, utility, depth, levels)
                    at, prof, cap, limit, weight, group = (
                        at[m], prof[m], cap[m], limit[m], weight[m], group[m]
                    )  # fmt: skip
                    time_s, mem, nbytes, utility = time_s[m], mem[m], nbytes[m], utility[m]
                    depth, levels, pos = depth[m], levels[m], pos[m]
                    dt, dm, gain, rate = dt[m], dm[m], gain[m], rate[m]
                    if db is not None:
                        db = db[m]
        self._hand_back(st, at, slice(None), time_s, mem, nbytes, utility, depth, levels)

    @staticmethod
    def _hand_back(
        st: _State,
        at: IntArray,
        local: IntArray | slice,
        time_s: FloatArray,
        mem: FloatArray,
        nbytes: FloatArray,
        utility: FloatArray,
        depth: IntArray,
        levels: IntArray,
    ) -> None:
        """Write the state of the working rows ``local`` back to rows ``at`` of ``st``."""
        st.time_s[at] = time_s[local]
        st.mem[at] = mem[local]
        st.nbytes[at] = nbytes[local]
        st.utility[at] = utility[local]
        st.depth[at] = depth[local]
        st.levels[at] = levels[local]

    def _new_path(self, n_rows: int, rows: IntArray, st: _State) -> _Path:
        """An empty path for ``n_rows`` rows, of which ``rows`` start from ``st``."""
        L, K = self.L, self.K
        most = (L - self.start_depth) + L * (K - 1)  # moves a row can make at most
        # Entries past a row's last move are never read; filled all at once (much faster
        # than the moves writing to fresh memory a row at a time).
        time_s = np.full((most + 1, n_rows), 0.0)
        mem = np.full((most + 1, n_rows), 0.0)
        utility = np.full((most + 1, n_rows), 0.0)
        time_s[0, rows] = st.time_s
        mem[0, rows] = st.mem
        utility[0, rows] = st.utility
        if self.monotone:
            levels = np.full((most + 1, n_rows, K), 0, dtype=np.int8 if L < 128 else np.int16)
            levels[0, rows] = st.levels
            rank_step = np.zeros((0, L, K), dtype=np.int16)
        else:
            levels = np.zeros((0, 0, K), dtype=np.int8)
            rank_step = np.full((n_rows, L, K), _NEVER, dtype=np.int16)
            rank_step[rows, L - self.start_depth :, 0] = -1
        return _Path(
            moves=np.zeros(n_rows, dtype=np.int64),
            time_s=time_s,
            mem=mem,
            utility=utility,
            reach=np.full((most, n_rows), np.inf),
            levels=levels,
            rank_step=rank_step,
        )

    def _link_cap(self, slowest_s: FloatArray) -> FloatArray:
        assert self.server_bps is not None
        return self.server_bps * slowest_s * (1 + _REL_TOL)

    def _server_accept(
        self,
        has_move: NDArray[np.bool_],
        gain_rate: FloatArray,
        nbytes: FloatArray,
        new_time_s: FloatArray,
        group: IntArray,
        link: tuple[FloatArray, FloatArray],
    ) -> NDArray[np.bool_]:
        """Accept proposed moves per group in order of gain per second, up to the first that
        the link (``used <= server_bps * slowest``) cannot take; update ``link``."""
        idx = np.flatnonzero(has_move)
        if idx.size == 0:
            return has_move
        used, slowest = link
        g = group[idx]
        order = np.lexsort((-gain_rate[idx], g))
        gs, bs, ts = g[order], nbytes[idx][order], new_time_s[idx][order]
        starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
        seg_len = np.diff(np.r_[starts, len(order)])
        seg = np.repeat(np.arange(len(starts)), seg_len)
        csum = np.cumsum(bs)
        csum_seg = csum - np.repeat(csum[starts] - bs[starts], seg_len)
        # Running maximum of the new times within each group (offsets keep groups apart).
        offset = seg * (float(ts.max()) + 1.0)
        run_max = np.maximum(np.maximum.accumulate(ts + offset) - offset, ts)
        within = used[gs] + csum_seg <= self._link_cap(np.maximum(slowest[gs], run_max))
        missed = (~within).astype(np.int64)
        fails = np.cumsum(missed)
        fails_seg: IntArray = fails - np.repeat(fails[starts] - missed[starts], seg_len)
        take: NDArray[np.bool_] = fails_seg == 0
        accepted = np.zeros_like(has_move)
        accepted[idx[order[take]]] = True
        np.add.at(used, gs[take], bs[take])
        np.maximum.at(slowest, gs[take], ts[take])
        return accepted

    # -- evaluation of candidate deadlines ------------------------------------------------
    def _free(self) -> tuple[_Rows, _Path]:
        """The greedy of every row without a deadline, and its path (computed once).

        Under a deadline ``T`` a row makes the same moves as without one as long as they
        fit: the moves that fit under ``T`` are a subset of those without a deadline, so
        while the best one fits it is still the best. A row whose path without a deadline
        ends within ``T`` ends there; any other one goes on from the first move of its path
        that misses ``T`` (:meth:`_resume`).
        """
        if self._free_rows is None:
            n_u = len(self.unique_devices)
            self._free_rows = self.run(
                np.full(n_u, np.inf), np.arange(n_u), np.zeros(n_u, dtype=np.int64), record=True
            )
        rows, path = self._free_rows
        assert path is not None
        return rows, path

    def _resume(self, path: _Path, limit: FloatArray, rows: IntArray, ranks: bool) -> _Rows:
        """Greedy of unique rows ``rows`` under ``limit``, from where their free paths stop
        fitting (rows that participate without a deadline)."""
        n = len(rows)
        participates = self.row_memory_ok[rows] & (self.row_min_time[rows] <= limit)
        sub = np.flatnonzero(participates)
        u = rows[sub]
        lim = limit[sub]
        # j: how many moves of the free path fit (``reach`` grows along the path).
        n_u = path.moves.size
        reach = path.reach.reshape(-1)
        lo = np.zeros(len(u), dtype=np.int64)
        hi = path.moves[u]
        act = np.flatnonzero(lo < hi)
        while act.size:
            mid = (lo[act] + hi[act]) >> 1
            fits = reach[mid * n_u + u[act]] <= lim[act]
            lo[act] = np.where(fits, mid + 1, lo[act])
            hi[act] = np.where(fits, hi[act], mid)
            act = act[lo[act] < hi[act]]
        at_j = lo * n_u + u
        itemsize = path.levels.itemsize
        if self.monotone:
            # each row's levels as one element: one take instead of a gather of K values
            whole = path.levels.reshape(-1, self.K).view(np.dtype((np.void, self.K * itemsize)))
            levels = np.take(whole.reshape(-1), at_j).view(path.levels.dtype)
            levels = levels.reshape(-1, self.K).astype(np.int64)
            depth = levels.sum(axis=1)
            at_level = levels[:, :-1] > 0
        else:
            levels = (path.rank_step[u] < lo[:, None, None]).sum(axis=2) - 1
            depth = (levels >= 0).sum(axis=1)
            at_level = np.zeros((len(u), self.K - 1), dtype=bool)
            for k in range(self.K - 1):
                at_level[:, k] = (levels == k).any(axis=1)
        st = _State(
            prof=self.row_prof[u],
            cap=self.row_cap[u],
            limit=lim,
            weight=np.asarray(self.row_samples[u], dtype=np.float64),
            group=np.zeros(len(u), dtype=np.int64),
            time_s=path.time_s.reshape(-1)[at_j],
            mem=path.mem.reshape(-1)[at_j],
            nbytes=np.zeros(len(u)),
            utility=path.utility.reshape(-1)[at_j],
            depth=depth,
            levels=levels,
        )
        # Most rows have no move left that fits: only the others go on.
        tc = self.tables
        t_room = st.limit - st.time_s
        m_room = st.cap - st.mem
        movable = (depth < self.L) & (self.row_add_dt[u] <= t_room)
        movable &= tc.mem_coef[0] <= m_room
        if self.K > 1:
            raise_fits = at_level & (self.row_raise_dt[u] <= t_room[:, None])
            raise_fits &= self.raise_dm[None, :] <= m_room[:, None]
            movable |= raise_fits.any(axis=1)
        self._simulate(st, None, None, sub, np.flatnonzero(movable))
        return self._scatter(n, sub, st, participates, ranks=ranks)

    def _rows_for(self, deadlines: FloatArray, *, ranks: bool = False) -> _Rows:
        """Row results for each deadline (``len(deadlines) x n_u`` rows, candidate-major)."""
        n_u = len(self.unique_devices)
        c = len(deadlines)
        if self.server_bps is not None:
            # the server link couples every row of a candidate: run them all
            rows, _ = self.run(
                np.repeat(deadlines, n_u),
                np.tile(np.arange(n_u), c),
                np.repeat(np.arange(c), n_u),
                ranks=ranks,
            )
            return rows
        free, path = self._free()
        limit = deadlines * (1 + _REL_TOL) + 1e-12
        again = free.participates[None, :] & (free.time_s[None, :] > limit[:, None])
        cand, row = np.nonzero(again)
        depth = np.tile(free.depth, c)
        time_s = np.tile(free.time_s, c)
        utility = np.tile(free.utility, c)
        participates = np.tile(free.participates, c)
        rank_index = None
        if ranks:
            assert free.rank_index is not None
            rank_index = np.tile(free.rank_index, (c, 1))
        if cand.size:
            sim = self._resume(path, limit[cand], row, ranks)
            flat = cand * n_u + row
            depth[flat] = sim.depth
            time_s[flat] = sim.time_s
            utility[flat] = sim.utility
            participates[flat] = sim.participates
            if rank_index is not None:
                assert sim.rank_index is not None
                rank_index[flat] = sim.rank_index
        return _Rows(
            depth=depth,
            rank_index=rank_index,
            time_s=time_s,
            utility=utility,
            nbytes=None,
            participates=participates,
        )

    def evaluate(self, deadlines: FloatArray) -> tuple[FloatArray, FloatArray, NDArray[np.bool_]]:
        """Per candidate deadline: total utility, round time and whether the plan is valid."""
        n_u = len(self.unique_devices)
        per_batch = max(1, _MAX_ROWS // max(n_u, 1))
        utilities = np.zeros(len(deadlines))
        round_times = np.zeros(len(deadlines))
        valid = np.zeros(len(deadlines), dtype=bool)
        opts = self.problem.options
        need = max(1, opts.min_participants if opts.allow_dropping else 0)
        need_samples = opts.min_sample_share * float(self.row_samples.sum()) * (1 - 1e-9)
        for start in range(0, len(deadlines), per_batch):
            chunk = deadlines[start : start + per_batch]
            c = len(chunk)
            rows = self._rows_for(chunk)
            part = rows.participates.reshape(c, n_u)
            util = rows.utility.reshape(c, n_u) @ self.row_samples
            times = np.where(part, rows.time_s.reshape(c, n_u), 0.0).max(axis=1)
            ok = part.astype(np.float64) @ self.row_counts >= need
            if opts.allow_dropping and opts.min_sample_share > 0:
                # C9s: the participants hold the share of the fleet's samples
                ok &= part.astype(np.float64) @ self.row_samples >= need_samples
            if not opts.allow_dropping:
                ok &= part.all(axis=1)
            if self.server_bps is not None:
                # C7 against the real round time, the slowest participant's.
                assert rows.nbytes is not None
                total = rows.nbytes.reshape(c, n_u) @ self.row_counts
                ok &= total <= self.server_bps * times * (1 + 1e-7)
            utilities[start : start + c] = util
            round_times[start : start + c] = times
            valid[start : start + c] = ok
        return utilities, round_times, valid

    def configurations(self, deadline: float) -> tuple[tuple[Configuration, ...], _Rows]:
        """Every device's configuration (fleet order) under ``deadline``, and the row results."""
        rows = self._rows_for(np.asarray([deadline], dtype=np.float64), ranks=True)
        assert rows.rank_index is not None
        L = self.L
        # one configuration per distinct rank pattern, shared by the rows that have it (rows
        # compared as bytes: much faster than np.unique over rows)
        small = np.ascontiguousarray(rows.rank_index.astype(np.int8 if self.K < 128 else np.int16))
        as_bytes = small.view(np.dtype((np.void, small.itemsize * L))).reshape(-1)
        _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
        patterns = rows.rank_index[first]
        per_pattern: list[Configuration] = []
        for pattern in patterns:
            d = int((pattern >= 0).sum())
            if d == 0:
                per_pattern.append(((), ()))
                continue
            ranks = tuple(int(self.ranks[k]) for k in pattern[L - d :])
            per_pattern.append((tuple(range(L - d, L)), ranks))
        pick = inverse.reshape(-1)[self.row_of_device]
        return tuple(per_pattern[i] for i in pick.tolist()), rows


def larger_configurations(
    layers: tuple[int, ...], ranks: tuple[int, ...], grid: tuple[int, ...], num_layers: int
) -> list[Configuration]:
    """The greedy's moves from a configuration, as configurations: one more layer below at
    the lowest rank (*deepen*), or one layer one grid step up with ranks still
    non-decreasing toward the output (*raise*). From no configuration: the top layer at the
    lowest rank."""
    out: list[Configuration] = []
    if not layers:
        return [((num_layers - 1,), (grid[0],))]
    if layers[0] > 0:
        out.append(((layers[0] - 1, *layers), (grid[0], *ranks)))
    index = {r: k for k, r in enumerate(grid)}
    for j, r in enumerate(ranks):
        k = index.get(r)
        if k is None or k + 1 >= len(grid):
            continue
        up = grid[k + 1]
        if j + 1 < len(ranks) and up > ranks[j + 1]:
            continue
        out.append((layers, (*ranks[:j], up, *ranks[j + 1 :])))
    return out


def minimal_configuration_reasons(
    problem: PlanningProblem, deadline_s: float | None, *, depth: int | None = None
) -> tuple[str, ...]:
    """Explain which devices cannot run the minimal configuration, and by how much.

    The minimal configuration is the top ``depth`` layers (default ``min_depth``) at the
    lowest rank of the grid: every configuration needs at least its memory and time, so a
    device it does not fit cannot participate at all.
    """
    L = problem.spec.num_layers
    depth = problem.options.min_depth if depth is None else depth
    layers = tuple(range(L - depth, L))
    low = problem.job.ranks[0]
    what = f"{depth} layer{'s' if depth > 1 else ''} at rank {low}"
    out: list[str] = []
    for device in problem.fleet.devices:
        cost = problem.costs.evaluate(device, layers, (low,) * depth)
        if cost.memory_bytes > device.memory_bytes * (1 + _REL_TOL):
            need = cost.memory_bytes / 1e9
            out.append(
                f"device {device.device_id!r}: memory: the minimal configuration ({what}) "
                f"needs {need:.4g} GB > {device.memory_gb:.4g} GB available "
                f"(short by {need - device.memory_gb:.4g} GB)"
            )
        elif deadline_s is not None and cost.time_s > deadline_s * (1 + _REL_TOL):
            out.append(
                f"device {device.device_id!r}: deadline: the minimal configuration ({what}) "
                f"takes {cost.time_s:.4g} s > deadline {deadline_s:.4g} s "
                f"(over by {cost.time_s - deadline_s:.4g} s)"
            )
    return tuple(out)


def _candidates(greedy: _Greedy) -> FloatArray:
    """Sorted candidate deadlines: minimal and maximal configuration times of the devices."""
    opts = greedy.problem.options
    usable = greedy.memory_ok
    mins = greedy.min_time[usable]
    if mins.size == 0:
        return np.zeros(0)
    if opts.allow_dropping:
        need = max(1, opts.min_participants)
        if need > mins.size:
            return np.zeros(0)
        lower = float(np.sort(mins)[need - 1])
        if opts.min_sample_share > 0:
            # C9s: no deadline below the one at which enough samples can take part
            samples = greedy.samples[usable]
            order = np.argsort(mins, kind="stable")
            held = np.cumsum(samples[order])
            share = opts.min_sample_share * greedy.samples.sum() * (1 - 1e-9)
            k = int(np.searchsorted(held, share))
            if k >= len(order):
                return np.zeros(0)
            lower = max(lower, float(mins[order[k]]))
    else:
        lower = float(mins.max())
    upper = max(float(greedy.max_time[usable].max()), lower)
    cands = np.unique(np.concatenate([mins, greedy.max_time[usable], [lower, upper]]))
    return cands[(cands >= lower) & (cands <= upper)]


def _thin(values: FloatArray, count: int) -> FloatArray:
    if len(values) <= count:
        return values
    idx = np.unique(np.round(np.linspace(0, len(values) - 1, count)).astype(np.int64))
    return values[idx]


def _search_rate(greedy: _Greedy, cands: FloatArray) -> float | None:
    """The candidate deadline with the best ``U / T``; coarse-to-fine over many candidates."""
    pool = cands
    best_t: float | None = None
    best_rate = -np.inf
    while True:
        probe = _thin(pool, MAX_CANDIDATES)
        util, times, ok = greedy.evaluate(probe)
        rate = np.where(ok & (times > 0), util / np.where(times > 0, times, 1.0), -np.inf)
        i = int(np.argmax(rate))
        if rate[i] > best_rate:
            best_rate, best_t = float(rate[i]), float(probe[i])
        if len(probe) == len(pool) or not np.isfinite(rate[i]):
            break
        # Zoom into the candidates between the neighbours of the best probe.
        lo = probe[max(i - 1, 0)]
        hi = probe[min(i + 1, len(probe) - 1)]
        pool = pool[(pool >= lo) & (pool <= hi)]
    return best_t


def _search_min_time(greedy: _Greedy, cands: FloatArray, floor: float) -> float | None:
    """The smallest deadline whose greedy plan reaches ``floor`` (candidates, then bisection)."""
    found: float | None = None
    failed: float | None = None
    for start in range(0, len(cands), MAX_CANDIDATES):
        chunk = cands[start : start + MAX_CANDIDATES]
        util, _, ok = greedy.evaluate(chunk)
        good = ok & (util >= floor * (1 - 1e-12))
        if good.any():
            j = int(np.argmax(good))
            found = float(chunk[j])
            if j > 0:
                failed = float(chunk[j - 1])
            elif start > 0:
                failed = float(cands[start - 1])
            break
    if found is None:
        return None
    if failed is not None:
        lo, hi = failed, found
        for _ in range(_REFINE_STEPS):
            mid = 0.5 * (lo + hi)
            util, _, ok = greedy.evaluate(np.array([mid]))
            if ok[0] and util[0] >= floor * (1 - 1e-12):
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-9 * hi:
                break
        found = hi
    return found


def greedy_configurations(problem: PlanningProblem) -> GreedyResult:
    """Run the greedy for ``problem`` and return configurations in fleet order.

    Raises
    ------
    PlannerInputError
        ``coverage_layers`` exceeds the model's layers or ``min_participants`` the fleet.
    InfeasibleError
        Some device cannot run its smallest configuration (memory, or the deadline of the
        ``deadline`` objective) and dropping is not allowed, too few devices are left, or
        the greedy finds no plan that meets the server link, coverage or utility floor.
    """
    opts = problem.options
    check_fleet_options(problem)
    greedy = _Greedy(problem)
    deadline: float | None
    if opts.objective == "deadline":
        assert opts.deadline_s is not None  # PlannerOptions enforces it
        deadline = float(opts.deadline_s)
        _, _, ok = greedy.evaluate(np.array([deadline]))
        if not ok[0]:
            _raise_infeasible(greedy, deadline)
    else:
        cands = _candidates(greedy)
        if cands.size == 0:
            _raise_infeasible(greedy, None)
        if opts.objective in RATIO_OBJECTIVES:
            # the LEGEND greedy maximises its utility per second; under ``progress`` that
            # utility is the progress model's (the "greedy on the learned model" ablation)
            deadline = _search_rate(greedy, cands)
            if deadline is None:
                _raise_infeasible(greedy, None)
        else:
            u_max, _, ok_max = greedy.evaluate(np.array([math.inf]))
            if not ok_max[0]:
                _raise_infeasible(greedy, None)
            floor = (
                float(opts.utility_floor)
                if opts.utility_floor is not None
                else opts.utility_floor_share * float(u_max[0])
            )
            if floor > float(u_max[0]) * (1 + 1e-12):
                raise InfeasibleError(
                    "no plan reaches the utility floor",
                    (
                        f"utility floor: {floor:.6g} exceeds the greedy's highest utility "
                        f"{float(u_max[0]):.6g}; lower utility_floor or utility_floor_share",
                    ),
                )
            deadline = _search_min_time(greedy, cands, floor)
            if deadline is None:
                deadline = math.inf
    assert deadline is not None
    configs, rows = greedy.configurations(deadline)
    part = rows.participates[greedy.row_of_device]
    round_time = float(np.where(part, rows.time_s[greedy.row_of_device], 0.0).max())
    return GreedyResult(
        configurations=configs,
        deadline_s=deadline,
        round_time_s=round_time,
        utility=float(rows.utility @ greedy.row_samples),
    )


def check_fleet_options(problem: PlanningProblem) -> None:
    """Reject options that no fleet of this size and model can meet (exit status 2)."""
    opts = problem.options
    L = problem.spec.num_layers
    if opts.coverage_share > 0 and opts.coverage_layers > L:
        raise PlannerInputError(
            f"`coverage_layers` {opts.coverage_layers} exceeds the {L} layers of "
            f"{problem.spec.name}"
        )
    if opts.min_participants > len(problem.fleet):
        raise PlannerInputError(
            f"`min_participants` {opts.min_participants} exceeds the fleet's "
            f"{len(problem.fleet)} devices"
        )


def _raise_infeasible(greedy: _Greedy, deadline_s: float | None) -> None:
    problem = greedy.problem
    opts = problem.options
    if not opts.allow_dropping:
        blocks = blocked_devices(problem, deadline_s)
        if blocks:
            raise InfeasibleError(
                "no plan: some devices cannot run even their smallest configuration",
                tuple(str(b) for b in blocks),
            )
    reasons = list(fleet_reasons(problem, deadline_s))
    if opts.allow_dropping:
        blocks = blocked_devices(problem, deadline_s)
        able = len(problem.fleet) - len({b.device_id for b in blocks})
        if able == 0:
            raise InfeasibleError(
                "no plan: no device can run even its smallest configuration",
                tuple(str(b) for b in blocks),
            )
    if greedy.start_depth > opts.min_depth:
        extra = minimal_configuration_reasons(problem, deadline_s, depth=greedy.start_depth)
        reasons.extend(
            f"{r} (the greedy meets coverage by giving every participant "
            f"{greedy.start_depth} layers; an IP solver may still find a plan)"
            for r in extra
        )
    if not reasons:
        reasons.append(
            "the greedy found no plan that meets the server link, coverage and participant "
            "constraints together; an IP solver may still find one"
        )
    raise InfeasibleError("no plan found by the greedy", tuple(reasons))


def solve_greedy(problem: PlanningProblem) -> SolverOutcome:
    """Solver backend ``greedy``: the LEGEND-style greedy (status ``FEASIBLE``, no gap)."""
    result = greedy_configurations(problem)
    # ``progress`` also prices bytes, which the greedy does not track: the plan computes it
    value = (
        None
        if problem.options.objective == "progress"
        else objective_value(problem.options.objective, result.utility, result.round_time_s)
    )
    return SolverOutcome(
        configurations=result.configurations,
        status="FEASIBLE",
        solver="greedy",
        solver_version=legend_version(),
        mip_gap=None,
        objective_value=value,
        deadline_s=result.deadline_s if math.isfinite(result.deadline_s) else None,
    )
