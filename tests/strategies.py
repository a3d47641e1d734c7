"""Hypothesis strategies for planner tests: fleets feasible or infeasible by construction.

Also the builders and readers several test modules share (devices, the three-device fleet,
a run's CSV files).

A fleet is *feasible* when every device can run the smallest configuration (the top
``min_depth`` layers at the lowest rank) within its memory; it is *infeasible* when at least
one device's memory is below what that configuration needs. Memories are drawn between the
smallest and a little above the largest configuration's need, so memory sometimes binds.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from legend.models.spec import ModelSpec, get_model_spec
from legend.planner.api import PlannerOptions, PlanningProblem
from legend.planner.catalog import build_catalogue, fleet_costs
from legend.planner.costs import CostModel
from legend.planner.formulation import MILP, formulate
from legend.planner.plan import Plan, PlanViolation, validate_plan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams

TINY = get_model_spec("tiny-bert")


def tiny_job(ranks: tuple[int, ...] = (2, 4, 8)) -> JobParams:
    """The small workload the property tests plan for (tiny-bert, batch 8, 32 tokens)."""
    return JobParams(batch_size=8, seq_len=32, local_steps=3, ranks=ranks)


# The capacities of :func:`device` unless a test names others.
DEVICE_DEFAULTS = {
    "tflops": 0.05,
    "memory_gb": 1.0,
    "uplink_mbps": 5.0,
    "downlink_mbps": 20.0,
    "num_samples": 100,
}


def device(device_id: str, **fields: Any) -> DeviceProfile:
    """A device with :data:`DEVICE_DEFAULTS` but for the ``fields`` given."""
    return DeviceProfile(device_id=device_id, **{**DEVICE_DEFAULTS, **fields})


def random_fleet(n: int, seed: int, make: Any = None, **ranges: tuple[float, float]) -> Fleet:
    """``n`` devices (``make``, default :func:`device`) with capacities drawn uniformly
    within ``ranges`` (field: (lo, hi); a ``num_samples`` range draws integers)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(field: str, lo: float, hi: float) -> float:
        return int(rng.integers(lo, hi)) if field == "num_samples" else float(rng.uniform(lo, hi))

    return Fleet(
        devices=tuple(
            (make or device)(f"d{i}", **{k: draw(k, *span) for k, span in ranges.items()})
            for i in range(n)
        )
    )


def device_2gb(device_id: str, **fields: Any) -> DeviceProfile:
    """:func:`device` with 2 GB of memory, 10 Mbit/s up and 50 down unless ``fields`` say."""
    return device(
        device_id, **{"memory_gb": 2.0, "uplink_mbps": 10.0, "downlink_mbps": 50.0, **fields}
    )


# Three devices, fast to slow: the fleet of the formulation and solver tests.
FLEET3 = Fleet(
    devices=(
        device_2gb("fast", tflops=0.5, uplink_mbps=20.0, num_samples=120),
        device_2gb("slow", tflops=0.02, uplink_mbps=2.0, downlink_mbps=10.0, num_samples=300),
        device_2gb("mid", tflops=0.1, uplink_mbps=5.0, num_samples=60),
    )
)

# The planner options of each objective, with a deadline and floor that bind on FLEET3.
OBJECTIVES: dict[str, dict[str, Any]] = {
    "progress": {},
    # bytes priced high enough, and an overhead, to move the optimum away from "rate"'s
    "progress-priced": {"seconds_per_mb": 200.0, "server_overhead_s": 0.02},
    "rate": {"objective": "rate"},
    "deadline": {"objective": "deadline", "deadline_s": 0.06},
    "min-time": {"objective": "min-time", "utility_floor_share": 0.7},
}


def program(problem: PlanningProblem, deadline_s: float | None = None, **kw: Any) -> MILP:
    """The MILP of ``problem`` over its full catalogue."""
    return formulate(problem, build_catalogue(problem), fleet_costs(problem), deadline_s, **kw)


