"""Device classes: solve fleets of thousands of devices by planning per class.

Real fleets have few distinct device types. Devices with equal profiles form a *class*;
per class the configurations that are not dominated (Pareto-efficient) are enumerated once,
and the integer program chooses how many devices of each class take each configuration
(:func:`legend.planner.formulation.formulate` builds that program). The per-device program
remains the reference: on fleets where both run, the two reach the same optimum.

Grouping
--------
Exact classes (the default) group devices whose profiles are equal in every field the
program reads: ``tflops``, ``memory_gb``, ``uplink_mbps``, ``downlink_mbps``,
``local_steps`` and ``num_samples``. The optimum is then exactly the per-device optimum.

Conservative bucketing (``PlannerOptions.class_bucket_ratio = rho > 1``) rounds
``tflops``, ``memory_gb`` and the combined link rate ``1 / (1/up + 1/down)`` (transfers
cost ``bytes * (1/up + 1/down)``) *down* to the geometric grid ``rho**k`` before grouping;
the class profile gets equal up- and downlinks with that combined rate. A plan computed
for the rounded-down profile is feasible for every member (each member is at least as
fast and has at least as much memory and bandwidth), so no plan ever breaks a member's
deadline or memory; the price is some optimality, partly won back by
:func:`polish_configurations`. Under bucketing, ``num_samples`` is not part of the class
key (unless the coverage constraint C8 is on, which needs exact per-device samples): the
program weighs each member's utility with the class's mean sample count, and expansion
hands the higher-utility configurations to the members with more samples, so the plan's
true utility is at least what the program counted (rearrangement inequality).

Configurations
--------------
With the cost model of :mod:`legend.planner.costs`, every layer has the same coefficients
and every coefficient is affine in the rank, so a configuration's time, bytes and memory
depend only on its depth ``d`` and rank sum ``S``. For each ``(d, S)`` a dynamic program
over the layers (from the output down, ranks non-decreasing toward the output when C4 is
on) finds the rank vector of highest utility. Per class, configurations that exceed the
class's memory (C6) or a fixed deadline (C5) are removed, and the rest are filtered to the
Pareto front of (time: min, utility: max), plus bytes (min) when the server link C7 is on
and covered depth ``min(d, D)`` (max) when the coverage constraint C8 is on. Memory is not a
front dimension: it is a per-class capacity, so using less of it never helps once a
configuration fits. :func:`class_formulation_available` says whether the cost table has
that structure (a custom cost model might not); otherwise the per-device program is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from legend.planner.api import Configuration, rank_gain
from legend.planner.errors import PlannerInputError
from legend.planner.profiles import DeviceProfile

if TYPE_CHECKING:
    from legend.planner.api import PlanningProblem
    from legend.planner.costs import CostTable

__all__ = [
    "AUTO_MIN_DEVICES_PER_CLASS",
    "ClassConfigs",
    "ConfigCatalog",
    "DeviceClass",
    "bucket_down",
    "class_formulation_available",
    "class_pareto_configs",
    "decoupled_best_rate",
    "enumerate_configurations",
    "expand_counts",
    "group_devices",
    "polish_configurations",
    "resolve_use_classes",
]

# `use_classes=None` picks the class program when the fleet has at least this many
# devices per class on average (and the cost table allows it).
AUTO_MIN_DEVICES_PER_CLASS = 2.0


@dataclass(frozen=True, kw_only=True)
class DeviceClass:
    """Devices planned together.

    ``members`` are fleet indices, ordered by samples (descending, then fleet order);
    ``profile`` is the profile the program plans for (rounded down under bucketing);
    ``samples`` is the data weight per member the program uses (exact, or the mean).
    """

    members: tuple[int, ...]
    profile: DeviceProfile
    samples: float

    @property
    def size(self) -> int:
        return len(self.members)


def bucket_down(value: float, ratio: float) -> float:
    """Round ``value > 0`` down to the geometric grid ``ratio**k`` (``k`` integer)."""
    if not ratio > 1:
        raise PlannerInputError(f"`class_bucket_ratio` must be > 1, got {ratio!r}")
    k = math.floor(math.log(value) / math.log(ratio) + 1e-12)
    edge = ratio**k
    while edge > value:
        k -= 1
        edge = ratio**k
    return edge


def group_devices(
    problem: PlanningProblem,
    *,
    bucket_ratio: float | None = None,
    exact_samples: bool | None = None,
) -> tuple[DeviceClass, ...]:
    """Group the fleet into classes (see the module docstring); deterministic order.

    Parameters
    ----------
    bucket_ratio
        ``None``: exact classes; ``rho > 1``: round hardware figures down to ``rho**k``.
    exact_samples
        Whether ``num_samples`` is part of the class key. Default: always for exact
        classes; under bucketing only when the coverage constraint C8 is on.
    """
    opts = problem.options
    if exact_samples is None:
        exact_samples = bucket_ratio is None or (
            opts.coverage_share > 0 and opts.coverage_layers > 0
        )
    job = problem.job
    shared = (
        [e for e, _up, _down in problem.topology.congested(problem.fleet)]
        if problem.topology is not None
        else None
    )
    groups: dict[tuple[object, ...], list[int]] = {}
    profiles: dict[tuple[object, ...], DeviceProfile] = {}
    for index, device in enumerate(problem.fleet.devices):
        hw: tuple[float, ...]
        if bucket_ratio is None:
            hw = (device.tflops, device.memory_gb, device.uplink_mbps, device.downlink_mbps)
        else:
            # Transfers cost bytes * (1/up + 1/down): bucket the combined link rate and give
            # the class equal up and down links with the same (rounded-down) combination.
            link = 1.0 / (1.0 / device.uplink_mbps + 1.0 / device.downlink_mbps)
            both = 2.0 * bucket_down(link, bucket_ratio)
            hw = (
                bucket_down(device.tflops, bucket_ratio),
                bucket_down(device.memory_gb, bucket_ratio),
                both,
                both,
            )
        steps = job.steps_for(device)
        key: tuple[object, ...] = (*hw, steps, device.num_samples if exact_samples else None)
        if shared is not None:
            # classes are split by route over the topology's congested links
            key = (*key, tuple(e for e in shared if e in problem.topology.routes[device.device_id]))  # type: ignore[union-attr]
        if key not in groups:
            groups[key] = []
            profiles[key] = DeviceProfile(
                device_id=f"class-{len(profiles)}",
                tflops=float(hw[0]),
                memory_gb=float(hw[1]),
                uplink_mbps=float(hw[2]),
                downlink_mbps=float(hw[3]),
                num_samples=device.num_samples,
                local_steps=steps,
            )
        groups[key].append(index)
    devices = problem.fleet.devices
    out = []
    for key, members in groups.items():
        ordered = tuple(sorted(members, key=lambda i: (-devices[i].num_samples, i)))
        mean = sum(devices[i].num_samples for i in members) / len(members)
        profile = replace(profiles[key], num_samples=max(1, round(mean)))
        out.append(DeviceClass(members=ordered, profile=profile, samples=mean))
    return tuple(out)


# -- configurations ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ConfigCatalog:
    """Device-independent candidate configurations: one per (depth, rank sum).

    ``utility_per_sample[j] = sum_l w_l g(r_l)`` is the best over rank vectors of depth
    ``depth[j]`` and rank sum ``rank_sum[j]``; ``ranks[j]`` is that vector (bottom to top).
    """

    depth: np.ndarray
    rank_sum: np.ndarray
    utility_per_sample: np.ndarray
    ranks: tuple[tuple[int, ...], ...]
    num_layers: int

    def __len__(self) -> int:
        return len(self.ranks)

    def configuration(self, j: int) -> Configuration:
        d = int(self.depth[j])
        return tuple(range(self.num_layers - d, self.num_layers)), self.ranks[j]


def _affine_in_rank(
    coef: Sequence[Sequence[float]], ranks: Sequence[int]
) -> tuple[float, float] | None:
    """``(alpha, beta)`` with ``coef[l][k] == alpha + beta * ranks[k]`` for every layer, or None."""
    first = np.asarray(coef[0], dtype=float)
    table = np.asarray(coef, dtype=float)
    scale = max(1.0, float(np.abs(table).max()))
    if not np.allclose(table, first[None, :], rtol=1e-9, atol=1e-12 * scale):
        return None
    r = np.asarray(ranks, dtype=float)
    beta = 0.0 if len(r) == 1 else float((first[-1] - first[0]) / (r[-1] - r[0]))
    alpha = float(first[0] - beta * r[0])
    if not np.allclose(alpha + beta * r, first, rtol=1e-9, atol=1e-12 * scale):
        return None
    return alpha, beta


@dataclass(frozen=True, kw_only=True)
class _AffineCosts:
    time: tuple[float, float, float]  # const, per layer, per unit rank (seconds)
    memory: tuple[float, float, float]  # bytes
    bytes: tuple[float, float, float]  # one direction, bytes


def _affine_costs(table: CostTable, ranks: Sequence[int]) -> _AffineCosts | None:
    parts = []
    for const, coef in (
        (table.time_const_s, table.time_coef_s),
        (table.memory_const_bytes, table.memory_coef_bytes),
        (table.bytes_const, table.bytes_coef),
    ):
        ab = _affine_in_rank(coef, ranks)
        if ab is None:
            return None
        parts.append((const, ab[0], ab[1]))
    return _AffineCosts(time=parts[0], memory=parts[1], bytes=parts[2])


def class_formulation_available(problem: PlanningProblem) -> bool:
    """True when every device's cost table is layer-independent and affine in the rank."""
    device = problem.fleet.devices[0]
    return _affine_costs(problem.costs.table(device), problem.job.ranks) is not None


