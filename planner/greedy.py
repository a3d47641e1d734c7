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
``allow_dropping`` with ``min_participants`` (devices whose minimal configuration misses the
deadline or memory sit the round out), ``server_mbps`` (the round's bytes in both
directions must pass the server's link within the slowest participant's time; moves of all
devices compete for it in order of gain per second), and layer coverage, which the greedy meets
conservatively by giving every participant at least ``coverage_layers`` layers.

Everything is vectorised over (candidate deadline, device) rows with NumPy; devices with
identical profiles share one row unless the server link couples them. Costs come from
:meth:`~legend.planner.costs.CostModel.table`, so the greedy sees exactly the cost model the
integer program sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import metadata

import numpy as np
from numpy.typing import NDArray

from legend.planner.diagnose import blocked_devices, fleet_reasons
from legend.planner.errors import InfeasibleError, PlannerInputError
from legend.planner.profiles import DeviceProfile
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


def _version() -> str:
    try:
        return "legend " + metadata.version("legend")
    except metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
        return "legend"


@dataclass(frozen=True, kw_only=True)
class _Tables:
    """Linear cost coefficients of every distinct profile, as arrays.

    ``*_coef`` arrays are ``[profile, layer, rank index]``; ``*_const`` are ``[profile]``.
    ``bytes_*`` count both directions (what the server's link carries).
    """

    time_const: FloatArray
    time_coef: FloatArray
    mem_const: FloatArray
    mem_coef: FloatArray
    bytes_const: FloatArray
    bytes_coef: FloatArray


@dataclass(frozen=True, kw_only=True)
class _Rows:
    """The result of greedy runs, one row per (deadline, device)."""

    depth: IntArray
    rank_index: IntArray  # [row, layer], -1 where the layer carries no LoRA
    time_s: FloatArray
    utility: FloatArray
    nbytes: FloatArray
    participates: NDArray[np.bool_]


