r"""The configuration catalogue: the planner's one representation of what a device can do.

A *configuration* is a block of the top ``d`` layers with one rank per layer. Every cost of
the cost model (:mod:`legend.planner.costs`) is the same for every layer and affine in the
rank, so a configuration's costs depend only on its depth ``d`` and rank sum ``S``:

.. math::

    t_i(d, S) = a_i + b_i d + c_i S, \qquad
    m(d, S) = m_0 + m_1 d + m_2 S, \qquad
    B(d, S) = B_0 + B_1 S,

with per-device time coefficients ``a_i, b_i, c_i >= 0`` (compute and transfers on device
``i``) and device-independent memory ``m`` and bytes each way ``B``. Per ``(d, S)`` a dynamic
program over the layers finds the rank vector of highest utility per sample
``u(d, S) = max sum_l w_l g(r_l)`` (ranks non-decreasing toward the output under C4). The
*catalogue* keeps the configurations no other beats in depth, rank sum and utility at
once: since ``a, b, c``, ``m`` and ``B`` are non-negative, a configuration with no more
layers, no larger rank sum and no less utility is at least as good for every device under
every constraint of the program (with coverage C8 on, depth also counts toward coverage,
so configurations are only compared within the same covered depth ``min(d, D)``).

A device changes only which columns fit (memory ``m_j <= M_i``) and how long they take
(``t_ij``); :class:`FleetCosts` holds its coefficients as NumPy vectors, so evaluating a
fleet over the catalogue is a handful of array operations, chunked so that memory stays
linear in the fleet size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from legend.planner.errors import PlannerInputError
from legend.planner.types import Configuration, PlanningProblem

__all__ = [
    "CHUNK_CELLS",
    "Catalogue",
    "DeviceGroups",
    "FleetCosts",
    "build_catalogue",
    "complete_catalogue",
    "count_configurations",
    "device_configurations",
    "fleet_costs",
    "group_identical",
    "shared_costs",
]

# Devices x columns evaluated at once; bounds the working memory of fleet-wide passes
# (8 bytes x CHUNK_CELLS per array, a few arrays at a time).
CHUNK_CELLS = 2_000_000


@dataclass(frozen=True, kw_only=True)
class Catalogue:
    """The undominated configurations, one per (depth, rank sum), with their shared costs.

    ``ranks[j]`` lists the ranks of column ``j`` from its lowest layer to the output layer.
    ``memory_bytes`` and ``bytes_one_way`` are the same for every device.
    """

    depth: np.ndarray
    rank_sum: np.ndarray
    utility_per_sample: np.ndarray
    memory_bytes: np.ndarray
    bytes_one_way: np.ndarray
    ranks: tuple[tuple[int, ...], ...]
    num_layers: int

    def __len__(self) -> int:
        return len(self.ranks)

    def configuration(self, j: int) -> Configuration:
        """Column ``j`` as ``(layers ascending, ranks)``; ``j < 0`` is sitting out."""
        if j < 0:
            return (), ()
        d = int(self.depth[j])
        return tuple(range(self.num_layers - d, self.num_layers)), self.ranks[j]

    def by_depth(self) -> tuple[tuple[int, np.ndarray], ...]:
        """Per depth ``d`` the columns of that depth, sorted by rank sum.

        Within one depth a column of the catalogue has a larger rank sum only if it has
        a larger utility (otherwise a smaller one would dominate it), so along each of
        these lists time, memory, bytes and utility all increase.
        """
        out = []
        for d in np.unique(self.depth):
            cols = np.flatnonzero(self.depth == d)
            cols = cols[np.argsort(self.rank_sum[cols], kind="stable")]
            out.append((int(d), cols))
        return tuple(out)

    def covered(self, coverage_layers: int) -> np.ndarray:
        """``min(d, D)``: how many of the top ``D`` layers each column trains."""
        return np.minimum(self.depth, coverage_layers)


@dataclass(frozen=True, kw_only=True)
class FleetCosts:
    """Per-device coefficients of the affine cost model, as NumPy vectors (fleet order).

    Round time of device ``i`` in column ``j``:
    ``time_const[i] + time_per_layer[i] * d_j + time_per_rank[i] * S_j``; compute time the
    same with the ``compute_*`` vectors; transfer time
    ``bytes_one_way[j] * (down_s_per_byte[i] + up_s_per_byte[i])``.
    """

    time_const: np.ndarray
    time_per_layer: np.ndarray
    time_per_rank: np.ndarray
    compute_const: np.ndarray
    compute_per_layer: np.ndarray
    compute_per_rank: np.ndarray
    down_s_per_byte: np.ndarray
    up_s_per_byte: np.ndarray
    memory_capacity: np.ndarray
    samples: np.ndarray

    def __len__(self) -> int:
        return len(self.samples)

    def times(self, rows: slice | np.ndarray, cat: Catalogue) -> np.ndarray:
        """Round times ``t[i, j]`` of devices ``rows`` over every column (``len(rows) x P``)."""
        d = cat.depth.astype(float)
        s = cat.rank_sum.astype(float)
        return (
            self.time_const[rows, None]
            + self.time_per_layer[rows, None] * d[None, :]
            + self.time_per_rank[rows, None] * s[None, :]
        )

    def fits(self, rows: slice | np.ndarray, cat: Catalogue) -> np.ndarray:
        """Memory mask ``m_j <= M_i`` (C6) of devices ``rows`` over every column."""
        return cat.memory_bytes[None, :] <= self.memory_capacity[rows, None] * (1 + 1e-9)

    def chunks(self, num_columns: int) -> Iterator[slice]:
        """Slices of devices such that a chunk times ``num_columns`` stays small."""
        n = len(self)
        size = max(1, CHUNK_CELLS // max(num_columns, 1))
        for start in range(0, n, size):
            yield slice(start, min(start + size, n))


def _dp(problem: PlanningProblem) -> tuple[np.ndarray, ...]:
    """Best rank vector per (depth, rank sum) by dynamic programming over the layers.

    ``best[d][k, S]`` is the highest ``sum w_l g(r_l)`` of a configuration of depth ``d``
    whose bottom layer ``L-d`` has rank index ``k`` and ranks summing to ``S``. One layer
    down, the new bottom rank index ``k'`` must satisfy ``k' <= k`` under C4.
    """
    L = problem.spec.num_layers
    grid = np.asarray(problem.job.ranks, dtype=np.int64)
    K = len(grid)
    w = problem.layer_weights
    gain = np.asarray(problem.rank_gains, dtype=float)
    monotone = problem.options.monotone_ranks
    s_max = int(grid[-1]) * L
    best = np.full((K, s_max + 1), -np.inf)
    for k in range(K):
        best[k, grid[k]] = w[L - 1] * gain[k]
    tables = [best]
    backs: list[np.ndarray] = [np.full((K, s_max + 1), -1, dtype=np.int64)]
    for d in range(1, L):
        prev = tables[-1]
        if monotone:
            suf = prev.copy()
            arg = np.tile(np.arange(K)[:, None], (1, s_max + 1))
            for k in range(K - 2, -1, -1):
                better = suf[k + 1] > suf[k]
                suf[k] = np.where(better, suf[k + 1], suf[k])
                arg[k] = np.where(better, arg[k + 1], arg[k])
        else:
            suf = np.tile(prev.max(axis=0), (K, 1))
            arg = np.tile(prev.argmax(axis=0), (K, 1))
        new = np.full((K, s_max + 1), -np.inf)
        back = np.full((K, s_max + 1), -1, dtype=np.int64)
        weight = w[L - 1 - d]
        for k in range(K):
            r = int(grid[k])
            new[k, r:] = suf[k, : s_max + 1 - r] + weight * gain[k]
            back[k, r:] = arg[k, : s_max + 1 - r]
        tables.append(new)
        backs.append(back)
    return grid, np.asarray(tables), np.asarray(backs)


def build_catalogue(problem: PlanningProblem) -> Catalogue:
    """The catalogue of ``problem`` (see the module docstring)."""
    L = problem.spec.num_layers
    grid, tables, backs = _dp(problem)
    opts = problem.options
    coverage = opts.coverage_layers if opts.coverage_share > 0 and opts.coverage_layers > 0 else 0
    # best[d-1, S] over the bottom rank index, and which index attains it
    top = tables.max(axis=1)
    which = tables.argmax(axis=1)
    depths = np.arange(1, L + 1)
    usable = np.isfinite(top) & (depths[:, None] >= opts.min_depth)
    # Undominated in (depth min, rank sum min, utility max) within each covered depth.
    keep = np.zeros_like(usable)
    groups = (
        [depths]
        if coverage == 0
        else [
            depths[np.minimum(depths, coverage) == c]
            for c in np.unique(np.minimum(depths, coverage))
        ]
    )
    for ds in groups:
        rows = ds - 1
        u = np.where(usable[rows], top[rows], -np.inf)
        # best utility over configurations with depth <= d and rank sum <= S, strictly
        # smaller in at least one of the two
        pref = np.maximum.accumulate(np.maximum.accumulate(u, axis=0), axis=1)
        below = np.full_like(u, -np.inf)
        below[1:] = pref[:-1]
        left = np.full_like(u, -np.inf)
        left[:, 1:] = pref[:, :-1]
        beaten = np.maximum(below, left)
        tol = 1e-12 * np.maximum(1.0, np.abs(np.where(np.isfinite(u), u, 0.0)))
        keep[rows] = usable[rows] & (u > beaten + tol)
    d_idx, s_idx = np.nonzero(keep)
    vectors: list[tuple[int, ...]] = []
    for d0, s in zip(d_idx.tolist(), s_idx.tolist(), strict=True):
        k = int(which[d0, s])
        ranks_bottom_up = []
        ss = s
        for dd in range(d0, -1, -1):
            ranks_bottom_up.append(int(grid[k]))
            prev_k = int(backs[dd][k, ss])
            ss -= int(grid[k])
            k = prev_k
        vectors.append(tuple(ranks_bottom_up))
    depth = (d_idx + 1).astype(np.int64)
    rank_sum = s_idx.astype(np.int64)
    memory, nbytes = shared_costs(problem)
    d_f = depth.astype(float)
    s_f = rank_sum.astype(float)
    return Catalogue(
        depth=depth,
        rank_sum=rank_sum,
        utility_per_sample=top[d_idx, s_idx].astype(float),
        memory_bytes=memory[0] + memory[1] * d_f + memory[2] * s_f,
        bytes_one_way=nbytes[0] + nbytes[1] * s_f,
        ranks=tuple(vectors),
        num_layers=L,
    )


def device_configurations(
    num_layers: int, ranks: tuple[int, ...], *, min_depth: int = 1, monotone: bool = True
) -> list[Configuration]:
    """Every configuration of one device: top blocks of ``min_depth..num_layers`` layers,
    each layer at a rank of ``ranks`` (non-decreasing toward the output when ``monotone``).
    """
    out: list[Configuration] = []
    for depth in range(min_depth, num_layers + 1):
        layers = tuple(range(num_layers - depth, num_layers))
        combos = (
            itertools.combinations_with_replacement(ranks, depth)
            if monotone
            else itertools.product(ranks, repeat=depth)
        )
        for combo in combos:
            out.append((layers, tuple(combo)))
    return out


def count_configurations(
    num_layers: int, num_ranks: int, *, min_depth: int = 1, monotone: bool = True
) -> int:
    """How many configurations :func:`device_configurations` lists, without listing them."""
    if monotone:
        return sum(
            math.comb(d + num_ranks - 1, num_ranks - 1) for d in range(min_depth, num_layers + 1)
        )
    return sum(num_ranks**d for d in range(min_depth, num_layers + 1))


# At most this many configurations make a complete catalogue (complete_catalogue).
MAX_COMPLETE = 20_000


def complete_catalogue(problem: PlanningProblem) -> Catalogue | None:
    """Every configuration (top blocks of ``min_depth..L`` layers, ranks of the grid,
    non-decreasing toward the output under C4) as a catalogue, or ``None`` when there are
    more than :data:`MAX_COMPLETE`.

    The catalogue of :func:`build_catalogue` keeps one rank vector per (depth, rank sum),
    the best for the additive utility, which is exact for programs whose value is a sum over
    devices. Under the saturating progress model (:mod:`legend.planner.saturation`) a
    vector that covers another layer's slots can be worth more than the additively best
    one, so its MILP plans over every configuration where they are few (MiniLM with ranks
    2-16: 209). Its columns are not sorted for :meth:`Catalogue.by_depth`'s guarantee.
    """
    L = problem.spec.num_layers
    opts = problem.options
    grid = tuple(int(r) for r in problem.job.ranks)
    shape = {"min_depth": opts.min_depth, "monotone": opts.monotone_ranks}
    if count_configurations(L, len(grid), **shape) > MAX_COMPLETE:
        return None
    vectors = [ranks for _, ranks in device_configurations(L, grid, **shape)]
    w = problem.layer_weights
    gain = problem.gain_of()
    depth = np.asarray([len(v) for v in vectors], dtype=np.int64)
    rank_sum = np.asarray([sum(v) for v in vectors], dtype=np.int64)
    utility = np.asarray(
        [sum(w[L - len(v) + k] * gain[r] for k, r in enumerate(v)) for v in vectors], dtype=float
    )
    memory, nbytes = shared_costs(problem)
    d_f, s_f = depth.astype(float), rank_sum.astype(float)
    return Catalogue(
        depth=depth,
        rank_sum=rank_sum,
        utility_per_sample=utility,
        memory_bytes=memory[0] + memory[1] * d_f + memory[2] * s_f,
        bytes_one_way=nbytes[0] + nbytes[1] * s_f,
        ranks=tuple(vectors),
        num_layers=L,
    )


def _affine(
    coef: tuple[tuple[float, ...], ...], ranks: tuple[int, ...], what: str
) -> tuple[float, float]:
    """``(alpha, beta)`` with ``coef[l][k] == alpha + beta * ranks[k]`` for every layer."""
    table = np.asarray(coef, dtype=float)
    first = table[0]
    scale = max(1.0, float(np.abs(table).max()))
    r = np.asarray(ranks, dtype=float)
    # one rank: depth and rank sum move together, so attribute it all to the rank
    beta = float(first[0] / r[0]) if len(r) == 1 else float((first[-1] - first[0]) / (r[-1] - r[0]))
    alpha = float(first[0] - beta * r[0])
    if not (
        np.allclose(table, first[None, :], rtol=1e-9, atol=1e-12 * scale)
        and np.allclose(alpha + beta * r, first, rtol=1e-9, atol=1e-12 * scale)
    ):
        raise PlannerInputError(
            f"the cost model's {what} is not the same for every layer and affine in the rank; "
            "the planner's catalogue needs that structure"
        )
    return alpha, beta


def shared_costs(
    problem: PlanningProblem,
) -> tuple[tuple[float, float, float], tuple[float, float]]:
    """Device-independent memory ``(m0, m1, m2)`` and bytes ``(B0, B1)`` coefficients."""
    table = problem.costs.table(problem.fleet.devices[0])
    ranks = problem.job.ranks
    m1, m2 = _affine(table.memory_coef_bytes, ranks, "memory")
    b1, b2 = _affine(table.bytes_coef, ranks, "byte count")
    if abs(b1) > 1e-9 * max(1.0, abs(b2)):
        raise PlannerInputError("the cost model's bytes must be proportional to the rank")
    return (table.memory_const_bytes, m1, m2), (table.bytes_const, b2)


def setup_seconds(problem: PlanningProblem) -> np.ndarray:
    """Per device, the seconds it spends before its local steps (``CostModel.setup_s``)."""
    devices = problem.fleet.devices
    return np.fromiter((problem.costs.setup_s(d) for d in devices), float, len(devices))


def fleet_costs(problem: PlanningProblem) -> FleetCosts:
    """:class:`FleetCosts` of the problem's fleet, checked against the cost model."""
    devices = problem.fleet.devices
    job = problem.job
    tflops = np.fromiter((d.tflops for d in devices), float, len(devices))
    up = np.fromiter((d.uplink_mbps for d in devices), float, len(devices))
    down = np.fromiter((d.downlink_mbps for d in devices), float, len(devices))
    steps = np.fromiter((job.steps_for(d) for d in devices), float, len(devices))
    memory = np.fromiter((d.memory_gb for d in devices), float, len(devices)) * 1e9
    samples = np.fromiter((d.num_samples for d in devices), float, len(devices))
    down_spb = 8.0 / (down * 1e6)
    up_spb = 8.0 / (up * 1e6)
    c_const, c_layer, c_rank = problem.costs.compute_coefficients(steps / (tflops * 1e12))
    c_const = c_const + setup_seconds(problem)
    _memory, (b0, b1) = shared_costs(problem)
    link = down_spb + up_spb
    fc = FleetCosts(
        time_const=c_const + b0 * link,
        time_per_layer=c_layer,
        time_per_rank=c_rank + b1 * link,
        compute_const=c_const,
        compute_per_layer=c_layer,
        compute_per_rank=c_rank,
        down_s_per_byte=down_spb,
        up_s_per_byte=up_spb,
        memory_capacity=memory,
        samples=samples,
    )
    _check_against_table(problem, fc)
    return fc


