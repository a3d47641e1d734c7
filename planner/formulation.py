r"""The planning program as a multiple-choice MILP over catalogue columns.

:func:`formulate` builds backend-neutral data (a :class:`MILP`: variables with bounds and
integrality, named sparse rows, an objective, and an index from every variable to its
meaning); a backend in :mod:`legend.planner.solvers` only translates it; :func:`decode`
maps a solution back to one configuration per device.

The program
-----------
Units ``g`` are devices, or groups of ``N_g`` devices with identical profiles
(:func:`~legend.planner.catalog.group_identical`). Unit ``g`` may use the columns ``j`` of
the catalogue (:mod:`legend.planner.catalog`) that fit its memory (C6) and, under a fixed
deadline, finish within it (C5); every column already satisfies C1-C4 (one rank per layer,
a contiguous top block, minimum depth, ranks non-decreasing toward the output). With
dropping allowed, unit ``g`` also has a column *out* (no layers, no cost). A column ``j``
of unit ``g`` has round time ``t_gj``, compute time ``c_gj``, bytes each way ``B_j``, depth
``d_j`` and utility ``n_g u_j`` per member. Variables:

- ``m[g,j]`` in ``{0..N_g}``: how many members of ``g`` take column ``j``;
- ``T >= 0`` the round time (a constant ``T = deadline_s`` under O1, otherwise a variable);
- ``v[g,j]`` binary, column ``j`` used by ``g`` (only for units with ``N_g > 1`` and
  ``T`` a variable, where a count cannot carry the time of the slowest member);
- ``L_e >= 0`` per congested link ``e`` of a topology: the round's bytes through ``e`` at
  its capacity, in seconds.

Rows (names as in the code)::

    C3[g]       sum_j m[g,j] = N_g                                   choose one column each
    C5[g]       sum_j t_gj m[g,j] - T <= 0          (N_g = 1)        round time
    C5[g,j]     t_gj v[g,j] - T <= 0                (N_g > 1)
    C5v[g,j]    m[g,j] - N_g v[g,j] <= 0            (N_g > 1)
    C5avg[g]    sum_j t_gj m[g,j] / N_g - T <= 0    (N_g > 1, a valid cut)
    C7          sum_gj 2 B_j m[g,j] - s T <= 0                       server link, s bytes/s
    C8[r]       sum_gj n_g ([d_j >= r] - q [j not out]) m[g,j] >= 0  coverage, r = 2..D
    C9          sum_{g, j not out} m[g,j] >= P_min                   participants
    C9s         sum_{g, j not out} n_g m[g,j] >= s_min sum_i n_i     participating samples
    C10b[e]     sum_{g on e, j} k_e B_j m[g,j] - L_e = 0             congested link e
    C10[e,g]    L_e + sum_j o_egj m[g,j] - T <= 0   (N_g = 1)        contention on e
    C10[e,g,j]  L_e + o_egj v[g,j] - T <= 0         (N_g > 1)
    C10avg[e,g] L_e + sum_j o_egj m[g,j] / N_g - T <= 0  (N_g > 1, a valid cut)
    C10u[e,s]   theta_s w[e,s] + L_e + s_e sum_gj rem_gj(theta_s) m[g,j] - T <= 0  staggered
    C10w[e,s,g] sum_{j: rem_gj(theta_s) > 0} m[g,j] / N_g - w[e,s] <= 0      uploads
    UF          sum_gj n_g u_j m[g,j] >= U_floor                     utility floor (O2)
    SAT[l,k]    sum_s z[lk,s] - sum_gj (n_g / n_bar) a_jlk m[g,j] <= 0  saturating progress

Under the saturating progress model (:mod:`legend.planner.saturation`; ``progress`` with a
coverage response) the utility is ``n_bar sum_lk G_lk sum_s a_s z[lk,s]`` over segment
variables ``0 <= z[lk,s] <= w_s`` instead of ``sum_gj n_g u_j m[g,j]`` (``a_jlk`` = 1 when
column ``j`` trains slot group ``k`` of layer ``l``, ``a_s`` the falling slopes of ``H``).

Under the ``"together"`` contention model (the default; :mod:`legend.planner.topology`)
``k_e`` is the seconds per byte of ``e`` summed over its congested directions and ``o_egj``
the unit's compute time plus its own transfer in the directions where ``e`` is not
congested. Under
``"staggered"`` ``k_e`` counts the downloads only, rows C10 exist where ``e``
is congested downstream with ``o_egj`` the compute time plus the device's own upload, and
where ``e`` is congested upstream the rows C10u bound the uploads, released at ``L_e +
c_gj`` (own download instead of ``L_e`` without downstream congestion), at times
``theta_s`` (``rem_gj(theta)`` the bytes a device surely still has to send then;
``s_e`` the link's seconds per byte up). The rows are a relaxation at those times; the
solve adds the row at a solution's own peak until the rows hold its exact round time
(:func:`staggered_cuts`; docs/topology.md). Coverage of the output layer (``r = 1``) holds for every
participant and needs no row. Under C7 the round lasts as long as the slower of the
slowest participant and the server link: ``T >= 2 B / s``.

Objectives: O1 ``deadline``: ``max U``; O2 ``min-time``: ``min T`` subject to UF; O3
``rate``: ``max U / T`` by Dinkelbach iterations over :meth:`MILP.with_rate`
(``max U - lambda T``). Rows in bytes are written in MB and the utility is divided by the
mean sample count (``utility_scale``), so that rows and objective have moderate magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from legend.planner.catalog import (
    CHUNK_CELLS,
    Catalogue,
    DeviceGroups,
    FleetCosts,
    group_identical,
)
from legend.planner.errors import PlannerInputError
from legend.planner.plan import Plan
from legend.planner.saturation import column_slots, slot_gains
from legend.planner.topology import remaining_bytes, staggered_upload_s
from legend.planner.types import Configuration, PlanningProblem

__all__ = [
    "MILP",
    "Units",
    "VarKey",
    "columns_of",
    "congested_links",
    "decode",
    "denominator_of",
    "encode",
    "formulate",
    "round_time_of",
    "staggered_cuts",
]

MB = 1e6
OUT = -1  # the column "sitting out"


class VarKey(NamedTuple):
    """What a variable means: ``kind`` is ``"m"`` (``owner`` = unit, ``a`` = catalogue
    column or -1 for out: a count), ``"v"`` (unit, column: used), ``"T"`` (round time) or
    ``"L"`` (``owner`` = link: its bytes at its capacity, in seconds) or ``"z"`` (``owner``
    = slot ``l * K + k``, ``a`` = segment of the coverage response)."""

    kind: str
    owner: int = -1
    a: int = -1


@dataclass(frozen=True, kw_only=True)
class CongestedLink:
    """A link of the topology that needs rows: its index, seconds per byte over its
    congested directions, which directions are congested, and the fleet indices on it."""

    link: int
    s_per_byte: float
    up: bool
    down: bool
    devices: np.ndarray
    up_bytes_per_s: float = math.inf
    down_s_per_byte: float = 0.0
    contention: str = "together"


def congested_links(problem: PlanningProblem) -> tuple[CongestedLink, ...]:
    """The topology's congested links (empty without a topology)."""
    topo = problem.topology
    if topo is None:
        return ()
    pos = {d: i for i, d in enumerate(problem.fleet.device_ids)}
    on: dict[int, list[int]] = {}
    for device_id, route in topo.routes.items():
        if device_id in pos:
            for e in route:
                on.setdefault(e, []).append(pos[device_id])
    devices = problem.fleet.devices
    out = []
    for e, idx in sorted(on.items()):
        link = topo.links[e]
        up = sum(devices[i].uplink_mbps for i in idx) > link.up_mbps * (1 + 1e-12)
        down = sum(devices[i].downlink_mbps for i in idx) > link.down_mbps * (1 + 1e-12)
        if up or down:
            k = (8 / (link.up_mbps * MB) if up else 0.0) + (
                8 / (link.down_mbps * MB) if down else 0.0
            )
            out.append(
                CongestedLink(
                    link=e,
                    s_per_byte=k,
                    up=up,
                    down=down,
                    devices=np.asarray(sorted(idx)),
                    up_bytes_per_s=link.up_mbps * MB / 8,
                    down_s_per_byte=8 / (link.down_mbps * MB) if down else 0.0,
                    contention=topo.contention,
                )
            )
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Units:
    """The program's units and their columns (flattened; ``start[g]:start[g+1]``)."""

    groups: DeviceGroups
    start: np.ndarray
    column: np.ndarray  # catalogue index per program column (OUT: sitting out)
    time_s: np.ndarray
    utility: np.ndarray  # per member, in utility units (samples x utility per sample)

    def __len__(self) -> int:
        return len(self.groups)

    def size(self, g: int) -> int:
        return len(self.groups.members[g])


