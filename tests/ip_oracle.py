"""An exhaustive oracle for the exact planner's tests (tiny instances only).

It enumerates every configuration of every device with the cost model's
:meth:`~legend.planner.costs.CostModel.evaluate` and ``PlanningProblem.utility`` (no code of
the formulation), checks the constraints C1-C9 literally and returns the best objective.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from legend.planner.api import Configuration, PlanningProblem


@dataclass(frozen=True)
class _Option:
    config: Configuration
    time_s: float
    memory_bytes: float
    bytes_both: float
    utility: float
    depth: int


def device_options(problem: PlanningProblem, index: int) -> list[_Option]:
    opts = problem.options
    L = problem.spec.num_layers
    device = problem.fleet.devices[index]
    out = []
    for d in range(opts.min_depth, L + 1):
        layers = tuple(range(L - d, L))
        for ranks in itertools.product(problem.job.ranks, repeat=d):
            if opts.monotone_ranks and any(b < a for a, b in itertools.pairwise(ranks)):
                continue
            cost = problem.costs.evaluate(device, layers, ranks)
            if cost.memory_bytes > device.memory_bytes:
                continue
            out.append(
                _Option(
                    config=(layers, ranks),
                    time_s=cost.time_s,
                    memory_bytes=cost.memory_bytes,
                    bytes_both=cost.upload_bytes + cost.download_bytes,
                    utility=problem.utility(index, layers, ranks),
                    depth=d,
                )
            )
    if opts.allow_dropping:
        out.append(_Option(((), ()), 0.0, 0.0, 0.0, 0.0, 0))
    return out


@dataclass(frozen=True)
class OracleResult:
    objective: float
    utility: float
    round_time_s: float
    configurations: tuple[Configuration, ...]


def solve_exhaustively(
    problem: PlanningProblem, *, utility_floor: float | None = None
) -> OracleResult | None:
    """Best plan of ``problem.options.objective`` by enumeration; None when infeasible.

    ``utility_floor`` overrides the O2 floor (by default it is derived as the planner does).
    """
    opts = problem.options
    L = problem.spec.num_layers
    per_device = [device_options(problem, i) for i in range(len(problem.fleet))]
    samples = [d.num_samples for d in problem.fleet.devices]
    combos = []
    for choice in itertools.product(*per_device):
        participants = [o for o in choice if o.depth > 0]
        if not participants:
            continue
        t = max(o.time_s for o in participants)
        if opts.server_mbps is not None:
            # the round lasts at least as long as the server's link needs for its bytes
            t = max(t, sum(o.bytes_both for o in choice) / (opts.server_mbps * 1e6 / 8))
        if opts.objective == "deadline" and t > opts.deadline_s * (1 + 1e-9):
            continue
        if opts.coverage_share > 0 and opts.coverage_layers > 0:
            total = sum(n for n, o in zip(samples, choice, strict=True) if o.depth > 0)
            ok = True
            for ly in range(L - opts.coverage_layers, L):
                covered = sum(n for n, o in zip(samples, choice, strict=True) if o.depth >= L - ly)
                if covered < opts.coverage_share * total - 1e-9:
                    ok = False
                    break
            if not ok:
                continue
        if len(participants) < opts.min_participants:
            continue
        if opts.min_sample_share > 0:
            held = sum(n for n, o in zip(samples, choice, strict=True) if o.depth > 0)
            if held < opts.min_sample_share * sum(samples) * (1 - 1e-9):
                continue
        u = sum(o.utility for o in choice)
        if opts.objective == "progress":
            # the denominator: round time, the server's overhead and the priced bytes
            moved_mb = sum(o.bytes_both for o in choice) / 1e6
            t_den = t + opts.server_overhead_s + opts.seconds_per_mb * moved_mb
            combos.append((u, t_den, tuple(o.config for o in choice)))
            continue
        combos.append((u, t, tuple(o.config for o in choice)))
    if not combos:
        return None
    if opts.objective == "deadline":
        u, t, cfg = max(combos, key=lambda c: c[0])
        return OracleResult(objective=u, utility=u, round_time_s=t, configurations=cfg)
    if opts.objective in ("rate", "progress"):
        # under progress ``t`` is the priced denominator, not the round time
        u, t, cfg = max(combos, key=lambda c: c[0] / c[1])
        return OracleResult(objective=u / t, utility=u, round_time_s=t, configurations=cfg)
    if utility_floor is None:
        utility_floor = (
            opts.utility_floor
            if opts.utility_floor is not None
            else opts.utility_floor_share * max(c[0] for c in combos)
        )
    feasible = [c for c in combos if c[0] >= utility_floor * (1 - 1e-9)]
    if not feasible:
        return None
    u, t, cfg = min(feasible, key=lambda c: c[1])
    return OracleResult(objective=t, utility=u, round_time_s=t, configurations=cfg)


def close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)
