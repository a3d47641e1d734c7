r"""The per-round integer program as backend-neutral data (METHOD.md section 4).

:func:`formulate` builds a :class:`MILP` (variables with bounds and integrality, linear
rows with names, an objective and an index from every variable to its meaning); a backend
in :mod:`legend.planner.solvers` only translates it; :func:`decode` maps the solution
values back to one configuration per device.

The per-device program
----------------------
Devices ``i = 1..N``, layers ``l = 0..L-1`` (``L-1`` next to the output), rank grid
``r_1 < ... < r_K``. Binaries ``x[i,l,k]`` (device ``i`` trains layer ``l`` at rank
``r_k``) and ``z[i]`` (device ``i`` participates; fixed to 1 unless
``allow_dropping``), ``y[i,l] = sum_k x[i,l,k]``. From the cost model's linear table of
device ``i`` (:meth:`~legend.planner.costs.CostModel.table`):

.. math::

    t_i(x) = a_i z_i + \sum_{l,k} a_{ilk} x_{ilk}, \quad
    m_i(x) = b_i z_i + \sum_{l,k} b_{ilk} x_{ilk}, \quad
    B_i(x) = c_i z_i + \sum_{l,k} c_{ilk} x_{ilk}

(round time in seconds, memory in bytes, bytes each way) and the utility

.. math::

    U(x) = \sum_i n_i \sum_l w_l \sum_k g(r_k) x_{ilk}, \qquad g(r) = \log_2(1 + r).

Rows (names as in the code; ``T`` is the round time, a constant deadline or a variable)::

    C1[i,l]   sum_k x[i,l,k] <= 1                                 one rank per layer
    C2[i,l]   y[i,l] - y[i,l+1] <= 0            (l < L-1)         contiguous from the output
    C3[i]     y[i,L-1] - z[i] = 0                                 participants train layer L-1
    C3min[i]  y[i,L-d_min] - z[i] = 0           (d_min > 1)       minimum depth
    C4[i,l]   sum_k r_k x[i,l,k] - sum_k r_k x[i,l+1,k] <= 0      ranks non-decreasing (option)
    C5[i]     t_i(x) - T <= 0                                     round deadline
    C6[i]     m_i(x) <= memory_i                                  memory
    C7        sum_i 2 B_i(x) - server_Bps * T <= 0                server link (option)
    C7max[i]  T - t_i(x) + M h[i] <= M,  C7h[i]  h[i] <= z[i],  C7one  sum_i h[i] = 1
    C8[l]     sum_i n_i y[i,l] - q sum_i n_i z[i] >= 0            coverage of the top D layers
    C9        sum_i z[i] >= min_participants                      (option)
    C10[e,i]  c_i(x) + k_e sum_{j on e} B_j(x) + o_ie(x) - T <= 0  shared link e (topology)
    UF        U(x) >= U_floor                                     utility floor (O2 only)

C10 is written for every congested link ``e`` of a topology (:mod:`legend.planner.topology`)
and device ``i`` routed through it: ``c_i`` is the device's compute time, ``k_e`` the
seconds per byte of ``e`` summed over its congested directions, ``o_ie`` the device's own
transfer time in the directions where ``e`` is not congested.

C7 holds against the plan's real round time, the slowest participant's ``t_i``: with the
server link on, ``T`` is a variable (bounded by the deadline under O1) and binaries ``h[i]``
pick the participant whose time ``T`` equals (``M`` is an upper bound of every ``t_i``);
a plan must then have at least one participant.

Objectives: O1 ``deadline``: ``max U`` with ``T = deadline_s`` a constant; O2
``min-time``: ``min T`` subject to ``UF``; O3 ``rate``: ``max U / T`` solved by Dinkelbach
iterations over :meth:`MILP.with_rate` (``max U - lambda T``), see
:mod:`legend.planner.solvers`. Memory rows are written in GB and byte rows in MB, and the
utility is divided by the mean sample count (``utility_scale``) so that every row and the
objective have moderate magnitudes; :meth:`MILP.utility_value` undoes the scaling.

The class program
-----------------
With device classes (:mod:`legend.planner.classes`), class ``c`` of ``N_c`` members has
Pareto-efficient configurations ``j`` with round time ``t_cj``, bytes ``B_cj``, depth
``d_j`` and per-sample utility ``u_j``; every configuration already satisfies C1-C4 and C6
(and C5 when the deadline is a constant). Integer counts ``m[c,j] in [0, N_c]``, the number
of members sitting out ``o[c]`` (only with ``allow_dropping``), and, when ``T`` is a
variable, binaries ``v[c,j]`` (configuration ``j`` is used by class ``c``: for the
configurations slower than ``T_lb``, and with a congested link for every configuration)::

    C3[c]     sum_j m[c,j] + o[c] = N_c
    C5[c,j]   t_cj v[c,j] - T <= 0        (only where t_cj exceeds the lower bound of T)
    C5v[c,j]  m[c,j] - N_c v[c,j] <= 0    (every v)
    C5avg[c]  sum_j (t_cj - T_lb) m[c,j] / N_c - T <= -T_lb   (valid cut, slow configs only)
    C7        sum_cj 2 B_cj m[c,j] - server_Bps * T <= 0
    C7max[c,j] T + M h[c,j] <= t_cj + M,  C7h[c,j]  h[c,j] <= m[c,j],  C7one  sum h = 1
    C8[l]     sum_cj n_c m[c,j] ([d_j >= L - l] - q) >= 0
    C9        sum_cj m[c,j] >= min_participants
    C10b[e]      sum_{c on e, j} k_e B_cj m[c,j] - L_e = 0             congested link e
    C10avg[e,c]  L_e + sum_j c_cj m[c,j] / N_c - T <= 0                (valid cut)
    C10[e,c,j]   L_e + c_cj v[c,j] - T <= 0
    UF        sum_cj n_c u_j m[c,j] >= U_floor

with the utility ``U = sum_cj n_c u_j m[c,j]``. ``L_e`` is a continuous variable, the
round's bytes through ``e`` at its capacity, so that each C10 row has three entries instead
of one per count on the link; ``c_cj`` is C10's ``c_i + o_ie`` of configuration ``j``. A
class routed through a congested link keeps every configuration that no other beats in
time, utility, bytes *and* compute (C10 charges bytes and compute separately); C5v ties
``v`` to the counts, without which C10 would charge no compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from legend.planner.api import Configuration, PlanningProblem, rank_gain
from legend.planner.classes import (
    ClassConfigs,
    ConfigCatalog,
    DeviceClass,
    class_pareto_configs,
    enumerate_configurations,
    expand_counts,
    group_devices,
    resolve_use_classes,
)
from legend.planner.errors import InfeasibleError, PlannerInputError

__all__ = ["MILP", "VarKey", "decode", "formulate", "round_time_lower_bound", "round_time_of"]

GB = 1e9
MB = 1e6


class VarKey(NamedTuple):
    """What a variable means: ``kind`` is one of

    ``"x"`` (``owner`` = device, ``a`` = layer, ``b`` = rank index), ``"z"`` (device),
    ``"T"`` (round time), ``"m"`` (``owner`` = class, ``a`` = configuration: a count),
    ``"v"`` (class, configuration: used), ``"o"`` (class: members sitting out), ``"h"``
    (device, or class and configuration: sets the round time under C7), ``"l"`` (link: its
    round's bytes at its capacity, in seconds).
    """

    kind: str
    owner: int = -1
    a: int = -1
    b: int = -1


@dataclass(frozen=True, kw_only=True)
class _DeviceLayout:
    num_devices: int
    num_layers: int
    ranks: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class _ClassLayout:
    num_devices: int
    classes: tuple[DeviceClass, ...]
    catalog: ConfigCatalog
    configs: tuple[ClassConfigs, ...]
    count_offset: tuple[int, ...]  # first "m" variable of each class


@dataclass(frozen=True, kw_only=True)
class MILP:
    """A mixed-integer linear program ``opt c'v s.t. row_lower <= A v <= row_upper``.

    Attributes
    ----------
    kind
        ``"device"`` (per-device program) or ``"class"`` (class program).
    var_names, index
        One name and one :class:`VarKey` per variable.
    lower, upper, integer
        Variable bounds and integrality.
    matrix, row_names, row_lower, row_upper
        The rows (CSR), named after the constraints C1..C9 and UF.
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
        Warm-start values (from ``problem.warm_start``), or ``None``.
    """

    kind: str
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
    layout: _DeviceLayout | _ClassLayout

    @property
    def num_vars(self) -> int:
        return len(self.var_names)

    @property
    def num_rows(self) -> int:
        return len(self.row_names)

    def with_rate(self, lam: float) -> MILP:
        """The Dinkelbach subproblem ``max U - lam * T`` (scaled units; needs ``T``)."""
        if self.round_time is None:
            raise PlannerInputError("the rate objective needs a program with a variable T")
        c = self.utility.copy()
        c[self.round_time] -= lam
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


def formulate(
    problem: PlanningProblem,
    deadline_s: float | None = None,
    *,
    utility_floor: float | None = None,
    use_classes: bool | None = None,
) -> MILP:
    """Build the program for ``problem``.

    Parameters
    ----------
    deadline_s
        A constant round deadline (O1: ``max U``); ``None`` makes ``T`` a variable.
    utility_floor
        With ``deadline_s=None``: add ``U >= utility_floor`` and minimise ``T`` (O2).
        Otherwise the objective is ``max U`` (use :meth:`MILP.with_rate` for O3).
    use_classes
        Build the class program; ``None`` resolves ``problem.options.use_classes``.

    Raises
    ------
    InfeasibleError
        A device class has no configuration that fits (class program without dropping).
    """
    if utility_floor is not None and deadline_s is not None:
        raise PlannerInputError("give either `deadline_s` (O1) or `utility_floor` (O2), not both")
    opts = problem.options
    if opts.coverage_share > 0 and opts.coverage_layers > problem.spec.num_layers:
        raise PlannerInputError(
            f"`coverage_layers` {opts.coverage_layers} exceeds the {problem.spec.num_layers} "
            f"layers of {problem.spec.name}"
        )
    if opts.min_participants > len(problem.fleet):
        raise PlannerInputError(
            f"`min_participants` {opts.min_participants} exceeds the fleet's "
            f"{len(problem.fleet)} devices"
        )
    if use_classes is None:
        use_classes = resolve_use_classes(problem)
    if use_classes:
        return _formulate_classes(problem, deadline_s, utility_floor)
    return _formulate_devices(problem, deadline_s, utility_floor)


def round_time_lower_bound(problem: PlanningProblem) -> float:
    """Round time no plan with a participant can beat: the smallest configuration's time of
    the slowest device (every device participates) or of the fastest (with dropping)."""
    L = problem.spec.num_layers
    d = problem.options.min_depth
    times = []
    for device in problem.fleet.devices:
        t = problem.costs.table(device)
        times.append(t.time_const_s + sum(t.time_coef_s[ly][0] for ly in range(L - d, L)))
    return min(times) if problem.options.allow_dropping else max(times)


# -- per-device program --------------------------------------------------------------------


def _formulate_devices(
    problem: PlanningProblem, deadline_s: float | None, utility_floor: float | None
) -> MILP:
    opts = problem.options
    devices = problem.fleet.devices
    N, L = len(devices), problem.spec.num_layers
    ranks = problem.job.ranks
    K = len(ranks)
    r = np.asarray(ranks, dtype=float)
    tables = [problem.costs.table(d) for d in devices]
    time_c = np.asarray([t.time_const_s for t in tables])
    time_x = np.asarray([t.time_coef_s for t in tables])  # (N, L, K)
    mem_c = np.asarray([t.memory_const_bytes for t in tables]) / GB
    mem_x = np.asarray([t.memory_coef_bytes for t in tables]) / GB
    byte_c = np.asarray([t.bytes_const for t in tables]) / MB
    byte_x = np.asarray([t.bytes_coef for t in tables]) / MB
    samples = np.asarray([d.num_samples for d in devices], dtype=float)
    scale = float(samples.mean())
    n = samples / scale
    w = np.asarray(problem.layer_weights)
    g = np.asarray([rank_gain(k) for k in ranks])
    util_x = n[:, None, None] * w[None, :, None] * g[None, None, :]

    nx = N * L * K
    x_id = np.arange(nx).reshape(N, L, K)
    z_id = nx + np.arange(N)
    link = opts.server_mbps is not None
    shared = _shared_link_rows(problem) if problem.topology is not None else []
    # With the server link, T must be the slowest participant's time exactly (C7 is checked
    # against the real round time), so T is a variable even under a constant deadline.
    has_t = deadline_s is None or link or bool(shared)
    t_id = nx + N if has_t else -1
    h_id = nx + N + 1 + np.arange(N) if link else np.zeros(0, dtype=np.int64)
    num_vars = nx + N + (1 if has_t else 0) + len(h_id)

    t_lb = round_time_lower_bound(problem)
    t_max_dev = time_c + time_x.max(axis=2).sum(axis=1)
    t_ub = float(t_max_dev.max()) * 1.01 + 1.0
    if deadline_s is not None:
        t_ub = deadline_s

    lower = np.zeros(num_vars)
    upper = np.ones(num_vars)
    integer = np.ones(num_vars, dtype=bool)
    if not opts.allow_dropping:
        lower[z_id] = 1.0
    if has_t:
        # min(): with dropping, a deadline below every device's smallest configuration
        # leaves nobody to train; the rows (not the bounds) then say "infeasible".
        lower[t_id], upper[t_id], integer[t_id] = min(t_lb, t_ub), t_ub, False

    rows = _Rows()
    ones = np.ones(K)
    for i in range(N):
        for ly in range(L):
            rows.add(f"C1[{i},{ly}]", x_id[i, ly], ones, -np.inf, 1.0)
        for ly in range(L - 1):
            rows.add(
                f"C2[{i},{ly}]",
                np.concatenate([x_id[i, ly], x_id[i, ly + 1]]),
                np.concatenate([ones, -ones]),
                -np.inf,
                0.0,
            )
        rows.add(f"C3[{i}]", np.append(x_id[i, L - 1], z_id[i]), np.append(ones, -1.0), 0.0, 0.0)
        if opts.min_depth > 1:
            lm = L - opts.min_depth
            rows.add(
                f"C3min[{i}]", np.append(x_id[i, lm], z_id[i]), np.append(ones, -1.0), 0.0, 0.0
            )
        if opts.monotone_ranks:
            for ly in range(L - 1):
                rows.add(
                    f"C4[{i},{ly}]",
                    np.concatenate([x_id[i, ly], x_id[i, ly + 1]]),
                    np.concatenate([r, -r]),
                    -np.inf,
                    0.0,
                )
        cols = np.append(x_id[i].ravel(), z_id[i])
        tvals = np.append(time_x[i].ravel(), time_c[i])
        if has_t:
            rows.add(f"C5[{i}]", np.append(cols, t_id), np.append(tvals, -1.0), -np.inf, 0.0)
        else:
            assert deadline_s is not None
            rows.add(f"C5[{i}]", cols, tvals / deadline_s, -np.inf, 1.0)
        if link:
            # C7max: T <= t_i(x) + M (1 - h_i) for the device h_i = 1 that sets the round time
            big_m = t_ub
            rows.add(
                f"C7max[{i}]",
                np.concatenate([[t_id], cols, [h_id[i]]]),
                np.concatenate([[1.0], -tvals, [big_m]]),
                -np.inf,
                big_m,
            )
            rows.add(
                f"C7h[{i}]", np.asarray([h_id[i], z_id[i]]), np.asarray([1.0, -1.0]), -np.inf, 0.0
            )
        # Memory and a constant deadline are written relative to the capacity, so that the
        # solver's feasibility tolerance (1e-7 .. 1e-6) is a relative one, as in validate_plan.
        cap_gb = devices[i].memory_bytes / GB
        rows.add(
            f"C6[{i}]",
            cols,
            np.append(mem_x[i].ravel(), mem_c[i]) / cap_gb,
            -np.inf,
            1.0,
        )
    if opts.server_mbps is not None:
        link_mb_s = opts.server_mbps / 8  # MB per second
        cols = np.concatenate([x_id.ravel(), z_id])
        vals = np.concatenate([2 * byte_x.ravel(), 2 * byte_c])
        rows.add("C7", np.append(cols, t_id), np.append(vals, -link_mb_s), -np.inf, 0.0)
        rows.add("C7one", h_id, np.ones(N), 1.0, 1.0)
    for name, own, per_byte, members in shared:
        # C10: compute of `own` + the link's bytes at its capacity (see planner.topology)
        i = own
        d8, u8 = 8 / devices[i].downlink_mbps, 8 / devices[i].uplink_mbps
        own_byte = (0.0 if per_byte[1] else d8) + (0.0 if per_byte[0] else u8)
        comp_x = time_x[i].ravel() - byte_x[i].ravel() * (d8 + u8) + byte_x[i].ravel() * own_byte
        comp_c = time_c[i] - byte_c[i] * (d8 + u8) + byte_c[i] * own_byte
        k_e = per_byte[2]
        cols_l = [x_id[i].ravel(), [z_id[i]]]
        vals_l = [comp_x, [comp_c]]
        if k_e > 0:
            for j in members:
                cols_l += [x_id[j].ravel(), [z_id[j]]]
                vals_l += [byte_x[j].ravel() * k_e, [byte_c[j] * k_e]]
        rows.add(
            name,
            np.append(np.concatenate(cols_l), t_id),
            np.append(np.concatenate(vals_l), -1.0),
            -np.inf,
            0.0,
        )
    if opts.coverage_share > 0 and opts.coverage_layers > 0:
        q = opts.coverage_share
        for ly in range(L - opts.coverage_layers, L):
            cols = np.concatenate([x_id[:, ly, :].ravel(), z_id])
            vals = np.concatenate([np.repeat(n, K), -q * n])
            rows.add(f"C8[{ly}]", cols, vals, 0.0, np.inf)
    if opts.min_participants > 0:
        rows.add("C9", z_id, np.ones(N), float(opts.min_participants), np.inf)

    utility = np.zeros(num_vars)
    utility[:nx] = util_x.ravel()
    if utility_floor is not None:
        rows.add("UF", np.arange(nx), util_x.ravel(), utility_floor / scale, np.inf)
        objective = np.zeros(num_vars)
        objective[t_id] = 1.0
        sense = "min"
    else:
        objective, sense = utility.copy(), "max"

    index = (
        [VarKey("x", i, ly, k) for i in range(N) for ly in range(L) for k in range(K)]
        + [VarKey("z", i) for i in range(N)]
        + ([VarKey("T")] if has_t else [])
        + [VarKey("h", i) for i in range(len(h_id))]
    )
    names = [f"x_{i}_{ly}_{k}" for i in range(N) for ly in range(L) for k in range(K)]
    names += [f"z_{i}" for i in range(N)] + (["T"] if has_t else [])
    names += [f"h_{i}" for i in range(len(h_id))]

    start = _device_start(problem, num_vars, x_id, z_id, t_id, h_id, time_c, time_x)
    return MILP(
        kind="device",
        var_names=tuple(names),
        index=tuple(index),
        lower=lower,
        upper=upper,
        integer=integer,
        matrix=rows.matrix(num_vars),
        row_names=tuple(rows.names),
        row_lower=np.asarray(rows.lower),
        row_upper=np.asarray(rows.upper),
        objective=objective,
        sense=sense,
        utility=utility,
        utility_scale=scale,
        round_time=t_id if has_t else None,
        deadline_s=deadline_s,
        time_lower_bound_s=t_lb,
        start=start,
        layout=_DeviceLayout(num_devices=N, num_layers=L, ranks=ranks),
    )


def _shared_link_rows(
    problem: PlanningProblem,
) -> list[tuple[str, int, tuple[bool, bool, float], list[int]]]:
    """``(row name, device, (up congested, down congested, s per MB of the link's bytes),
    devices on the link)`` for every congested link of the topology and device on it."""
    topo = problem.topology
    assert topo is not None
    pos = {d: i for i, d in enumerate(problem.fleet.device_ids)}
    out = []
    for e, up_c, down_c in topo.congested(problem.fleet):
        link = topo.links[e]
        k_e = (8 / link.up_mbps if up_c else 0.0) + (8 / link.down_mbps if down_c else 0.0)
        members = [pos[d] for d in topo.devices_on(e)]
        for i in members:
            out.append((f"C10[{e},{i}]", i, (up_c, down_c, k_e), members))
    return out


def _device_start(
    problem: PlanningProblem,
    num_vars: int,
    x_id: np.ndarray,
    z_id: np.ndarray,
    t_id: int,
    h_id: np.ndarray,
    time_c: np.ndarray,
    time_x: np.ndarray,
) -> np.ndarray | None:
    """Warm start from last round's plan when it names every device with grid ranks."""
    plan = problem.warm_start
    if plan is None:
        return None
    by_id = {d.device_id: d for d in plan.devices}
    L = problem.spec.num_layers
    k_of = {r: k for k, r in enumerate(problem.job.ranks)}
    values = np.zeros(num_vars)
    t = 0.0
    slowest = -1
    for i, device in enumerate(problem.fleet.devices):
        dp = by_id.get(device.device_id)
        if dp is None or any(rk not in k_of for rk in dp.ranks):
            return None
        if dp.layers and dp.layers != tuple(range(L - len(dp.layers), L)):
            return None
        if not dp.layers:
            if not problem.options.allow_dropping:
                return None
            continue
        values[z_id[i]] = 1.0
        ti = time_c[i]
        for layer, rank in zip(dp.layers, dp.ranks, strict=True):
            values[x_id[i, layer, k_of[rank]]] = 1.0
            ti += time_x[i, layer, k_of[rank]]
        if ti > t:
            t, slowest = ti, i
    if t_id >= 0:
        values[t_id] = t
    if len(h_id) and slowest >= 0:
        values[h_id[slowest]] = 1.0
    return values


# -- class program -------------------------------------------------------------------------


def _formulate_classes(
    problem: PlanningProblem, deadline_s: float | None, utility_floor: float | None
) -> MILP:
    opts = problem.options
    L = problem.spec.num_layers
    classes = group_devices(problem, bucket_ratio=opts.class_bucket_ratio)
    catalog = enumerate_configurations(problem)
    configs = tuple(
        class_pareto_configs(problem, c, catalog, deadline_s=deadline_s) for c in classes
    )
    if not opts.allow_dropping:
        blocked = [c for c, cc in zip(classes, configs, strict=True) if len(cc) == 0]
        if blocked:
            from legend.planner.diagnose import explain_class_block

            raise InfeasibleError(
                "no plan: some devices cannot run even their smallest configuration",
                tuple(explain_class_block(problem, c, deadline_s) for c in blocked),
            )
    samples_all = np.asarray([d.num_samples for d in problem.fleet.devices], dtype=float)
    scale = float(samples_all.mean())
    link = opts.server_mbps is not None
    congested = problem.topology.congested(problem.fleet) if problem.topology is not None else []
    has_t = deadline_s is None or link or bool(congested)

    # lower bound of T over plans with a participant
    mins = [float(cc.time_s.min()) for cc in configs if len(cc)]
    t_lb = (min(mins) if opts.allow_dropping else max(mins)) if mins else 0.0

    index: list[VarKey] = []
    names: list[str] = []
    lower: list[float] = []
    upper: list[float] = []
    integer: list[bool] = []

    def var(key: VarKey, name: str, lo: float, hi: float, is_int: bool) -> int:
        index.append(key)
        names.append(name)
        lower.append(lo)
        upper.append(hi)
        integer.append(is_int)
        return len(index) - 1

    m_ids: list[np.ndarray] = []
    offsets: list[int] = []
    for c, (cls, cc) in enumerate(zip(classes, configs, strict=True)):
        offsets.append(len(index))
        ids = [var(VarKey("m", c, j), f"m_{c}_{j}", 0.0, cls.size, True) for j in range(len(cc))]
        m_ids.append(np.asarray(ids, dtype=np.int64))
    o_ids = [
        var(VarKey("o", c), f"o_{c}", 0.0, cls.size, True) if opts.allow_dropping else -1
        for c, cls in enumerate(classes)
    ]
    v_ids: list[dict[int, int]] = []
    if has_t:
        for c, cc in enumerate(configs):
            v_ids.append(
                {
                    j: var(VarKey("v", c, j), f"v_{c}_{j}", 0.0, 1.0, True)
                    for j in range(len(cc))
                    if cc.time_s[j] > t_lb * (1 + 1e-12)
                }
            )
    if congested:
        # the link rows need "configuration j is used" for every configuration
        for c, cc in enumerate(configs):
            for j in range(len(cc)):
                if j not in v_ids[c]:
                    v_ids[c][j] = var(VarKey("v", c, j), f"v_{c}_{j}", 0.0, 1.0, True)
    t_id = -1
    t_ub = max((float(cc.time_s.max()) for cc in configs if len(cc)), default=1.0) * 1.01 + 1.0
    if deadline_s is not None:
        t_ub = deadline_s
    if has_t:
        t_id = var(VarKey("T"), "T", t_lb, t_ub, False)
    # one variable per congested link: the time its bytes take at its capacity (C10b), so
    # that each C10 row names it instead of every count on the link
    link_ids = {e: var(VarKey("l", e), f"L_{e}", 0.0, t_ub, False) for e, _up, _dn in congested}
    h_ids: list[np.ndarray] = []
    if link:
        for c, cc in enumerate(configs):
            ids = [var(VarKey("h", c, j), f"h_{c}_{j}", 0.0, 1.0, True) for j in range(len(cc))]
            h_ids.append(np.asarray(ids, dtype=np.int64))
    num_vars = len(index)

    rows = _Rows()
    for c, (cls, cc) in enumerate(zip(classes, configs, strict=True)):
        cols = m_ids[c]
        vals = np.ones(len(cols))
        if o_ids[c] >= 0:
            cols, vals = np.append(cols, o_ids[c]), np.append(vals, 1.0)
        rows.add(f"C3[{c}]", cols, vals, float(cls.size), float(cls.size))
        if has_t and v_ids[c]:
            # C5 needs v only for configurations slower than T_lb; the link rows (C10) use
            # v for every configuration, and C5v ties each v to its count in both cases.
            slow = np.asarray(
                sorted(j for j in v_ids[c] if cc.time_s[j] > t_lb * (1 + 1e-12)), dtype=np.int64
            )
            if len(slow):
                # Valid cut (the round lasts at least the class's sample-average excess over
                # T_lb); it makes the LP relaxation charge mixed configurations their mean time.
                rows.add(
                    f"C5avg[{c}]",
                    np.append(m_ids[c][slow], t_id),
                    np.append((cc.time_s[slow] - t_lb) / cls.size, -1.0),
                    -np.inf,
                    -t_lb,
                )
            for j, vid in sorted(v_ids[c].items()):
                if cc.time_s[j] > t_lb * (1 + 1e-12):
                    rows.add(
                        f"C5[{c},{j}]",
                        np.asarray([vid, t_id]),
                        np.asarray([cc.time_s[j], -1.0]),
                        -np.inf,
                        0.0,
                    )
                rows.add(
                    f"C5v[{c},{j}]",
                    np.asarray([m_ids[c][j], vid]),
                    np.asarray([1.0, -float(cls.size)]),
                    -np.inf,
                    0.0,
                )
        if link:
            # T is the time of one used configuration (h = 1): T <= t_cj + M (1 - h_cj)
            for j in range(len(cc)):
                rows.add(
                    f"C7max[{c},{j}]",
                    np.asarray([t_id, h_ids[c][j]]),
                    np.asarray([1.0, t_ub]),
                    -np.inf,
                    float(cc.time_s[j]) + t_ub,
                )
                rows.add(
                    f"C7h[{c},{j}]",
                    np.asarray([h_ids[c][j], m_ids[c][j]]),
                    np.asarray([1.0, -1.0]),
                    -np.inf,
                    0.0,
                )
    all_m = np.concatenate(m_ids) if m_ids else np.zeros(0, dtype=np.int64)
    n_c = np.concatenate(
        [np.full(len(cc), cls.samples / scale) for cls, cc in zip(classes, configs, strict=True)]
    )
    depth = np.concatenate([cc.depth for cc in configs])
    util = np.concatenate([cc.utility_per_sample for cc in configs]) * n_c
    if opts.server_mbps is not None:
        link_mb_s = opts.server_mbps / 8
        vals = np.concatenate([2 * cc.bytes_one_way / MB for cc in configs])
        rows.add("C7", np.append(all_m, t_id), np.append(vals, -link_mb_s), -np.inf, 0.0)
        all_h = np.concatenate(h_ids)
        rows.add("C7one", all_h, np.ones(len(all_h)), 1.0, 1.0)
    if congested:
        _class_link_rows(problem, rows, classes, configs, m_ids, v_ids, t_id, link_ids, congested)
    if opts.coverage_share > 0 and opts.coverage_layers > 0:
        q = opts.coverage_share
        for ly in range(L - opts.coverage_layers, L):
            vals = n_c * ((depth >= L - ly).astype(float) - q)
            rows.add(f"C8[{ly}]", all_m, vals, 0.0, np.inf)
    if opts.min_participants > 0:
        rows.add("C9", all_m, np.ones(len(all_m)), float(opts.min_participants), np.inf)

    utility = np.zeros(num_vars)
    utility[all_m] = util
    if utility_floor is not None:
        rows.add("UF", all_m, util, utility_floor / scale, np.inf)
        objective = np.zeros(num_vars)
        objective[t_id] = 1.0
        sense = "min"
    else:
        objective, sense = utility.copy(), "max"
    return MILP(
        kind="class",
        var_names=tuple(names),
        index=tuple(index),
        lower=np.asarray(lower),
        upper=np.asarray(upper),
        integer=np.asarray(integer, dtype=bool),
        matrix=rows.matrix(num_vars),
        row_names=tuple(rows.names),
        row_lower=np.asarray(rows.lower),
        row_upper=np.asarray(rows.upper),
        objective=objective,
        sense=sense,
        utility=utility,
        utility_scale=scale,
        round_time=t_id if has_t else None,
        deadline_s=deadline_s,
        time_lower_bound_s=t_lb,
        start=None,
        layout=_ClassLayout(
            num_devices=len(problem.fleet),
            classes=classes,
            catalog=catalog,
            configs=configs,
            count_offset=tuple(offsets),
        ),
    )


def _class_link_rows(
    problem: PlanningProblem,
    rows: _Rows,
    classes: tuple[DeviceClass, ...],
    configs: tuple[ClassConfigs, ...],
    m_ids: list[np.ndarray],
    v_ids: list[dict[int, int]],
    t_id: int,
    link_ids: dict[int, int],
    congested: list[tuple[int, bool, bool]],
) -> None:
    """C10[e,c,j]: compute of configuration j of class c + link e's bytes at capacity <= T.

    ``L_e`` (``link_ids[e]``) is the link's bytes at its capacity (C10b); C10avg is a
    valid cut.
    """
    topo = problem.topology
    assert topo is not None
    ids = problem.fleet.device_ids
    for e, up_c, down_c in congested:
        link = topo.links[e]
        k_e = (8 / link.up_mbps if up_c else 0.0) + (8 / link.down_mbps if down_c else 0.0)
        on = [c for c, cls in enumerate(classes) if e in topo.routes[ids[cls.members[0]]]]
        l_id = link_ids[e]
        cols = np.concatenate([m_ids[c] for c in on] + [[l_id]])
        vals = np.concatenate([configs[c].bytes_one_way / MB * k_e for c in on] + [[-1.0]])
        rows.add(f"C10b[{e}]", cols, vals, 0.0, 0.0)
        for c in on:
            prof = classes[c].profile
            d8, u8 = 8 / prof.downlink_mbps, 8 / prof.uplink_mbps
            own = (0.0 if down_c else d8) + (0.0 if up_c else u8)
            b = configs[c].bytes_one_way / MB
            comp = configs[c].time_s - b * (d8 + u8) + b * own
            # Valid cut, as C5avg: the round lasts at least the link's bytes plus the class's
            # sample-average compute; the per-configuration rows below are weak in the LP.
            rows.add(
                f"C10avg[{e},{c}]",
                np.concatenate([m_ids[c], [l_id, t_id]]),
                np.concatenate([np.maximum(comp, 0.0) / classes[c].size, [1.0, -1.0]]),
                -np.inf,
                0.0,
            )
            for j in range(len(configs[c])):
                rows.add(
                    f"C10[{e},{c},{j}]",
                    np.asarray([l_id, v_ids[c][j], t_id]),
                    np.asarray([1.0, comp[j], -1.0]),
                    -np.inf,
                    0.0,
                )


# -- decoding ------------------------------------------------------------------------------


def decode(milp: MILP, values: Sequence[float] | np.ndarray) -> tuple[Configuration, ...]:
    """One configuration ``(layers, ranks)`` per device, in fleet order (``((), ())``: out)."""
    v = np.asarray(values, dtype=float)
    layout = milp.layout
    if isinstance(layout, _DeviceLayout):
        N, L, K = layout.num_devices, layout.num_layers, len(layout.ranks)
        x = v[: N * L * K].reshape(N, L, K) > 0.5
        out: list[Configuration] = []
        for i in range(N):
            layers = tuple(int(ly) for ly in np.flatnonzero(x[i].any(axis=1)))
            ranks = tuple(layout.ranks[int(np.argmax(x[i, ly]))] for ly in layers)
            out.append((layers, ranks))
        return tuple(out)
    counts = [
        np.rint(v[off : off + len(cc)]).astype(np.int64)
        for off, cc in zip(layout.count_offset, layout.configs, strict=True)
    ]
    return expand_counts(layout.classes, layout.catalog, layout.configs, counts, layout.num_devices)


def round_time_of(milp: MILP, values: Sequence[float] | np.ndarray) -> float:
    """The round time a solution implies: its slowest participant (at least
    ``time_lower_bound_s``); 0 when nobody participates."""
    v = np.asarray(values, dtype=float)
    layout = milp.layout
    t = 0.0
    if isinstance(layout, _DeviceLayout):
        rows = milp.rows_named("C5")
        if rows:
            activity = milp.matrix[rows] @ v
            if milp.round_time is not None:
                activity = activity + v[milp.round_time]
            participants = v[[k for k, key in enumerate(milp.index) if key.kind == "z"]] > 0.5
            if participants.any():
                t = float(activity[participants].max())
                shared = milp.rows_named("C10")
                if shared and milp.round_time is not None:
                    act = milp.matrix[shared] @ v + v[milp.round_time]
                    t = max(t, float(act.max()))
    else:
        for off, cc in zip(layout.count_offset, layout.configs, strict=True):
            used = np.rint(v[off : off + len(cc)]) > 0
            if used.any():
                t = max(t, float(cc.time_s[used].max()))
        shared = milp.rows_named("C10")
        if shared and milp.round_time is not None and t > 0:
            # a configuration's link rows count only when some member uses it
            used = v.copy()
            for k, key in enumerate(milp.index):
                if key.kind == "v":
                    used[k] = float(np.rint(v[layout.count_offset[key.owner] + key.a]) > 0)
            act = milp.matrix[shared] @ used + v[milp.round_time]
            t = max(t, float(act.max()))
    if t == 0.0:
        return 0.0
    return max(t, milp.time_lower_bound_s)