def _check_against_table(problem: PlanningProblem, fc: FleetCosts) -> None:
    """The vectorised coefficients must reproduce the cost model (two devices, two
    configurations each): a cost model without the affine structure is refused."""
    L = problem.spec.num_layers
    ranks = problem.job.ranks
    probes = ((1, ranks[0]), (L, ranks[-1]))
    for i in {0, len(fc) - 1}:
        device = problem.fleet.devices[i]
        for d, r in probes:
            want = problem.costs.evaluate(device, tuple(range(L - d, L)), (r,) * d).time_s
            got = fc.time_const[i] + fc.time_per_layer[i] * d + fc.time_per_rank[i] * r * d
            if not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15):
                raise PlannerInputError(
                    f"the cost model's time of device {device.device_id!r} ({want:.6g} s at "
                    f"depth {d}, rank {r}) is not affine in depth and rank sum ({got:.6g} s); "
                    "the planner's catalogue needs that structure"
                )


@dataclass(frozen=True, kw_only=True)
class DeviceGroups:
    """Devices with identical profiles (every field the program reads), in fleet order.

    ``members[g]`` are the fleet indices of group ``g``; ``first[g]`` its first member.
    """

    first: np.ndarray
    inverse: np.ndarray
    members: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.first)


def group_identical(problem: PlanningProblem, route_key: np.ndarray | None = None) -> DeviceGroups:
    """Group devices whose tflops, memory, links, local steps, samples, setup time (and route
    over the topology's congested links, ``route_key``) are equal; groups ordered by first
    member."""
    devices = problem.fleet.devices
    n = len(devices)
    job = problem.job
    cols = [
        np.fromiter((d.tflops for d in devices), float, n),
        np.fromiter((d.memory_gb for d in devices), float, n),
        np.fromiter((d.uplink_mbps for d in devices), float, n),
        np.fromiter((d.downlink_mbps for d in devices), float, n),
        np.fromiter((job.steps_for(d) for d in devices), float, n),
        np.fromiter((d.num_samples for d in devices), float, n),
        setup_seconds(problem),
    ]
    if route_key is not None:
        cols.append(route_key.astype(float))
    keys = np.stack(cols, axis=1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    inverse = rank[inverse]
    first = first[order]
    sorted_idx = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[sorted_idx], np.arange(len(first) + 1))
    members = tuple(sorted_idx[bounds[g] : bounds[g + 1]] for g in range(len(first)))
    return DeviceGroups(
        first=first.astype(np.int64), inverse=inverse.astype(np.int64), members=members
    )