@dataclass(frozen=True, kw_only=True)
class StaggeredUploads:
    """The uploads through one link congested upstream under the ``"staggered"`` model:
    per program column ``ids`` its release after ``L_e`` (``l_var``, the downloads' time;
    ``-1`` when the link is not congested downstream and releases are absolute), bytes
    and rate, for the exact round time of a solution (:func:`round_time_of`)."""

    link: int
    ids: np.ndarray
    release_s: np.ndarray
    nbytes: np.ndarray
    rate: np.ndarray
    s_per_byte: float
    l_var: int
    anchor: np.ndarray  # per entry: m (a unit of one device) or v (several): column used
    unit: np.ndarray  # per entry: its unit
    unit_size: np.ndarray  # per entry: its unit's number of members
    theta: np.ndarray  # the times of the rows C10u
    w_ids: np.ndarray  # per theta: the variable w (somebody still uploads at theta)

    def rem(self, theta: float) -> np.ndarray:
        """Per entry the bytes its device surely still has to send at ``theta``."""
        return remaining_bytes(theta, self.release_s, self.nbytes, self.rate)

    def row(self, theta: float, t_id: int, lead: int) -> tuple[np.ndarray, np.ndarray]:
        """Columns and coefficients of ``theta * x[lead] + L_e + s_e sum_gj rem_gj(theta)
        m[g,j] - T <= 0`` (``x[lead]`` is 1 when somebody still uploads at ``theta``)."""
        rem = self.rem(theta) * self.s_per_byte
        keep = rem > 0
        extra = [lead, self.l_var, t_id] if self.l_var >= 0 else [lead, t_id]
        extra_vals = [theta, 1.0, -1.0] if self.l_var >= 0 else [theta, -1.0]
        return (
            np.concatenate([self.ids[keep], extra]).astype(np.int64),
            np.concatenate([rem[keep], extra_vals]),
        )


#: Above this many breakpoints a link's staggered rows use this many quantiles of them.
MAX_THETA_ROWS = 4