def violations(
    plan: Plan, fleet: Fleet, job: JobParams, options: PlannerOptions
) -> list[PlanViolation]:
    """What ``plan`` breaks of the constraints ``options`` set, checked apart from the planner."""
    return validate_plan(
        plan,
        fleet,
        TINY,
        job,
        deadline_s=options.deadline_s,
        monotone_ranks=options.monotone_ranks,
        min_depth=options.min_depth,
        require_all=not options.allow_dropping,
        server_mbps=options.server_mbps,
    )


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file (a run's ``rounds.csv``, a benchmark's table), as strings."""
    assert path.is_file(), path
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _probe() -> DeviceProfile:
    return device("probe", tflops=1.0, uplink_mbps=1.0, downlink_mbps=1.0, num_samples=1)


def memory_need_gb(spec: ModelSpec, job: JobParams, depth: int, rank: int) -> float:
    """Memory (GB) of the top ``depth`` layers at ``rank`` (memory does not depend on the
    device's speed or links)."""
    L = spec.num_layers
    cost = CostModel(spec, job).evaluate(_probe(), tuple(range(L - depth, L)), (rank,) * depth)
    return cost.memory_bytes / 1e9


def smallest_memory_gb(spec: ModelSpec, job: JobParams, min_depth: int = 1) -> float:
    return memory_need_gb(spec, job, min_depth, job.ranks[0])


def largest_memory_gb(spec: ModelSpec, job: JobParams) -> float:
    return memory_need_gb(spec, job, spec.num_layers, job.ranks[-1])


# Profiles on coarse grids: realistic spreads, and ties between devices are common (which
# exercises the greedy's shared rows and the class formulation).
tflops_values = st.sampled_from([0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
uplink_values = st.sampled_from([0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0])
downlink_values = st.sampled_from([2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0])
samples_values = st.integers(min_value=10, max_value=500)


@st.composite
def device_profiles(
    draw: st.DrawFn,
    device_id: str,
    *,
    min_memory_gb: float,
    max_memory_gb: float,
    device_class: str | None = None,
) -> DeviceProfile:
    memory = draw(st.floats(min_value=min_memory_gb, max_value=max_memory_gb))
    return DeviceProfile(
        device_id=device_id,
        tflops=draw(tflops_values),
        memory_gb=round(memory, 6),
        uplink_mbps=draw(uplink_values),
        downlink_mbps=draw(downlink_values),
        num_samples=draw(samples_values),
        local_steps=draw(st.one_of(st.none(), st.integers(min_value=1, max_value=5))),
        device_class=device_class,
    )


@st.composite
def fleets(
    draw: st.DrawFn,
    *,
    spec: ModelSpec = TINY,
    job: JobParams | None = None,
    min_size: int = 1,
    max_size: int = 3,
    min_depth: int = 1,
    feasible: bool = True,
) -> Fleet:
    """Fleets of ``min_size..max_size`` devices for ``spec`` and ``job``.

    ``feasible=True``: every device's memory fits the smallest configuration.
    ``feasible=False``: at least one device's memory is 50-99% of that need.
    """
    job = job or tiny_job()
    need = smallest_memory_gb(spec, job, min_depth)
    # 0.1% above the need (rounding the drawn memory cannot drop it below); memory right at
    # the edge is covered by known-answer tests.
    low = need * 1.001 + 1e-6
    high = largest_memory_gb(spec, job) * 1.1
    n = draw(st.integers(min_value=min_size, max_value=max_size))
    devices = [
        draw(device_profiles(f"dev-{i}", min_memory_gb=low, max_memory_gb=high)) for i in range(n)
    ]
    if not feasible:
        blocked = draw(st.integers(min_value=0, max_value=n - 1))
        short = draw(st.floats(min_value=0.5, max_value=0.99))
        d = devices[blocked]
        devices[blocked] = DeviceProfile(**{**d.to_dict(), "memory_gb": round(need * short, 6)})
    return Fleet(devices=tuple(devices))


rank_grids = st.sampled_from([(2, 4), (2, 8), (2, 4, 8), (1, 4, 16), (4, 8, 16)])
objectives = st.sampled_from(["progress", "rate", "deadline", "min-time"])