def resolve_use_classes(problem: PlanningProblem) -> bool:
    """Whether to build the class program: ``options.use_classes``, or automatic when None."""
    choice = problem.options.use_classes
    available = class_formulation_available(problem)
    if choice is True and not available:
        raise PlannerInputError(
            "`use_classes` is True but the cost table is not the same for every layer and "
            "affine in the rank; set use_classes=None or False to plan per device"
        )
    if choice is not None:
        return bool(choice)
    if not available:
        return False
    classes = group_devices(problem, bucket_ratio=problem.options.class_bucket_ratio)
    if problem.options.class_bucket_ratio is not None:
        return True
    return len(problem.fleet) >= AUTO_MIN_DEVICES_PER_CLASS * len(classes)


def enumerate_configurations(problem: PlanningProblem) -> ConfigCatalog:
    """Best rank vector per (depth, rank sum), by dynamic programming over the layers.

    ``best[d][k, S]`` is the highest ``sum w_l g(r_l)`` of a configuration of depth ``d``
    whose bottom layer ``L-d`` has rank index ``k`` and whose ranks sum to ``S``. Going one
    layer down, the new bottom rank index ``k'`` must satisfy ``k' <= k`` under C4.
    """
    L = problem.spec.num_layers
    grid = np.asarray(problem.job.ranks, dtype=np.int64)
    K = len(grid)
    w = problem.layer_weights
    gain = np.asarray([rank_gain(int(r)) for r in grid])
    monotone = problem.options.monotone_ranks
    s_max = int(grid[-1]) * L
    neg = -np.inf
    best = np.full((K, s_max + 1), neg)
    for k in range(K):
        best[k, grid[k]] = w[L - 1] * gain[k]
    layers_best = [best]
    backs: list[np.ndarray] = [np.full((K, s_max + 1), -1, dtype=np.int64)]
    for d in range(1, L):
        prev = layers_best[-1]
        if monotone:
            # suffix max over k >= k' and its argmax
            suf = prev.copy()
            arg = np.tile(np.arange(K)[:, None], (1, s_max + 1))
            for k in range(K - 2, -1, -1):
                better = suf[k + 1] > suf[k]
                suf[k] = np.where(better, suf[k + 1], suf[k])
                arg[k] = np.where(better, arg[k + 1], arg[k])
        else:
            m = prev.max(axis=0)
            a = prev.argmax(axis=0)
            suf = np.tile(m, (K, 1))
            arg = np.tile(a, (K, 1))
        new = np.full((K, s_max + 1), neg)
        back = np.full((K, s_max + 1), -1, dtype=np.int64)
        weight = w[L - 1 - d]
        for k in range(K):
            r = int(grid[k])
            new[k, r:] = suf[k, : s_max + 1 - r] + weight * gain[k]
            back[k, r:] = arg[k, : s_max + 1 - r]
        layers_best.append(new)
        backs.append(back)

    depth_l: list[int] = []
    sums: list[int] = []
    utils: list[float] = []
    vectors: list[tuple[int, ...]] = []
    for d in range(problem.options.min_depth, L + 1):
        table = layers_best[d - 1]
        top = table.max(axis=0)
        which = table.argmax(axis=0)
        for s in np.flatnonzero(np.isfinite(top)):
            # walk back from the bottom layer to the top one
            k = int(which[s])
            ranks_bottom_up = []
            ss = int(s)
            for dd in range(d - 1, -1, -1):
                ranks_bottom_up.append(int(grid[k]))
                prev_k = int(backs[dd][k, ss])
                ss -= int(grid[k])
                k = prev_k
            depth_l.append(d)
            sums.append(int(s))
            utils.append(float(top[s]))
            vectors.append(tuple(ranks_bottom_up))
    return ConfigCatalog(
        depth=np.asarray(depth_l, dtype=np.int64),
        rank_sum=np.asarray(sums, dtype=np.int64),
        utility_per_sample=np.asarray(utils, dtype=float),
        ranks=tuple(vectors),
        num_layers=L,
    )