@dataclass(frozen=True, kw_only=True)
class MILP:
    """A mixed-integer linear program ``opt c'v s.t. row_lower <= A v <= row_upper``.

    Attributes
    ----------
    var_names, index
        One name and one :class:`VarKey` per variable.
    lower, upper, integer
        Variable bounds and integrality.
    matrix, row_names, row_lower, row_upper
        The rows (CSR), named after the constraints.
    objective, sense
        Objective coefficients and ``"max"`` or ``"min"``.
    utility, utility_scale
        Coefficients of the (scaled) utility ``U / utility_scale``.
    round_time
        Index of the variable ``T``, or ``None`` when the deadline is a constant.
    deadline_s
        The constant deadline, if any.
    time_lower_bound_s
        A proven lower bound on the round time of any plan with a participant.
    start
        Warm-start values, or ``None``.
    units
        The units and columns (for :func:`decode`).
    """

    var_names: tuple[str, ...]
    index: tuple[VarKey, ...]
    lower: np.ndarray
    upper: np.ndarray
    integer: np.ndarray
    matrix: sp.csr_matrix
    row_names: tuple[str, ...]
    row_lower: np.ndarray
    row_upper: np.ndarray
    objective: np.ndarray
    sense: str
    utility: np.ndarray
    utility_scale: float
    round_time: int | None
    deadline_s: float | None
    time_lower_bound_s: float
    start: np.ndarray | None
    units: Units
    catalogue: Catalogue
    server_bytes_per_s: float | None = None
    price_s: np.ndarray | None = None
    overhead_s: float = 0.0
    staggered: tuple[StaggeredUploads, ...] = ()

    @property
    def num_vars(self) -> int:
        return len(self.var_names)

    def with_rate(self, lam: float) -> MILP:
        """The Dinkelbach subproblem ``max U - lam * (T + price' v)`` (scaled units; needs
        ``T``); the constant overhead does not change the maximiser."""
        if self.round_time is None:
            raise PlannerInputError("the rate objective needs a program with a variable T")
        c = self.utility.copy()
        c[self.round_time] -= lam
        if self.price_s is not None:
            c -= lam * self.price_s
        return replace(self, objective=c, sense="max")

    def utility_value(self, values: np.ndarray) -> float:
        """The utility ``U`` of a solution, in the utility's own units."""
        return float(self.utility @ values) * self.utility_scale

    def rows_named(self, prefix: str) -> list[int]:
        """Indices of rows whose name is ``prefix`` or starts with ``prefix + '['``."""
        return [
            j for j, n in enumerate(self.row_names) if n == prefix or n.startswith(prefix + "[")
        ]