@dataclass(frozen=True, kw_only=True)
class _Start:
    """Rows at their minimal configuration (arrays are updated in place by the run)."""

    prof: IntArray
    cap: FloatArray
    limit: FloatArray
    weight: FloatArray
    participates: NDArray[np.bool_]
    depth: IntArray
    time_s: FloatArray
    mem: FloatArray
    nbytes: FloatArray
    utility: FloatArray
    link: tuple[FloatArray, FloatArray] | None


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
        self._free_rows: _Rows | None = None
        opts = problem.options
        fleet = problem.fleet
        spec = problem.spec
        self.L = spec.num_layers
        self.ranks = np.asarray(problem.job.ranks, dtype=np.int64)
        self.K = len(self.ranks)
        self.monotone = opts.monotone_ranks
        coverage_depth = (
            min(opts.coverage_layers, self.L)
            if opts.coverage_layers > 0 and opts.coverage_share > 0
            else 0
        )
        self.start_depth = max(opts.min_depth, coverage_depth)
        self.server_bps = None if opts.server_mbps is None else opts.server_mbps * 1e6 / 8

        # Distinct cost profiles: the cost model sees speed, links and local steps only.
        keys: dict[tuple[float, float, float, int], int] = {}
        profile_of = np.empty(len(fleet), dtype=np.int64)
        representatives: list[DeviceProfile] = []
        representative_index: list[int] = []
        for i, device in enumerate(fleet.devices):
            key = (
                device.tflops,
                device.uplink_mbps,
                device.downlink_mbps,
                problem.job.steps_for(device),
            )
            if key not in keys:
                keys[key] = len(representatives)
                representatives.append(device)
                representative_index.append(i)
            profile_of[i] = keys[key]
        # Costs from the cost model's affine coefficients (checked against it), vectorised:
        # every layer costs the same, and each coefficient is affine in the rank.
        from legend.planner.catalog import fleet_costs, shared_costs

        fc = fleet_costs(problem)
        reps = np.asarray(representative_index, dtype=np.int64)
        (m0, m1, m2), (b0, b1) = shared_costs(problem)
        r = self.ranks.astype(np.float64)
        L = spec.num_layers
        n_p = len(reps)
        time_coef = fc.time_per_layer[reps, None] + fc.time_per_rank[reps, None] * r[None, :]
        self.tables = _Tables(
            time_const=fc.time_const[reps],
            time_coef=np.broadcast_to(time_coef[:, None, :], (n_p, L, len(r))).copy(),
            mem_const=np.full(n_p, m0),
            mem_coef=np.broadcast_to((m1 + m2 * r)[None, None, :], (n_p, L, len(r))).copy(),
            # Both directions cross the server's link: download of the slice, upload.
            bytes_const=np.full(n_p, 2.0 * b0),
            bytes_coef=np.broadcast_to((2.0 * b1 * r)[None, None, :], (n_p, L, len(r))).copy(),
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

        w = np.asarray(problem.layer_weights, dtype=np.float64)
        g = np.asarray(problem.rank_gains, dtype=np.float64)
        self.add_gain = w * g[0]  # [layer]: utility per sample of adding layer at rank 0
        self.raise_gain = w[:, None] * np.diff(g)[None, :]  # [layer, k]: k -> k+1
        tc = self.tables
        self.raise_dt = np.diff(tc.time_coef, axis=2)  # [profile, layer, k]
        self.raise_dm = np.diff(tc.mem_coef, axis=2)
        self.raise_db = np.diff(tc.bytes_coef, axis=2)

        # Minimal configuration (start_depth top layers at the lowest rank) and maximal one.
        top = slice(self.L - self.start_depth, self.L)
        dev_prof = profile_of
        self.min_time = tc.time_const[dev_prof] + tc.time_coef[dev_prof, top, 0].sum(axis=1)
        self.min_mem = tc.mem_const[dev_prof] + tc.mem_coef[dev_prof, top, 0].sum(axis=1)
        self.min_bytes = tc.bytes_const[dev_prof] + tc.bytes_coef[dev_prof, top, 0].sum(axis=1)
        self.max_time = tc.time_const[dev_prof] + tc.time_coef[dev_prof, :, -1].sum(axis=1)
        self.memory_ok = self.min_mem <= self.capacity * (1 + _REL_TOL)

    # -- the greedy ---------------------------------------------------------------------
    def _start_state(self, deadlines: FloatArray, rows_of: IntArray, groups: IntArray) -> _Start:
        """Every row at its minimal configuration, and the server link's state per group."""
        L = self.L
        devices = self.unique_devices[rows_of]
        limit = deadlines * (1 + _REL_TOL) + 1e-12
        participates = self.memory_ok[devices] & (self.min_time[devices] <= limit)
        time_s = np.where(participates, self.min_time[devices], 0.0)
        nbytes = np.where(participates, self.min_bytes[devices], 0.0)
        top = slice(L - self.start_depth, L)
        # C7 state per group: bytes through the server's link and the slowest participant's
        # time; a move must keep ``used <= server_bps * slowest``.
        link: tuple[FloatArray, FloatArray] | None = None
        if self.server_bps is not None:
            n_groups = int(groups.max()) + 1 if len(rows_of) else 0
            used: FloatArray = np.bincount(groups, weights=nbytes, minlength=n_groups).astype(
                np.float64
            )
            slowest = np.zeros(n_groups)
            np.maximum.at(slowest, groups, time_s)
            link = (used, slowest)
        return _Start(
            prof=self.profile_of[devices],
            cap=self.capacity[devices] * (1 + _REL_TOL),
            limit=limit,
            weight=np.asarray(self.row_samples[rows_of], dtype=np.float64),
            participates=participates,
            depth=np.where(participates, self.start_depth, 0).astype(np.int64),
            time_s=time_s,
            mem=np.where(participates, self.min_mem[devices], 0.0),
            nbytes=nbytes,
            utility=np.where(participates, self.add_gain[top].sum(), 0.0),
            link=link,
        )

    def run(self, deadlines: FloatArray, rows_of: IntArray, groups: IntArray) -> _Rows:
        """Greedy for each row ``r``: greedy row ``rows_of[r]`` under deadline ``deadlines[r]``.

        Rows whose minimal configuration misses the deadline or memory do not participate.
        ``groups[r]`` names the candidate a row belongs to (rows of one group share the
        server link's byte budget). Utilities are per sample of the row's devices.
        """
        if self.monotone and self.K > 1:
            return self._run_monotone(deadlines, rows_of, groups)
        return self._run_layers(deadlines, rows_of, groups)

    def _run_monotone(self, deadlines: FloatArray, rows_of: IntArray, groups: IntArray) -> _Rows:
        """:meth:`run` with ranks non-decreasing toward the output, in counts per rank level.

        With ranks non-decreasing toward the output, the layers at one rank level form a
        block, and only the topmost layer of each level may be raised (any other would pass
        the layer above it). Every layer costs the same, so the raise moves are one per
        level: the same moves, gains and ties as :meth:`_run_layers` (the lowest layer wins a
        tie), in ``K`` columns instead of ``L``.
        """
        tc = self.tables
        L, K = self.L, self.K
        n_rows = len(rows_of)
        st = self._start_state(deadlines, rows_of, groups)
        prof, cap, limit, weight = st.prof, st.cap, st.limit, st.weight
        participates, depth, link = st.participates, st.depth, st.link
        time_s, mem, nbytes, utility = st.time_s, st.mem, st.nbytes, st.utility
        counts = np.zeros((n_rows, K), dtype=np.int64)
        counts[:, 0] = depth

        # per profile and level: the cost of adding a layer (level 0) and of one raise
        add_dt = tc.time_coef[:, 0, 0]
        add_dm = tc.mem_coef[:, 0, 0]
        add_db = tc.bytes_coef[:, 0, 0]
        r_dt = self.raise_dt[:, 0, :]  # [profile, level]
        r_dm = self.raise_dm[:, 0, :]
        r_db = self.raise_db[:, 0, :]
        levels = np.arange(K - 1)
        active = np.flatnonzero(participates)
        while active.size:
            n = active.size
            a_prof = prof[active]
            d = depth[active]
            c = counts[active]
            t_room = limit[active] - time_s[active]
            m_room = cap[active] - mem[active]
            if link is not None:
                g_a = groups[active]
                used_a, slow_a = link[0][g_a], link[1][g_a]
                t_a = time_s[active]
            new_layer = np.maximum(L - 1 - d, 0)
            dt_a, dm_a, db_a = add_dt[a_prof], add_dm[a_prof], add_db[a_prof]
            ok_a = (d < L) & (dt_a <= t_room) & (dm_a <= m_room)
            if link is not None:
                ok_a &= used_a + db_a <= self._link_cap(np.maximum(slow_a, t_a + dt_a))
            rate_a = np.where(ok_a, self.add_gain[new_layer] / np.maximum(dt_a, 1e-300), -np.inf)
            # the topmost layer of level k sits below every layer of the levels above it
            above = np.cumsum(c[:, ::-1], axis=1)[:, ::-1]  # layers at level >= k
            pos = L - 1 - (above[:, 1:])  # [n, K-1]: top layer of level k, k < K-1
            pos = np.clip(pos, 0, L - 1)
            dt_r = r_dt[a_prof]
            dm_r = r_dm[a_prof]
            ok_r = (c[:, :-1] > 0) & (dt_r <= t_room[:, None]) & (dm_r <= m_room[:, None])
            db_r = r_db[a_prof]
            if link is not None:
                ok_r &= used_a[:, None] + db_r <= self._link_cap(
                    np.maximum(slow_a[:, None], t_a[:, None] + dt_r)
                )
            gain_r = self.raise_gain[pos, levels[None, :]]
            rate_r = np.where(ok_r, gain_r / np.maximum(dt_r, 1e-300), -np.inf)
            arange_n = np.arange(n)
            best_k = np.argmax(rate_r, axis=1)
            best_r = rate_r[arange_n, best_k]
            use_add = rate_a > best_r
            ratio = np.where(use_add, rate_a, best_r)
            mdt = np.where(use_add, dt_a, dt_r[arange_n, best_k])
            mdm = np.where(use_add, dm_a, dm_r[arange_n, best_k])
            mdb = np.where(use_add, db_a, db_r[arange_n, best_k])
            mdu = np.where(use_add, self.add_gain[new_layer], gain_r[arange_n, best_k])
            has_move = np.isfinite(ratio)
            if link is not None:
                has_move = self._server_accept(
                    active, has_move, ratio * weight[active], mdb, time_s[active] + mdt, groups,
                    link,
                )  # fmt: skip
            if not has_move.any():
                break
            rows = active[has_move]
            add = use_add[has_move]
            add_rows = rows[add]
            counts[add_rows, 0] += 1
            depth[add_rows] += 1
            raise_rows = rows[~add]
            k_raise = best_k[has_move][~add]
            counts[raise_rows, k_raise] -= 1
            counts[raise_rows, k_raise + 1] += 1
            time_s[rows] += mdt[has_move]
            mem[rows] += mdm[has_move]
            nbytes[rows] += mdb[has_move]
            utility[rows] += mdu[has_move]
            active = rows
        # rank index per layer: from the bottom of the block, counts[0] layers at level 0, ...
        bounds = (L - depth)[:, None] + np.cumsum(counts, axis=1)  # end of each level's block
        layer = np.arange(L)[None, None, :]
        rank_index = (layer >= bounds[:, :, None]).sum(axis=1)
        rank_index = np.where(np.arange(L)[None, :] >= (L - depth)[:, None], rank_index, -1)
        return _Rows(
            depth=depth,
            rank_index=rank_index.astype(np.int64),
            time_s=time_s,
            utility=utility,
            nbytes=nbytes,
            participates=participates,
        )

    def _run_layers(self, deadlines: FloatArray, rows_of: IntArray, groups: IntArray) -> _Rows:
        """:meth:`run` over every layer (free ranks, or a one-rank grid)."""
        tc = self.tables
        L, K = self.L, self.K
        n_rows = len(rows_of)
        st = self._start_state(deadlines, rows_of, groups)
        prof, cap, limit, weight = st.prof, st.cap, st.limit, st.weight
        participates, depth, link = st.participates, st.depth, st.link
        time_s, mem, nbytes, utility = st.time_s, st.mem, st.nbytes, st.utility
        rank_index = np.full((n_rows, L), -1, dtype=np.int64)
        rank_index[participates, L - self.start_depth :] = 0

        # Flat views: one 1-D ``take`` per move kind is much faster than 3-D fancy indexing.
        kr = max(K - 1, 1)
        add_dt = tc.time_coef[:, :, 0].reshape(-1)
        add_dm = tc.mem_coef[:, :, 0].reshape(-1)
        add_db = tc.bytes_coef[:, :, 0].reshape(-1)
        r_dt = self.raise_dt.reshape(-1)
        r_dm = self.raise_dm.reshape(-1)
        r_db = self.raise_db.reshape(-1)
        r_du = self.raise_gain.reshape(-1)
        layer_idx = np.arange(L)

        active = np.flatnonzero(participates)
        while active.size:
            n = active.size
            a_prof = prof[active]
            d = depth[active]
            t_room = limit[active] - time_s[active]
            m_room = cap[active] - mem[active]
            if link is not None:
                g_a = groups[active]
                used_a, slow_a = link[0][g_a], link[1][g_a]
                t_a = time_s[active]
            # Deepen: the layer just below the block, at the lowest rank.
            new_layer = np.maximum(L - 1 - d, 0)
            fa = a_prof * L + new_layer
            dt_a, dm_a, db_a = add_dt[fa], add_dm[fa], add_db[fa]
            ok_a = (d < L) & (dt_a <= t_room) & (dm_a <= m_room)
            if link is not None:
                ok_a &= used_a + db_a <= self._link_cap(np.maximum(slow_a, t_a + dt_a))
            rate_a = np.where(ok_a, self.add_gain[new_layer] / np.maximum(dt_a, 1e-300), -np.inf)
            # Raise: one layer to the next rank of the grid.
            arange_n = np.arange(n)
            if K > 1:
                ki = rank_index[active]
                can = (ki >= 0) & (ki < K - 1)
                if self.monotone and L > 1:
                    above = np.concatenate([ki[:, 1:], np.full((n, 1), K - 1)], axis=1)
                    can &= ki + 1 <= above
                kk = np.clip(ki, 0, K - 2)
                fl = layer_idx[None, :] * kr + kk
                fr = a_prof[:, None] * (L * kr) + fl
                dt_r = r_dt[fr]
                dm_r = r_dm[fr]
                ok_r = can & (dt_r <= t_room[:, None]) & (dm_r <= m_room[:, None])
                db_r = r_db[fr]
                if link is not None:
                    ok_r &= used_a[:, None] + db_r <= self._link_cap(
                        np.maximum(slow_a[:, None], t_a[:, None] + dt_r)
                    )
                rate_r = np.where(ok_r, r_du[fl] / np.maximum(dt_r, 1e-300), -np.inf)
                best_l = np.argmax(rate_r, axis=1)
                best_r = rate_r[arange_n, best_l]
                use_add = rate_a > best_r
                ratio = np.where(use_add, rate_a, best_r)
                mdt = np.where(use_add, dt_a, dt_r[arange_n, best_l])
                mdm = np.where(use_add, dm_a, dm_r[arange_n, best_l])
                mdb = np.where(use_add, db_a, db_r[arange_n, best_l])
                mdu = np.where(use_add, self.add_gain[new_layer], r_du[fl[arange_n, best_l]])
            else:
                best_l = np.zeros(n, dtype=np.int64)
                use_add = np.ones(n, dtype=bool)
                ratio, mdt, mdm, mdb = rate_a, dt_a, dm_a, db_a
                mdu = self.add_gain[new_layer]
            has_move = np.isfinite(ratio)
            if link is not None:
                has_move = self._server_accept(
                    active,
                    has_move,
                    ratio * weight[active],
                    mdb,
                    time_s[active] + mdt,
                    groups,
                    link,
                )
            if not has_move.any():
                break
            rows = active[has_move]
            add = use_add[has_move]
            add_rows = rows[add]
            rank_index[add_rows, L - 1 - depth[add_rows]] = 0
            depth[add_rows] += 1
            rank_index[rows[~add], best_l[has_move][~add]] += 1
            time_s[rows] += mdt[has_move]
            mem[rows] += mdm[has_move]
            nbytes[rows] += mdb[has_move]
            utility[rows] += mdu[has_move]
            active = rows
        return _Rows(
            depth=depth,
            rank_index=rank_index,
            time_s=time_s,
            utility=utility,
            nbytes=nbytes,
            participates=participates,
        )

    def _link_cap(self, slowest_s: FloatArray) -> FloatArray:
        assert self.server_bps is not None
        return self.server_bps * slowest_s * (1 + _REL_TOL)

    def _server_accept(
        self,
        active: IntArray,
        has_move: NDArray[np.bool_],
        gain_rate: FloatArray,
        nbytes: FloatArray,
        new_time_s: FloatArray,
        groups: IntArray,
        link: tuple[FloatArray, FloatArray],
    ) -> NDArray[np.bool_]:
        """Accept proposed moves per group in order of gain per second, up to the first that
        the link (``used <= server_bps * slowest``) cannot take; update ``link``."""
        idx = np.flatnonzero(has_move)
        if idx.size == 0:
            return has_move
        used, slowest = link
        g = groups[active[idx]]
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
    def _free(self) -> _Rows:
        """The greedy of every row without a deadline (computed once).

        A row whose path without a deadline ends within a deadline ``T`` makes exactly the
        same moves under ``T``: every move it took fits, and the moves that fit under ``T``
        are a subset of those without a deadline, so the best one is the same at each step.
        Only rows whose free path ends after ``T`` are run again for ``T``.
        """
        if self._free_rows is None:
            n_u = len(self.unique_devices)
            self._free_rows = self.run(
                np.full(n_u, np.inf), np.arange(n_u), np.zeros(n_u, dtype=np.int64)
            )
        return self._free_rows

    def _rows_for(self, deadlines: FloatArray) -> _Rows:
        """Row results for each deadline (``len(deadlines) x n_u`` rows, candidate-major)."""
        n_u = len(self.unique_devices)
        c = len(deadlines)
        if self.server_bps is not None:
            # the server link couples every row of a candidate: run them all
            return self.run(
                np.repeat(deadlines, n_u), np.tile(np.arange(n_u), c), np.repeat(np.arange(c), n_u)
            )
        free = self._free()
        limit = deadlines * (1 + _REL_TOL) + 1e-12
        again = free.participates[None, :] & (free.time_s[None, :] > limit[:, None])
        cand, row = np.nonzero(again)
        depth = np.tile(free.depth, c)
        rank_index = np.tile(free.rank_index, (c, 1))
        time_s = np.tile(free.time_s, c)
        utility = np.tile(free.utility, c)
        nbytes = np.tile(free.nbytes, c)
        participates = np.tile(free.participates, c)
        if cand.size:
            sim = self.run(deadlines[cand], row, cand)
            flat = cand * n_u + row
            depth[flat] = sim.depth
            rank_index[flat] = sim.rank_index
            time_s[flat] = sim.time_s
            utility[flat] = sim.utility
            nbytes[flat] = sim.nbytes
            participates[flat] = sim.participates
        return _Rows(
            depth=depth,
            rank_index=rank_index,
            time_s=time_s,
            utility=utility,
            nbytes=nbytes,
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
        for start in range(0, len(deadlines), per_batch):
            chunk = deadlines[start : start + per_batch]
            c = len(chunk)
            rows = self._rows_for(chunk)
            part = rows.participates.reshape(c, n_u)
            util = rows.utility.reshape(c, n_u) @ self.row_samples
            times = np.where(part, rows.time_s.reshape(c, n_u), 0.0).max(axis=1)
            ok = part.astype(np.float64) @ self.row_counts >= need
            if not opts.allow_dropping:
                ok &= part.all(axis=1)
            if self.server_bps is not None:
                # C7 against the real round time, the slowest participant's.
                total = rows.nbytes.reshape(c, n_u) @ self.row_counts
                ok &= total <= self.server_bps * times * (1 + 1e-7)
            utilities[start : start + c] = util
            round_times[start : start + c] = times
            valid[start : start + c] = ok
        return utilities, round_times, valid

    def configurations(self, deadline: float) -> tuple[tuple[Configuration, ...], _Rows]:
        """Every device's configuration (fleet order) under ``deadline``, and the row results."""
        n_u = len(self.unique_devices)
        rows = self._rows_for(np.asarray([deadline], dtype=np.float64))
        per_row: list[Configuration] = []
        for row in range(n_u):
            d = int(rows.depth[row])
            if d == 0:
                per_row.append(((), ()))
                continue
            layers = tuple(range(self.L - d, self.L))
            ranks = tuple(int(self.ranks[k]) for k in rows.rank_index[row, self.L - d :])
            per_row.append((layers, ranks))
        return tuple(per_row[row] for row in self.row_of_device), rows


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
        solver_version=_version(),
        mip_gap=None,
        objective_value=value,
        deadline_s=result.deadline_s if math.isfinite(result.deadline_s) else None,
    )