@dataclass(frozen=True, kw_only=True)
class ClassConfigs:
    """The Pareto-efficient configurations of one class (indices into the catalog)."""

    index: np.ndarray
    time_s: np.ndarray
    bytes_one_way: np.ndarray
    memory_bytes: np.ndarray
    utility_per_sample: np.ndarray
    depth: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


def class_pareto_configs(
    problem: PlanningProblem,
    device_class: DeviceClass,
    catalog: ConfigCatalog,
    *,
    deadline_s: float | None,
) -> ClassConfigs:
    """Configurations of ``catalog`` that fit the class and are not dominated."""
    costs = _affine_costs(problem.costs.table(device_class.profile), problem.job.ranks)
    if costs is None:
        raise PlannerInputError(
            "the class program needs a cost table that is the same for every layer and "
            "affine in the rank; plan per device (use_classes=False)"
        )
    d = catalog.depth.astype(float)
    s = catalog.rank_sum.astype(float)
    time = costs.time[0] + d * costs.time[1] + s * costs.time[2]
    memory = costs.memory[0] + d * costs.memory[1] + s * costs.memory[2]
    nbytes = costs.bytes[0] + d * costs.bytes[1] + s * costs.bytes[2]
    util = catalog.utility_per_sample
    # The affine form rounds differently from CostModel.evaluate; allow 1e-9 relative so
    # that a configuration exactly at the limit (by evaluate) is kept.
    ok = memory <= device_class.profile.memory_bytes * (1 + 1e-9)
    if deadline_s is not None:
        ok &= time <= deadline_s * (1 + 1e-9)
    idx = np.flatnonzero(ok)
    opts = problem.options
    extra: list[np.ndarray] = []
    if opts.server_mbps is not None:
        extra.append(nbytes[idx])  # minimise
    if opts.coverage_share > 0 and opts.coverage_layers > 0:
        extra.append(-np.minimum(catalog.depth[idx], opts.coverage_layers).astype(float))
    if _on_congested_link(problem, device_class):
        # The link rows (C10) charge compute and the link's bytes separately: a slower
        # configuration with fewer bytes can shorten everyone's contention.
        prof = device_class.profile
        compute = time - nbytes / prof.downlink_bps - nbytes / prof.uplink_bps
        extra += [nbytes[idx], compute[idx]]
    keep = _pareto(time[idx], util[idx], extra)
    sel = idx[keep]
    return ClassConfigs(
        index=sel,
        time_s=time[sel],
        bytes_one_way=nbytes[sel],
        memory_bytes=memory[sel],
        utility_per_sample=util[sel],
        depth=catalog.depth[sel],
    )