class _Rows:
    """Accumulates rows as COO triples."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.names: list[str] = []

    def add(
        self, name: str, cols: np.ndarray, vals: np.ndarray, lower: float, upper: float
    ) -> None:
        r = len(self.names)
        self.rows.append(np.full(len(cols), r, dtype=np.int64))
        self.cols.append(np.asarray(cols, dtype=np.int64))
        self.vals.append(np.asarray(vals, dtype=float))
        self.lower.append(lower)
        self.upper.append(upper)
        self.names.append(name)

    def matrix(self, num_vars: int) -> sp.csr_matrix:
        if not self.names:
            return sp.csr_matrix((0, num_vars))
        m = sp.coo_matrix(
            (np.concatenate(self.vals), (np.concatenate(self.rows), np.concatenate(self.cols))),
            shape=(len(self.names), num_vars),
        ).tocsr()
        m.sum_duplicates()
        return m


def use_classes(problem: PlanningProblem, groups: DeviceGroups) -> bool:
    """``options.use_classes``, or automatic: compress when profiles repeat."""
    choice = problem.options.use_classes
    if choice is not None:
        return bool(choice)
    return len(groups) < len(problem.fleet)


def _units(
    problem: PlanningProblem,
    cat: Catalogue,
    fc: FleetCosts,
    links: Sequence[CongestedLink],
    *,
    time_cap_s: float,
    extra_dims: bool,
) -> Units:
    n = len(problem.fleet)
    route_key = None
    if links:
        # devices on different congested links must not share a unit
        route_key = np.zeros(n)
        for k, cl in enumerate(links):
            route_key[cl.devices] += (k + 1) * 1.0e3 ** (k % 5)
    grouped = group_identical(problem, route_key)
    if not use_classes(problem, grouped):
        idx = np.arange(n, dtype=np.int64)
        grouped = DeviceGroups(
            first=idx, inverse=idx, members=tuple(idx[i : i + 1] for i in range(n))
        )
    first = grouped.first
    u = cat.utility_per_sample
    starts = [0]
    cols: list[np.ndarray] = []
    times: list[np.ndarray] = []
    utils: list[np.ndarray] = []
    dropping = problem.options.allow_dropping
    limit = time_cap_s * (1 + 1e-9)
    step = max(1, CHUNK_CELLS // max(len(cat), 1))
    for chunk_start in range(0, len(first), step):
        rows = first[chunk_start : chunk_start + step]
        t = fc.times(rows, cat)
        ok = fc.fits(rows, cat) & (t <= limit)
        for r in range(len(rows)):
            idx = np.flatnonzero(ok[r])
            if not extra_dims and len(idx) > 1:
                # undominated in (time min, utility max): nothing else couples this unit
                order = idx[np.lexsort((-u[idx], t[r, idx]))]
                best = np.maximum.accumulate(u[order])
                prev = np.concatenate(([-np.inf], best[:-1]))
                idx = np.sort(order[u[order] > prev])
            n_g = fc.samples[rows[r]]
            if dropping:
                cols.append(np.append(idx, OUT))
                times.append(np.append(t[r, idx], 0.0))
                utils.append(np.append(n_g * u[idx], 0.0))
            else:
                cols.append(idx)
                times.append(t[r, idx])
                utils.append(n_g * u[idx])
            starts.append(starts[-1] + len(cols[-1]))
    return Units(
        groups=grouped,
        start=np.asarray(starts, dtype=np.int64),
        column=np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64),
        time_s=np.concatenate(times) if times else np.zeros(0),
        utility=np.concatenate(utils) if utils else np.zeros(0),
    )


def formulate(
    problem: PlanningProblem,
    cat: Catalogue,
    fc: FleetCosts,
    deadline_s: float | None = None,
    *,
    utility_floor: float | None = None,
    time_cap_s: float | None = None,
    start: Sequence[int] | np.ndarray | None = None,
) -> MILP:
    """Build the program for ``problem`` (see the module docstring).

    Parameters
    ----------
    deadline_s
        A constant round time (O1: ``max U``); ``None`` makes ``T`` a variable.
    utility_floor
        With ``deadline_s=None``: add UF and minimise ``T`` (O2). Otherwise the objective is
        ``max U`` (use :meth:`MILP.with_rate` for O3).
    time_cap_s
        With ``T`` a variable: a proven upper bound on the optimal round time; columns
        slower than it are left out.
    start
        Per device a catalogue column (``-1``: out) to warm-start from.
    """
    if utility_floor is not None and deadline_s is not None:
        raise PlannerInputError("give either `deadline_s` (O1) or `utility_floor` (O2), not both")
    opts = problem.options
    L = problem.spec.num_layers
    links = congested_links(problem)
    coverage = min(opts.coverage_layers, L) if opts.coverage_share > 0 else 0
    link_rows = opts.server_mbps is not None or bool(links)
    cap = (
        deadline_s
        if deadline_s is not None
        else (time_cap_s if time_cap_s is not None else math.inf)
    )
    # under progress a column's bytes matter too: no pruning by time and utility alone
    priced = opts.objective == "progress" and opts.price_per_mb > 0
    curve = problem.saturation
    units = _units(
        problem,
        cat,
        fc,
        links,
        time_cap_s=cap,
        extra_dims=link_rows or coverage > 1 or priced or curve is not None,
    )
    G = len(units)
    # shared links need T as a variable (at most the deadline under O1)
    has_t = deadline_s is None or bool(links)
    col = units.column
    C = len(col)
    sizes = np.asarray([units.size(g) for g in range(G)], dtype=float)
    unit_of = np.repeat(np.arange(G), np.diff(units.start))
    multi = sizes[unit_of] > 1
    need_v = has_t & multi
    v_cols = np.flatnonzero(need_v)
    samples = fc.samples
    scale = float(samples.mean())
    part = col != OUT
    depth = np.where(part, cat.depth[np.maximum(col, 0)], 0)
    nbytes_mb = np.where(part, cat.bytes_one_way[np.maximum(col, 0)], 0.0) / MB

    # saturating progress: per rank slot of a layer q, segments s of H (z[q, s])
    if curve is not None:
        slot_cols = column_slots(cat.ranks, L, problem.job.ranks)
        gains = slot_gains(problem.layer_weights, problem.rank_gains).ravel()
        slots = np.flatnonzero((gains > 0) & (slot_cols.sum(axis=0) > 0))
        n_seg = len(curve.widths)
    else:
        slot_cols, gains, slots, n_seg = np.zeros((len(cat), 0)), np.zeros(0), np.zeros(0, int), 0

    # variables: m (C), v (len(v_cols)), T, L_e, z
    n_m = C
    v_id = n_m + np.arange(len(v_cols))
    t_id = n_m + len(v_cols) if has_t else -1
    l_id = n_m + len(v_cols) + (1 if has_t else 0) + np.arange(len(links))
    z_base = n_m + len(v_cols) + (1 if has_t else 0) + len(links)
    z_id = z_base + np.arange(len(slots) * n_seg).reshape(len(slots), n_seg)
    v_of = np.full(C, -1, dtype=np.int64)
    v_of[v_cols] = v_id
    # w: per staggered link and row time, whether somebody still uploads then
    w_base = z_base + len(slots) * n_seg
    staggered = _staggered_uploads(cat, fc, units, links, l_id, v_of, w_base)
    n_w = sum(len(up.theta) for up in staggered)
    num_vars = w_base + n_w

    first_times = [units.time_s[units.start[g] : units.start[g + 1]] for g in range(G)]
    mins = [float(ft[ft > 0].min()) if (ft > 0).any() else math.inf for ft in first_times]
    finite = [m for m in mins if math.isfinite(m)]
    if opts.allow_dropping:  # noqa: SIM108
        t_lb = min(finite) if finite else 0.0
    else:
        t_lb = max(mins) if mins else 0.0
    t_ub = float(units.time_s.max()) * 1.01 + 1.0 if C else 1.0
    if time_cap_s is not None and math.isfinite(time_cap_s):
        t_ub = max(t_lb, time_cap_s)
    if opts.server_mbps is not None or links:
        # transfers through a shared link can make the round longer than any device
        t_ub = max(t_ub, _link_time_bound(problem, cat, fc, units, links))
    if deadline_s is not None:
        t_ub = deadline_s

    lower = np.zeros(num_vars)
    upper = np.concatenate(
        [
            sizes[unit_of],
            np.ones(len(v_cols)),
            [t_ub] if has_t else [],
            np.full(len(links), np.inf),
            np.tile(curve.widths, len(slots)) if curve is not None else [],
            np.ones(n_w),
        ]
    )
    integer = np.concatenate(
        [
            np.ones(C, dtype=bool),
            np.ones(len(v_cols), dtype=bool),
            [False] if has_t else [],
            np.zeros(len(links), dtype=bool),
            np.zeros(len(slots) * n_seg, dtype=bool),
            np.zeros(n_w, dtype=bool),
        ]
    ).astype(bool)
    if has_t:
        lower[t_id] = min(t_lb, t_ub) if math.isfinite(t_lb) else 0.0

    rows = _Rows()
    for g in range(G):
        sl = slice(units.start[g], units.start[g + 1])
        ids = np.arange(sl.start, sl.stop)
        rows.add(f"C3[{g}]", ids, np.ones(len(ids)), sizes[g], sizes[g])
        if not has_t:
            continue
        if sizes[g] == 1:
            tv = units.time_s[sl]
            slow = tv > t_lb * (1 + 1e-12)
            if slow.any():
                rows.add(
                    f"C5[{g}]", np.append(ids[slow], t_id), np.append(tv[slow], -1.0), -np.inf, 0.0
                )
        else:
            # valid cut: the members' mean time is at most T (each used column is)
            rows.add(
                f"C5avg[{g}]",
                np.append(ids, t_id),
                np.append(units.time_s[sl] / sizes[g], -1.0),
                -np.inf,
                0.0,
            )
            for c in ids:
                if units.time_s[c] > t_lb * (1 + 1e-12):
                    rows.add(
                        f"C5[{g},{col[c]}]",
                        np.asarray([v_of[c], t_id]),
                        np.asarray([units.time_s[c], -1.0]),
                        -np.inf,
                        0.0,
                    )
                rows.add(
                    f"C5v[{g},{col[c]}]",
                    np.asarray([c, v_of[c]]),
                    np.asarray([1.0, -sizes[g]]),
                    -np.inf,
                    0.0,
                )
    if opts.server_mbps is not None:
        s_mb = opts.server_mbps / 8.0  # MB per second
        if has_t:
            rows.add(
                "C7", np.append(np.arange(C), t_id), np.append(2.0 * nbytes_mb, -s_mb), -np.inf, 0.0
            )
        else:
            assert deadline_s is not None
            rows.add("C7", np.arange(C), 2.0 * nbytes_mb, -np.inf, s_mb * deadline_s)
    if coverage > 1:
        q = opts.coverage_share
        n_unit = samples[units.groups.first][unit_of] / scale
        for r in range(2, coverage + 1):
            coef = n_unit * ((depth >= r).astype(float) - q * part)
            rows.add(f"C8[{L - r}]", np.arange(C), coef, 0.0, np.inf)
    if opts.allow_dropping and opts.min_participants > 0:
        ids = np.flatnonzero(part)
        rows.add("C9", ids, np.ones(len(ids)), float(opts.min_participants), np.inf)
    if opts.allow_dropping and opts.min_sample_share > 0:
        # C9s: the participants' samples (scaled like C8) reach the share of all samples
        ids = np.flatnonzero(part)
        n_unit = samples[units.groups.first][unit_of] / scale
        need = opts.min_sample_share * float(samples.sum()) / scale
        rows.add("C9s", ids, n_unit[ids], need * (1 - 1e-9), np.inf)
    if links:
        if not has_t:
            raise PlannerInputError("internal: shared-link rows need T as a variable")
        _link_rows(
            rows, problem, cat, fc, units, links, unit_of, v_of, t_id, l_id, nbytes_mb, staggered
        )

    if curve is not None:
        # SAT[q]: the segments of slot q hold at most its coverage in mean-sized devices
        n_unit = samples[units.groups.first][unit_of] / scale
        use = np.where(part[:, None], slot_cols[np.maximum(col, 0)], 0.0)
        K = len(problem.job.ranks)
        for i, q in enumerate(slots):
            ids = np.flatnonzero(use[:, q] > 0)
            rows.add(
                f"SAT[{q // K},{q % K}]",
                np.concatenate([z_id[i], ids]),
                np.concatenate([np.ones(n_seg), -n_unit[ids]]),
                -np.inf,
                0.0,
            )

    util = np.zeros(num_vars)
    if curve is None:
        util[:C] = units.utility / scale
    else:
        util[z_id] = gains[slots][:, None] * curve.slopes[None, :]
    price_s = None
    if opts.objective == "progress":
        # seconds the bytes of each device-column are worth (both ways)
        price_s = np.zeros(num_vars)
        price_s[:C] = opts.price_per_mb * 2.0 * nbytes_mb * MB / 1e6
    if utility_floor is not None:
        rows.add("UF", np.arange(C), util[:C], utility_floor / scale, np.inf)
        objective = np.zeros(num_vars)
        objective[t_id] = 1.0
        sense = "min"
    else:
        objective = util.copy()
        sense = "max"

    names: list[str] = []
    index: list[VarKey] = []
    for c in range(C):
        g = int(unit_of[c])
        names.append(f"m[{g},{col[c]}]")
        index.append(VarKey("m", g, int(col[c])))
    for c in v_cols:
        g = int(unit_of[c])
        names.append(f"v[{g},{col[c]}]")
        index.append(VarKey("v", g, int(col[c])))
    if has_t:
        names.append("T")
        index.append(VarKey("T"))
    for cl in links:
        names.append(f"L[{cl.link}]")
        index.append(VarKey("L", cl.link))
    for q in slots:
        for k in range(n_seg):
            names.append(f"z[{q},{k}]")
            index.append(VarKey("z", int(q), k))
    for up in staggered:
        for k in range(len(up.theta)):
            names.append(f"w[{up.link},{k}]")
            index.append(VarKey("w", up.link, k))

    milp = MILP(
        var_names=tuple(names),
        index=tuple(index),
        lower=lower,
        upper=upper,
        integer=integer,
        matrix=rows.matrix(num_vars),
        row_names=tuple(rows.names),
        row_lower=np.asarray(rows.lower, dtype=float),
        row_upper=np.asarray(rows.upper, dtype=float),
        objective=objective,
        sense=sense,
        utility=util,
        utility_scale=scale,
        round_time=t_id if has_t else None,
        deadline_s=deadline_s,
        time_lower_bound_s=t_lb if math.isfinite(t_lb) else 0.0,
        start=None,
        units=units,
        catalogue=cat,
        server_bytes_per_s=None if opts.server_mbps is None else opts.server_mbps * MB / 8,
        price_s=price_s,
        overhead_s=opts.server_overhead_s if opts.objective == "progress" else 0.0,
        staggered=staggered,
    )
    if start is None and problem.warm_start is not None:
        start = columns_of(cat, problem, problem.warm_start)
    if start is not None:
        values = encode(milp, problem, fc, np.asarray(start, dtype=np.int64), links)
        milp = replace(milp, start=values)
    return milp


def columns_of(cat: Catalogue, problem: PlanningProblem, plan: Plan) -> np.ndarray | None:
    """Per device of ``problem``'s fleet the catalogue column of its configuration in
    ``plan`` (``-1``: out), or None when a configuration is not a column of the catalogue."""
    lookup = {(int(d), r): j for j, (d, r) in enumerate(zip(cat.depth, cat.ranks, strict=True))}
    try:
        by_id = {dp.device_id: dp for dp in plan.devices}
        out = []
        for device in problem.fleet.devices:
            dp = by_id[device.device_id]
            out.append(-1 if not dp.layers else lookup[(len(dp.layers), tuple(dp.ranks))])
    except KeyError:
        return None
    return np.asarray(out, dtype=np.int64)


def _link_time_bound(
    problem: PlanningProblem,
    cat: Catalogue,
    fc: FleetCosts,
    units: Units,
    links: Sequence[CongestedLink],
) -> float:
    """An upper bound of the round time with the server link or shared links."""
    top = float(cat.bytes_one_way.max())
    n = len(problem.fleet)
    bound = float(units.time_s.max()) if len(units.time_s) else 0.0
    s = problem.options.server_mbps
    if s is not None:
        bound = max(bound, 2 * top * n / (s * MB / 8))
    for cl in links:
        bound = max(bound, float(units.time_s.max()) + cl.s_per_byte * top * len(cl.devices))
    return bound * 1.01 + 1.0


def _link_rows(
    rows: _Rows,
    problem: PlanningProblem,
    cat: Catalogue,
    fc: FleetCosts,
    units: Units,
    links: Sequence[CongestedLink],
    unit_of: np.ndarray,
    v_of: np.ndarray,
    t_id: int,
    l_id: np.ndarray,
    nbytes_mb: np.ndarray,
    staggered: Sequence[StaggeredUploads],
) -> None:
    """Rows C10 of every congested link (module docstring; docs/topology.md for the
    ``"staggered"`` model's rows ``C10u`` and ``C10w``)."""
    col = units.column
    # units by link, without a pass over every column per link
    unit_of_device = units.groups.inverse
    for k, cl in enumerate(links):
        stag = cl.contention == "staggered"
        unit_ids = np.unique(unit_of_device[cl.devices])
        cols = (
            np.concatenate([np.arange(units.start[g], units.start[g + 1]) for g in unit_ids])
            if len(unit_ids)
            else np.zeros(0, dtype=np.int64)
        )
        # L_e: the congested directions' bytes ("together"), the downloads' ("staggered")
        per_byte = cl.down_s_per_byte if stag else cl.s_per_byte
        rows.add(
            f"C10b[{cl.link}]",
            np.append(cols, l_id[k]),
            np.append(per_byte * nbytes_mb[cols] * MB, -1.0),
            0.0,
            0.0,
        )
        for g, dev, ids, j, compute in _unit_columns(cat, fc, units, unit_ids):
            if stag:
                if not cl.down:
                    continue  # the device's own time (C5) covers D_e = 0
                o = compute + cat.bytes_one_way[j] * fc.up_s_per_byte[dev]
            else:
                own = cat.bytes_one_way[j] * (
                    (0.0 if cl.down else fc.down_s_per_byte[dev])
                    + (0.0 if cl.up else fc.up_s_per_byte[dev])
                )
                o = compute + own
            if units.size(int(g)) == 1:
                rows.add(
                    f"C10[{cl.link},{g}]",
                    np.concatenate([ids, [l_id[k], t_id]]),
                    np.concatenate([o, [1.0, -1.0]]),
                    -np.inf,
                    0.0,
                )
            else:
                # valid cut: the members' mean contention time is at most T
                n_g = float(units.size(int(g)))
                rows.add(
                    f"C10avg[{cl.link},{g}]",
                    np.concatenate([ids, [l_id[k], t_id]]),
                    np.concatenate([o / n_g, [1.0, -1.0]]),
                    -np.inf,
                    0.0,
                )
                for c, oc in zip(ids, o, strict=True):
                    rows.add(
                        f"C10[{cl.link},{g},{col[c]}]",
                        np.asarray([v_of[c], l_id[k], t_id]),
                        np.asarray([oc, 1.0, -1.0]),
                        -np.inf,
                        0.0,
                    )
    for up in staggered:
        _staggered_rows(rows, up, t_id)


def _unit_columns(
    cat: Catalogue, fc: FleetCosts, units: Units, unit_ids: np.ndarray
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """Per unit of ``unit_ids`` with a participating column: the unit, its first device,
    its program columns other than *out*, their catalogue columns and compute times."""
    part = units.column != OUT
    for g in unit_ids:
        dev = int(units.groups.first[g])
        ids = np.arange(units.start[g], units.start[g + 1])
        ids = ids[part[ids]]
        if not len(ids):
            continue
        j = units.column[ids]
        compute = (
            fc.compute_const[dev]
            + fc.compute_per_layer[dev] * cat.depth[j]
            + fc.compute_per_rank[dev] * cat.rank_sum[j]
        )
        yield int(g), dev, ids, j, compute


def _staggered_uploads(
    cat: Catalogue,
    fc: FleetCosts,
    units: Units,
    links: Sequence[CongestedLink],
    l_id: np.ndarray,
    v_of: np.ndarray,
    w_base: int,
) -> tuple[StaggeredUploads, ...]:
    """The uploads of every link congested upstream under the ``"staggered"`` model, with
    the times of their rows (releases of the link's columns: all of them up to
    :data:`MAX_THETA_ROWS`, otherwise that many quantiles) and their variables ``w`` from
    ``w_base`` on."""
    out = []
    for k, cl in enumerate(links):
        if cl.contention != "staggered" or not cl.up:
            continue
        ids_, rel_, bytes_, rate_, unit_ = [], [], [], [], []
        unit_ids = np.unique(units.groups.inverse[cl.devices])
        for g, dev, ids, j, compute in _unit_columns(cat, fc, units, unit_ids):
            own_down = cat.bytes_one_way[j] * fc.down_s_per_byte[dev]
            ids_.append(ids)
            rel_.append(compute + (0.0 if cl.down else own_down))
            bytes_.append(cat.bytes_one_way[j])
            rate_.append(np.full(len(ids), min(1.0 / fc.up_s_per_byte[dev], cl.up_bytes_per_s)))
            unit_.append(np.full(len(ids), g))
        if not ids_:
            continue
        ids = np.concatenate(ids_)
        release = np.concatenate(rel_)
        unit = np.concatenate(unit_)
        size = np.asarray([units.size(int(g)) for g in unit], dtype=float)
        theta = np.unique(np.round(release, 9))
        if len(theta) > MAX_THETA_ROWS:
            theta = np.unique(np.quantile(theta, np.linspace(0.0, 1.0, MAX_THETA_ROWS)))
        out.append(
            StaggeredUploads(
                link=cl.link,
                ids=ids,
                release_s=release,
                nbytes=np.concatenate(bytes_),
                rate=np.concatenate(rate_),
                s_per_byte=1.0 / cl.up_bytes_per_s,
                l_var=int(l_id[k]) if cl.down else -1,
                anchor=np.where(size > 1, v_of[ids], ids),
                unit=unit,
                unit_size=size,
                theta=theta,
                w_ids=w_base + np.arange(len(theta)),
            )
        )
        w_base += len(theta)
    return tuple(out)


def _staggered_rows(rows: _Rows, up: StaggeredUploads, t_id: int) -> None:
    """C10u[e,s]: ``theta_s w_s + L_e + s_e sum_gj rem_gj(theta_s) m[g,j] - T <= 0``, and
    C10w[e,s,g]: ``sum_{j: rem_gj(theta_s) > 0} m[g,j] / N_g - w_s <= 0``: ``w_s`` in
    ``[0, 1]`` is 1 when a device (of a unit of one) still has bytes to send at
    ``theta_s``, so the row holds for every plan (an upload that is done says nothing
    about the round after it)."""
    for s_idx, th in enumerate(up.theta):
        cols, vals = up.row(float(th), t_id, int(up.w_ids[s_idx]))
        rows.add(f"C10u[{up.link},{s_idx}]", cols, vals, -np.inf, 0.0)
        live = up.rem(float(th)) > 0
        for g in np.unique(up.unit[live]):
            mine = live & (up.unit == g)
            rows.add(
                f"C10w[{up.link},{s_idx},{g}]",
                np.append(up.ids[mine], up.w_ids[s_idx]),
                np.append(1.0 / up.unit_size[mine], -1.0),
                -np.inf,
                0.0,
            )


def staggered_cuts(milp: MILP, values: np.ndarray, *, rel_tol: float = 1e-7) -> MILP | None:
    """``milp`` with a row C10u at each release of the solution ``values``'s
    configurations on a staggered link where the uploads' bound exceeds the solution's
    ``T``; ``None`` when there is none (the rows then hold the solution's exact round
    time)."""
    if not milp.staggered or milp.round_time is None:
        return None
    t_id = milp.round_time
    v = np.asarray(values, dtype=float)
    t_val = float(v[t_id])
    w = v.copy()
    w[: len(milp.units.column)] = np.rint(w[: len(milp.units.column)])
    _set_link_loads(milp, w)
    added = _Rows()
    for up in milp.staggered:
        n = w[up.ids]
        on = n > 0.5
        if not on.any():
            continue
        down = w[up.l_var] if up.l_var >= 0 else 0.0
        r = up.release_s[on]
        rem = remaining_bytes(r, r, up.nbytes[on], up.rate[on])
        f = down + r + up.s_per_byte * (rem @ n[on])
        # a row at the release of every chosen entry whose bound the solution's T misses
        entries = np.flatnonzero(on)
        for k in np.flatnonzero(f > t_val * (1 + rel_tol) + 1e-9):
            # at the release of that entry, its own upload is pending
            cols, vals = up.row(float(r[k]), t_id, int(up.anchor[entries[k]]))
            name = f"C10u[{up.link},cut{len(milp.rows_named('C10u')) + len(added.names)}]"
            added.add(name, cols, vals, -np.inf, 0.0)
    if not added.names:
        return None
    return replace(
        milp,
        matrix=sp.vstack([milp.matrix, added.matrix(milp.num_vars)], format="csr"),
        row_names=milp.row_names + tuple(added.names),
        row_lower=np.concatenate([milp.row_lower, added.lower]),
        row_upper=np.concatenate([milp.row_upper, added.upper]),
    )


def encode(
    milp: MILP,
    problem: PlanningProblem,
    fc: FleetCosts,
    choice: np.ndarray,
    links: Sequence[CongestedLink] = (),
) -> np.ndarray | None:
    """Program values for per-device catalogue columns ``choice`` (``-1``: out), or None
    when some device's column is not among its unit's columns."""
    units = milp.units
    values = np.zeros(milp.num_vars)
    for g in range(len(units)):
        sl = slice(units.start[g], units.start[g + 1])
        cols = units.column[sl]
        for dev in units.groups.members[g]:
            hit = np.flatnonzero(cols == choice[dev])
            if not len(hit):
                return None
            values[sl.start + hit[0]] += 1.0
    m_count = len(units.column)
    vkeys = [k for k, key in enumerate(milp.index) if key.kind == "v"]
    if vkeys:
        lookup = {(milp.index[k].owner, milp.index[k].a): k for k in vkeys}
        unit_of = np.repeat(np.arange(len(units)), np.diff(units.start))
        for c in range(m_count):
            if values[c] > 0.5:
                k = lookup.get((int(unit_of[c]), int(units.column[c])))
                if k is not None:
                    values[k] = 1.0
    _set_saturation(milp, values)
    _set_uploading(milp, values)
    if milp.round_time is not None or links:
        _set_link_loads(milp, values)
        if milp.round_time is not None:
            values[milp.round_time] = max(round_time_of(milp, values), milp.lower[milp.round_time])
            if values[milp.round_time] > milp.upper[milp.round_time]:
                return None
    return values


def _set_link_loads(milp: MILP, values: np.ndarray) -> None:
    """Set each link variable ``L_e`` to what its byte row (C10b) says of ``values``."""
    for r in milp.rows_named("C10b"):
        start, end = milp.matrix.indptr[r], milp.matrix.indptr[r + 1]
        cols = milp.matrix.indices[start:end]
        vals = milp.matrix.data[start:end]
        l_var = next(c for c in cols if milp.index[c].kind == "L")
        mask = cols != l_var
        values[l_var] = float(vals[mask] @ values[cols[mask]])


def _set_uploading(milp: MILP, values: np.ndarray) -> None:
    """Set each staggered row's ``w`` to what its rows C10w say of ``values``: the largest
    share of a unit's members that still upload at its time."""
    for up in milp.staggered:
        n = np.rint(values[up.ids])
        for s_idx, th in enumerate(up.theta):
            live = (up.rem(float(th)) > 0) & (n > 0)
            share = 0.0
            for g in np.unique(up.unit[live]):
                mine = live & (up.unit == g)
                share = max(share, float((n[mine] / up.unit_size[mine]).sum()))
            values[up.w_ids[s_idx]] = min(share, 1.0)


def _set_saturation(milp: MILP, values: np.ndarray) -> None:
    """Fill each slot's segments ``z`` (in order, to their widths) up to the coverage its
    row (SAT) says of ``values``: the largest progress those counts allow."""
    for r in milp.rows_named("SAT"):
        start, end = milp.matrix.indptr[r], milp.matrix.indptr[r + 1]
        cols = milp.matrix.indices[start:end]
        vals = milp.matrix.data[start:end]
        is_z = np.asarray([milp.index[c].kind == "z" for c in cols])
        left = -float(vals[~is_z] @ values[cols[~is_z]])
        for c in sorted(cols[is_z], key=lambda c: milp.index[c].a):
            values[c] = min(max(left, 0.0), milp.upper[c])
            left -= values[c]


def denominator_of(milp: MILP, values: Sequence[float] | np.ndarray) -> float:
    """The denominator of a ratio objective: the round time, plus (``progress``) the
    server's overhead and the priced bytes."""
    t = round_time_of(milp, values)
    if milp.price_s is None:
        return t
    v = np.rint(np.asarray(values, dtype=float))
    return t + milp.overhead_s + float(milp.price_s @ v)


def round_time_of(milp: MILP, values: Sequence[float] | np.ndarray) -> float:
    """The round time a solution implies: its slowest participant, the server link and the
    shared links (0 when nobody participates)."""
    v = np.asarray(values, dtype=float)
    units = milp.units
    C = len(units.column)
    used = np.rint(v[:C]) > 0
    part = used & (units.column != OUT)
    if not part.any():
        return 0.0
    t = float(units.time_s[part].max())
    if milp.server_bytes_per_s is not None:
        nbytes = 2.0 * float(
            milp.catalogue.bytes_one_way[units.column[part]] @ np.rint(v[:C][part])
        )
        t = max(t, nbytes / milp.server_bytes_per_s)
    shared = milp.rows_named("C10")
    if (shared or milp.staggered) and milp.round_time is not None:
        w = v.copy()
        w[:C] = np.rint(w[:C])
        vk = [k for k, key in enumerate(milp.index) if key.kind == "v"]
        if vk:
            # a column's contention row counts only when a member uses it
            lookup = {(key.owner, key.a): c for c, key in enumerate(milp.index[:C])}
            for k in vk:
                key = milp.index[k]
                w[k] = float(w[lookup[(key.owner, key.a)]] > 0.5)
        # L_e from the byte rows of the rounded counts
        _set_link_loads(milp, w)
        w[milp.round_time] = 0.0
        if shared:
            act = milp.matrix[shared] @ w
            t = max(t, float(act.max()))
        for up in milp.staggered:
            n = w[up.ids]
            on = n > 0.5
            if on.any():
                down = w[up.l_var] if up.l_var >= 0 else 0.0
                t = max(
                    t,
                    down
                    + staggered_upload_s(
                        up.release_s[on], up.nbytes[on], up.rate[on], up.s_per_byte, n[on]
                    ),
                )
    return t


def decode(milp: MILP, values: Sequence[float] | np.ndarray) -> tuple[Configuration, ...]:
    """One configuration ``(layers, ranks)`` per device, in fleet order (``((), ())``: out).

    Within a unit of identical devices, members in fleet order take the used columns in
    order of decreasing utility (ties: the faster first).
    """
    return tuple(milp.catalogue.configuration(int(j)) for j in decode_columns(milp, values))


def decode_columns(milp: MILP, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per device the catalogue column of a solution (``-1``: out)."""
    v = np.asarray(values, dtype=float)
    units = milp.units
    n = int(sum(len(m) for m in units.groups.members))
    out = np.full(n, OUT, dtype=np.int64)
    for g in range(len(units)):
        sl = slice(units.start[g], units.start[g + 1])
        counts = np.rint(v[sl]).astype(np.int64)
        order = np.lexsort((units.time_s[sl], -units.utility[sl]))
        members = iter(units.groups.members[g])
        for j in order:
            for _ in range(int(counts[j])):
                out[next(members)] = units.column[sl][j]
    return out
