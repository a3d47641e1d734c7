"""The LEGEND-style greedy: known answers, its stopping rule, options, errors and scale."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from strategies import TINY, tiny_job

import legend.planner.bruteforce
import legend.planner.greedy  # noqa: F401  (registers "greedy")
from legend.models.spec import get_model_spec
from legend.planner.api import PlannerOptions, PlanningProblem, plan_round
from legend.planner.errors import InfeasibleError, PlannerInputError
from legend.planner.greedy import _REL_TOL, _Greedy, _least_limit
from legend.planner.plan import Plan, validate_plan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams

JOB = tiny_job()


def device(name: str, **kw: float) -> DeviceProfile:
    values = {
        "tflops": 0.05,
        "memory_gb": 1.0,
        "uplink_mbps": 5.0,
        "downlink_mbps": 20.0,
        "num_samples": 100,
    }
    values.update(kw)
    return DeviceProfile(device_id=name, **values)  # type: ignore[arg-type]


def greedy(fleet: Fleet, job: JobParams = JOB, **options: object) -> Plan:
    return plan_round(fleet, TINY, job, PlannerOptions(solver="greedy", **options))  # type: ignore[arg-type]


def config_time(dev: DeviceProfile, layers: tuple[int, ...], ranks: tuple[int, ...]) -> float:
    problem = PlanningProblem.create(Fleet(devices=(dev,)), TINY, JOB)
    return problem.costs.evaluate(dev, layers, ranks).time_s


def moves(layers: tuple[int, ...], ranks: tuple[int, ...], grid: tuple[int, ...], L: int):  # type: ignore[no-untyped-def]
    """Every configuration one greedy move away (deepen, or raise one layer, monotone)."""
    out = []
    if layers and layers[0] > 0:
        out.append(((layers[0] - 1, *layers), (grid[0], *ranks)))
    for j, r in enumerate(ranks):
        k = grid.index(r)
        if k + 1 < len(grid):
            new = list(ranks)
            new[j] = grid[k + 1]
            if all(a <= b for a, b in itertools.pairwise(new)):
                out.append((layers, tuple(new)))
    return out


def test_generous_deadline_gives_the_full_configuration() -> None:
    fleet = Fleet(devices=(device("a"), device("b", tflops=1.0)))
    plan = greedy(fleet, objective="deadline", deadline_s=1e6)
    for dp in plan.devices:
        assert dp.layers == tuple(range(TINY.num_layers))
        assert dp.ranks == (JOB.ranks[-1],) * TINY.num_layers
    assert plan.status == "FEASIBLE" and plan.mip_gap is None and plan.solver == "greedy"


def test_deadline_equal_to_the_smallest_configuration_keeps_it() -> None:
    dev = device("a")
    L = TINY.num_layers
    t_min = config_time(dev, (L - 1,), (JOB.ranks[0],))
    plan = greedy(Fleet(devices=(dev,)), objective="deadline", deadline_s=t_min)
    assert plan.devices[0].layers == (L - 1,)
    assert plan.devices[0].ranks == (JOB.ranks[0],)
    # Hand computation of the utility: n * w_{L-1} * log2(1 + r_1), w_{L-1} = L / L = 1.
    assert plan.utility == pytest.approx(100 * math.log2(1 + JOB.ranks[0]))


@pytest.mark.parametrize("slack", [1.0, 1.3, 2.0, 5.0])
def test_greedy_stops_only_when_no_move_fits(slack: float) -> None:
    """The stopping rule: from the final configuration, every single move breaks the
    deadline or the memory."""
    devs = (
        device("slow", tflops=0.02, uplink_mbps=1.0),
        device("mid", tflops=0.2, memory_gb=0.03),
        device("fast", tflops=1.0, uplink_mbps=50.0),
    )
    fleet = Fleet(devices=devs)
    L = TINY.num_layers
    deadline_s = slack * config_time(devs[0], (L - 1,), (JOB.ranks[0],))
    plan = greedy(fleet, objective="deadline", deadline_s=deadline_s)
    assert validate_plan(plan, fleet, TINY, JOB, deadline_s=deadline_s) == []
    problem = PlanningProblem.create(fleet, TINY, JOB)
    for dev, dp in zip(devs, plan.devices, strict=True):
        for layers, ranks in moves(dp.layers, dp.ranks, JOB.ranks, TINY.num_layers):
            cost = problem.costs.evaluate(dev, layers, ranks)
            assert cost.time_s > deadline_s or cost.memory_bytes > dev.memory_bytes


def test_min_depth_and_free_ranks_are_respected() -> None:
    fleet = Fleet(devices=(device("a", tflops=0.01), device("b", tflops=0.5)))
    plan = greedy(fleet, min_depth=2, monotone_ranks=False)
    assert all(dp.depth >= 2 for dp in plan.devices)
    assert validate_plan(plan, fleet, TINY, JOB, min_depth=2, monotone_ranks=False) == []


def test_memory_infeasibility_names_device_and_shortfall() -> None:
    fleet = Fleet(devices=(device("ok"), device("tiny-phone", memory_gb=0.001)))
    with pytest.raises(InfeasibleError) as info:
        greedy(fleet)
    message = str(info.value)
    assert "tiny-phone" in message and "memory" in message and "short by" in message
    assert "'ok'" not in message
    assert info.value.exit_code == 3


def test_deadline_infeasibility_names_device_and_excess() -> None:
    fleet = Fleet(devices=(device("fast", tflops=1.0), device("slow", tflops=0.001)))
    with pytest.raises(InfeasibleError) as info:
        greedy(fleet, objective="deadline", deadline_s=0.05)
    message = str(info.value)
    assert "slow" in message and "deadline" in message and "over by" in message
    assert "'fast'" not in message


def test_dropping_leaves_out_devices_that_cannot_make_the_deadline() -> None:
    fleet = Fleet(devices=(device("fast", tflops=1.0), device("slow", tflops=0.001)))
    plan = greedy(fleet, objective="deadline", deadline_s=0.05, allow_dropping=True)
    assert plan.device("fast").participates
    assert not plan.device("slow").participates
    assert validate_plan(plan, fleet, TINY, JOB, deadline_s=0.05, require_all=False) == []
    with pytest.raises(InfeasibleError):
        greedy(
            fleet,
            objective="deadline",
            deadline_s=0.05,
            allow_dropping=True,
            min_participants=2,
        )
    with pytest.raises(PlannerInputError):
        greedy(fleet, allow_dropping=True, min_participants=3)


def test_server_link_carries_the_round_within_the_slowest_device() -> None:
    devs = (*(device(f"d{i}", tflops=1.0, uplink_mbps=100.0) for i in range(3)), device("s"))
    fleet = Fleet(devices=devs)
    free = greedy(fleet, objective="deadline", deadline_s=0.5)
    free_rate_mbps = (free.total_upload_bytes + free.total_download_bytes) * 8 / 1e6
    server_mbps = free_rate_mbps / free.round_time_s * 0.7  # 70% of what it needs
    plan = greedy(fleet, objective="deadline", deadline_s=0.5, server_mbps=server_mbps)
    moved = plan.total_upload_bytes + plan.total_download_bytes
    assert moved <= server_mbps * 1e6 / 8 * plan.round_time_s * (1 + 1e-9)
    assert plan.utility < free.utility
    assert validate_plan(plan, fleet, TINY, JOB, deadline_s=0.5, server_mbps=server_mbps) == []


def test_coverage_is_met_by_giving_everyone_the_covered_layers() -> None:
    fleet = Fleet(devices=(device("a", tflops=0.01), device("b", tflops=0.5)))
    plan = greedy(fleet, coverage_layers=3, coverage_share=0.9)
    assert all(dp.depth >= 3 for dp in plan.devices)


@pytest.mark.parametrize("objective", ["rate", "min-time"])
def test_greedy_matches_the_oracle_on_a_small_known_fleet(objective: str) -> None:
    fleet = Fleet(
        devices=(
            device("a", tflops=0.05, memory_gb=0.03, uplink_mbps=2.0),
            device("b", tflops=0.5, memory_gb=0.025, uplink_mbps=20.0),
            device("c", tflops=1.0, memory_gb=0.05, uplink_mbps=50.0),
        )
    )
    g = greedy(fleet, objective=objective)
    b = plan_round(fleet, TINY, JOB, PlannerOptions(solver="brute-force", objective=objective))
    assert validate_plan(g, fleet, TINY, JOB) == []
    if objective == "rate":
        assert g.objective_value <= b.objective_value * (1 + 1e-9)
    else:
        assert g.objective_value >= b.objective_value * (1 - 1e-9)


def _class_fleet(n: int) -> Fleet:
    classes = [
        (0.05, 2.0, 2.0, 10.0),
        (0.15, 3.0, 10.0, 50.0),
        (0.6, 4.0, 30.0, 100.0),
        (1.0, 8.0, 50.0, 200.0),
        (2.0, 16.0, 100.0, 500.0),
    ]
    devs = []
    for i in range(n):
        tflops, mem, up, down = classes[i % len(classes)]
        devs.append(
            DeviceProfile(
                device_id=f"d{i}",
                tflops=tflops,
                memory_gb=mem,
                uplink_mbps=up,
                downlink_mbps=down,
                num_samples=50 + (i * 37) % 400,
            )
        )
    return Fleet(devices=tuple(devs))


def test_ten_thousand_devices_in_classes_plan_in_seconds() -> None:
    spec = get_model_spec("all-MiniLM-L6-v2")
    job = JobParams()
    fleet = _class_fleet(10_000)
    start = time.perf_counter()
    plan = plan_round(fleet, spec, job, PlannerOptions(solver="greedy"))
    elapsed = time.perf_counter() - start
    assert elapsed < 30.0  # ~2 s on an idle 2-core machine; generous for shared CI
    assert len(plan.devices) == 10_000
    # Devices of one class get one configuration (they share the computation).
    by_class: dict[float, set[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    for dev, dp in zip(fleet.devices, plan.devices, strict=True):
        by_class.setdefault(dev.tflops, set()).add((dp.layers, dp.ranks))
    assert all(len(v) == 1 for v in by_class.values())


def test_shared_rows_give_the_same_configuration_as_planning_alone() -> None:
    spec = get_model_spec("all-MiniLM-L6-v2")
    job = JobParams()
    fleet = _class_fleet(200)
    options = PlannerOptions(solver="greedy", objective="deadline", deadline_s=7.0)
    plan = plan_round(fleet, spec, job, options)
    for index in (0, 1, 2, 3, 4, 57):
        alone = plan_round(Fleet(devices=(fleet.devices[index],)), spec, job, options)
        assert (alone.devices[0].layers, alone.devices[0].ranks) == (
            plan.devices[index].layers,
            plan.devices[index].ranks,
        )


@pytest.mark.parametrize("monotone", [True, False])
def test_deadline_runs_resumed_from_the_free_path_match_runs_from_the_start(
    monotone: bool,
) -> None:
    """Under a deadline the greedy resumes the path without a deadline of each row that path
    overruns, where it stops fitting; that gives, bit for bit, what running the row from its
    minimal configuration gives, also for deadlines right at (and a float off) where a move
    starts to fit."""
    rng = np.random.default_rng(7)
    devs = tuple(
        device(
            f"d{i}",
            tflops=float(rng.choice([0.005, 0.02, 0.1, 0.5, 1.0])),
            memory_gb=float(rng.uniform(0.02, 0.06)),  # memory binds for some
            uplink_mbps=float(rng.choice([1.0, 5.0, 50.0])),
        )
        for i in range(40)
    )
    options = PlannerOptions(solver="greedy", monotone_ranks=monotone, allow_dropping=True)
    g = _Greedy(PlanningProblem.create(Fleet(devices=devs), TINY, JOB, options))
    free, path = g._free()
    reach = path.reach[np.isfinite(path.reach)]
    at = (rng.choice(reach, 40) - 1e-12) / (1 + _REL_TOL)  # limit of the deadline ~ reach
    spread = np.linspace(g.min_time.min(), g.max_time.max(), 20)
    deadlines = np.sort(np.concatenate([spread, at, np.nextafter(at, 0.0), np.nextafter(at, 1e9)]))
    resumed = g._rows_for(deadlines, ranks=True)
    n_u, c = len(g.unique_devices), len(deadlines)
    fresh, _ = g.run(
        np.repeat(deadlines, n_u), np.tile(np.arange(n_u), c), np.zeros(n_u * c, dtype=np.int64)
    )
    # rows whose path without a deadline ends within the deadline keep that path
    limit = np.repeat(deadlines * (1 + _REL_TOL) + 1e-12, n_u)
    again = np.tile(free.participates, c) & (np.tile(free.time_s, c) > limit)
    assert 0 < fresh.participates[again].sum() < again.sum()
    for name in ("participates", "depth", "rank_index", "time_s", "utility"):
        got, want = getattr(resumed, name)[again], getattr(fresh, name)[again]
        np.testing.assert_array_equal(got, want, name)


def test_least_limit_is_the_smallest_limit_a_move_fits_under() -> None:
    rng = np.random.default_rng(11)
    t = np.concatenate([rng.uniform(0.0, 10.0, 5000), [0.0, 1e-300, 3.0, 1e300]])
    dt = np.concatenate([rng.uniform(0.0, 1.0, 2500), rng.uniform(5.0, 1e6, 2500)])
    dt = np.concatenate([dt, [0.5, 0.0, 1e-20, 1e300]])
    x = _least_limit(t, dt)
    assert np.all(dt <= x - t)
    assert not np.any(dt <= np.nextafter(x, -np.inf) - t)