def _on_congested_link(problem: PlanningProblem, device_class: DeviceClass) -> bool:
    """Whether the class's route crosses a link congested under the topology."""
    topo = problem.topology
    if topo is None:
        return False
    route = topo.routes[problem.fleet.devices[device_class.members[0]].device_id]
    return any(e in route for e, _up, _down in topo.congested(problem.fleet))


def _pareto(time: np.ndarray, util: np.ndarray, extra: list[np.ndarray]) -> np.ndarray:
    """Indices of points not dominated in (time min, util max, extra min...)."""
    n = len(time)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if not extra:
        # Sort by time ascending (utility descending on ties); keep strict utility records.
        order = np.lexsort((-util, time))
        u = util[order]
        running = np.maximum.accumulate(u)
        prev = np.concatenate(([-np.inf], running[:-1]))
        return np.sort(order[u > prev + 1e-12 * np.maximum(1.0, np.abs(u))])
    costs = np.column_stack([time, -util, *extra])
    order = np.lexsort(tuple(costs[:, c] for c in range(costs.shape[1] - 1, -1, -1)))
    kept: list[int] = []
    kept_costs = np.empty((0, costs.shape[1]))
    for i in order:
        row = costs[i]
        if kept and np.any(np.all(kept_costs <= row + 1e-12 * np.abs(row), axis=1)):
            continue
        kept.append(int(i))
        kept_costs = np.vstack([kept_costs, row])
    return np.sort(np.asarray(kept, dtype=np.int64))


def expand_counts(
    classes: Sequence[DeviceClass],
    catalog: ConfigCatalog,
    per_class: Sequence[ClassConfigs],
    counts: Sequence[np.ndarray],
    num_devices: int,
) -> tuple[Configuration, ...]:
    """Per-device configurations from per-class counts, deterministically.

    Within a class, members (ordered by samples, descending) take configurations in order
    of decreasing utility (ties: shorter time first); members left over sit out.
    """
    out: list[Configuration] = [((), ())] * num_devices
    for cls, configs, cnt in zip(classes, per_class, counts, strict=True):
        order = np.lexsort((configs.time_s, -configs.utility_per_sample))
        members = iter(cls.members)
        for j in order:
            for _ in range(int(cnt[j])):
                out[next(members)] = catalog.configuration(int(configs.index[j]))
    return tuple(out)


