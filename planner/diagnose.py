"""Why a round cannot be planned: per device, then fleet-wide.

A device is *blocked* when even its smallest configuration (the top ``min_depth`` layers at
the lowest rank of the grid, which is also the fastest, lightest and smallest one) breaks
its memory or the round deadline; the explanation names the constraint and by how much:

    device 'phone-3': memory: smallest configuration (top 1 layer at rank 2) needs 1.23 GB,
    device has 0.50 GB (short by 0.73 GB)

When no single device is to blame, the fleet-wide constraints are checked against the
smallest configurations: the server link (C7), layer coverage (C8), the minimum number of
participants (C9) and, for objective O2, the utility floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from legend.planner.costs import ConfigCost
from legend.planner.profiles import DeviceProfile
from legend.planner.types import Configuration, PlanningProblem

__all__ = [
    "DeviceBlock",
    "blocked_devices",
    "config_blocks",
    "explain_infeasibility",
    "fleet_reasons",
    "smallest_configuration",
]


@dataclass(frozen=True, kw_only=True)
class DeviceBlock:
    """One device that cannot run its smallest configuration, and why."""

    device_id: str
    constraint: str  # "memory" or "deadline"
    needed: float
    available: float

    def __str__(self) -> str:
        short = self.needed - self.available
        if self.constraint == "memory":
            return (
                f"device {self.device_id!r}: memory: smallest configuration needs "
                f"{self.needed / 1e9:.2f} GB, device has {self.available / 1e9:.2f} GB "
                f"(short by {short / 1e9:.2f} GB)"
            )
        return (
            f"device {self.device_id!r}: deadline: smallest configuration takes "
            f"{self.needed:.3g} s, the deadline is {self.available:.3g} s "
            f"(over by {short:.3g} s)"
        )


def smallest_configuration(problem: PlanningProblem) -> Configuration:
    """The top ``min_depth`` layers at the lowest rank of the grid."""
    L, d = problem.spec.num_layers, problem.options.min_depth
    return tuple(range(L - d, L)), (problem.job.ranks[0],) * d


def config_blocks(
    cost: ConfigCost, device: DeviceProfile, deadline_s: float | None, *, rel_tol: float = 0.0
) -> list[DeviceBlock]:
    """The constraints a configuration of ``cost`` breaks on ``device``: its memory, and
    the deadline when one is given (``rel_tol``: relative slack on both)."""
    out = []
    if cost.memory_bytes > device.memory_bytes * (1 + rel_tol):
        out.append(
            DeviceBlock(
                device_id=device.device_id,
                constraint="memory",
                needed=cost.memory_bytes,
                available=device.memory_bytes,
            )
        )
    if deadline_s is not None and cost.time_s > deadline_s * (1 + rel_tol):
        out.append(
            DeviceBlock(
                device_id=device.device_id,
                constraint="deadline",
                needed=cost.time_s,
                available=deadline_s,
            )
        )
    return out


def _blocks(
    problem: PlanningProblem, device: DeviceProfile, deadline_s: float | None
) -> list[DeviceBlock]:
    layers, ranks = smallest_configuration(problem)
    return config_blocks(problem.costs.evaluate(device, layers, ranks), device, deadline_s)


def blocked_devices(
    problem: PlanningProblem, deadline_s: float | None = None
) -> tuple[DeviceBlock, ...]:
    """Every (device, constraint) that rules out even the smallest configuration."""
    from legend.planner.catalog import fleet_costs

    layers, ranks = smallest_configuration(problem)
    fc = fleet_costs(problem)
    # memory is the same for every device; time is affine in depth and rank sum
    need = problem.costs.evaluate(problem.fleet.devices[0], layers, ranks).memory_bytes
    time = fc.time_const + fc.time_per_layer * len(layers) + fc.time_per_rank * sum(ranks)
    suspect = fc.memory_capacity < need * (1 + 1e-9)
    if deadline_s is not None:
        suspect |= time > deadline_s * (1 - 1e-9)
    out: list[DeviceBlock] = []
    for i in np.flatnonzero(suspect):
        out.extend(_blocks(problem, problem.fleet.devices[int(i)], deadline_s))
    return tuple(out)


def _max_depth(problem: PlanningProblem, device: DeviceProfile, deadline_s: float | None) -> int:
    """Deepest configuration at the lowest rank that fits memory and the deadline (0: none)."""
    L, r0 = problem.spec.num_layers, problem.job.ranks[0]
    best = 0
    for d in range(problem.options.min_depth, L + 1):
        cost = problem.costs.evaluate(device, tuple(range(L - d, L)), (r0,) * d)
        if cost.memory_bytes > device.memory_bytes:
            break
        if deadline_s is not None and cost.time_s > deadline_s:
            break
        best = d
    return best


def fleet_reasons(
    problem: PlanningProblem,
    deadline_s: float | None = None,
    *,
    utility_floor: float | None = None,
    max_utility: float | None = None,
) -> tuple[str, ...]:
    """Fleet-wide constraints that the smallest configurations already break."""
    opts = problem.options
    devices = problem.fleet.devices
    able = [d for d in devices if not _blocks(problem, d, deadline_s)]
    out: list[str] = []
    if opts.min_participants > len(able):
        out.append(
            f"min participants: only {len(able)} device(s) can run their smallest "
            f"configuration, {opts.min_participants} required"
        )
    if opts.allow_dropping and opts.min_sample_share > 0:
        total = sum(d.num_samples for d in devices)
        held = sum(d.num_samples for d in able)
        if held < opts.min_sample_share * total * (1 - 1e-9):
            out.append(
                f"min sample share: the devices that can run their smallest configuration "
                f"hold {held / total:.1%} of the samples, min_sample_share requires "
                f"{opts.min_sample_share:.1%}; lower min_sample_share"
                + (" or relax the deadline" if deadline_s is not None else "")
            )
    layers, ranks = smallest_configuration(problem)
    if opts.server_mbps is not None and deadline_s is not None:
        both_ways = sorted(2 * problem.costs.evaluate(d, layers, ranks).upload_bytes for d in able)
        need = (
            sum(both_ways) if not opts.allow_dropping else sum(both_ways[: opts.min_participants])
        )
        capacity = opts.server_mbps * 1e6 / 8 * deadline_s
        if need > capacity:
            out.append(
                f"server link: the smallest configurations move {need / 1e6:.3g} MB, the "
                f"server link carries {capacity / 1e6:.3g} MB within the deadline of "
                f"{deadline_s:.3g} s (short by {(need - capacity) / 1e6:.3g} MB); raise "
                "server_mbps or the deadline"
            )
    if opts.coverage_share > 0 and opts.coverage_layers > 0 and not opts.allow_dropping:
        D = opts.coverage_layers
        total = sum(d.num_samples for d in devices)
        reach = sum(d.num_samples for d in devices if _max_depth(problem, d, deadline_s) >= D)
        if reach < opts.coverage_share * total - 1e-9:
            out.append(
                f"coverage: devices holding {reach / total:.1%} of the samples can train "
                f"layer {problem.spec.num_layers - D} (the {D}th from the output) within "
                f"memory and deadline; coverage_share requires {opts.coverage_share:.1%}"
            )
    if utility_floor is not None and max_utility is not None and utility_floor > max_utility:
        out.append(
            f"utility floor: {utility_floor:.6g} exceeds the highest reachable utility "
            f"{max_utility:.6g}; lower utility_floor or utility_floor_share"
        )
    return tuple(out)


def explain_infeasibility(
    problem: PlanningProblem,
    deadline_s: float | None = None,
    *,
    utility_floor: float | None = None,
    max_utility: float | None = None,
) -> tuple[str, ...]:
    """One line per reason the program has no solution (never empty)."""
    # Blocked devices explain infeasibility directly, or (with dropping) why they could not
    # help meet the fleet-wide rows.
    reasons: list[str] = [str(b) for b in blocked_devices(problem, deadline_s)]
    reasons.extend(
        fleet_reasons(problem, deadline_s, utility_floor=utility_floor, max_utility=max_utility)
    )
    if not reasons:
        reasons.append(
            "the constraints together admit no plan, although each device can run its "
            "smallest configuration: relax the deadline, server_mbps, coverage, "
            "min_participants or min_sample_share"
        )
    return tuple(reasons)