def decoupled_best_rate(problem: PlanningProblem, *, max_work: int = 5_000_000) -> float | None:
    """``max_tau U(tau) / tau`` with every class at its best configuration within ``tau``.

    This is the exact optimum of the rate objective (O3) when no constraint couples devices
    (C7, C8, C9), and an upper bound otherwise; the Dinkelbach iterations start from it.
    Returns ``None`` when the cost table has no class structure, nothing fits, or the
    candidate search would exceed ``max_work`` (classes x candidate round times).
    """
    if not class_formulation_available(problem):
        return None
    classes = group_devices(problem, bucket_ratio=problem.options.class_bucket_ratio)
    catalog = enumerate_configurations(problem)
    fronts = [class_pareto_configs(problem, c, catalog, deadline_s=None) for c in classes]
    fronts_times = [f.time_s for f in fronts if len(f)]
    if not fronts_times:
        return None
    taus = np.unique(np.concatenate(fronts_times))
    if len(taus) * len(classes) > max_work:
        return None
    total = np.zeros(len(taus))
    feasible = np.ones(len(taus), dtype=bool)
    for cls, front in zip(classes, fronts, strict=True):
        if len(front) == 0:
            if not problem.options.allow_dropping:
                return None
            continue
        order = np.argsort(front.time_s, kind="stable")
        t = front.time_s[order]
        best_u = np.maximum.accumulate(front.utility_per_sample[order])
        pos = np.searchsorted(t, taus, side="right") - 1
        fits = pos >= 0
        if not problem.options.allow_dropping:
            feasible &= fits
        total += np.where(fits, best_u[np.maximum(pos, 0)], 0.0) * cls.samples * cls.size
    rates = np.where(feasible & (total > 0), total / taus, -np.inf)
    best = float(rates.max())
    return best if math.isfinite(best) else None


def polish_configurations(
    problem: PlanningProblem,
    configurations: Sequence[Configuration],
    round_time_s: float | None = None,
) -> tuple[Configuration, ...]:
    """Give each participant its best configuration within ``round_time_s`` (default: the
    plan's own round time on the true profiles) on its *own* profile, after planning with
    rounded-down class profiles.

    A participant moves to the highest-utility configuration of the catalogue that fits its
    memory, finishes within ``round_time_s`` and is at least as deep as before (so coverage
    C8 still holds); the round time does not grow. Not applied with the server link (C7),
    whose bytes couple the devices, nor to devices routed through a congested link of the
    topology (C10 couples them in the same way). Returns the configurations unchanged when
    the cost table has no class structure.
    """
    if problem.options.server_mbps is not None or not class_formulation_available(problem):
        return tuple(configurations)
    devices = problem.fleet.devices
    if round_time_s is None:
        round_time_s = max(
            (problem.costs.evaluate(devices[i], *c).time_s for i, c in enumerate(configurations)),
            default=0.0,
        )
    catalog = enumerate_configurations(problem)
    d = catalog.depth.astype(float)
    s = catalog.rank_sum.astype(float)
    out = list(configurations)
    shared: set[str] = set()
    if problem.topology is not None:
        for e, _up, _down in problem.topology.congested(problem.fleet):
            shared.update(problem.topology.devices_on(e))
    for i, (layers, _ranks) in enumerate(configurations):
        if not layers or devices[i].device_id in shared:
            continue
        device = problem.fleet.devices[i]
        costs = _affine_costs(problem.costs.table(device), problem.job.ranks)
        assert costs is not None
        time = costs.time[0] + d * costs.time[1] + s * costs.time[2]
        memory = costs.memory[0] + d * costs.memory[1] + s * costs.memory[2]
        ok = (
            (time <= round_time_s * (1 + 1e-12))
            & (memory <= device.memory_bytes)
            & (catalog.depth >= len(layers))
        )
        if not ok.any():
            continue
        util = np.where(ok, catalog.utility_per_sample, -np.inf)
        j = int(np.argmax(util))
        current = sum(
            problem.layer_weights[layer] * rank_gain(r)
            for layer, r in zip(layers, _ranks, strict=True)
        )
        if util[j] > current * (1 + 1e-12):
            out[i] = catalog.configuration(j)
    return tuple(out)
