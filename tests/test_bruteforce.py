"""The brute-force oracle: enumeration, hand-solved answers, every option, the size limit."""

from __future__ import annotations

import itertools
import math

import pytest
from strategies import TINY, device, tiny_job

from legend.planner.api import PlannerOptions, PlanningProblem, plan_round
from legend.planner.bruteforce import (
    MAX_COMBINATIONS,
    count_configurations,
    device_configurations,
)
from legend.planner.errors import InfeasibleError, PlannerInputError
from legend.planner.plan import Plan, validate_plan
from legend.planner.profiles import Fleet, JobParams

JOB = tiny_job(ranks=(2, 4))
L = TINY.num_layers


def oracle(fleet: Fleet, job: JobParams = JOB, **options: object) -> Plan:
    options.setdefault("objective", "rate")  # the known answers below are of U / T
    return plan_round(fleet, TINY, job, PlannerOptions(solver="brute-force", **options))  # type: ignore[arg-type]


def costs(fleet: Fleet, job: JobParams = JOB):  # type: ignore[no-untyped-def]
    return PlanningProblem.create(fleet, TINY, job).costs


def test_configuration_counts() -> None:
    # Monotone: non-decreasing sequences of length d over K ranks, C(d + K - 1, K - 1).
    assert len(device_configurations(4, (2, 4, 8))) == 3 + 6 + 10 + 15
    assert len(device_configurations(4, (2, 4, 8), monotone=False)) == 3 + 9 + 27 + 81
    assert len(device_configurations(4, (2, 4), min_depth=3)) == 4 + 5
    for L_, K, d, mono in itertools.product((1, 4, 6), (1, 2, 3), (1, 2), (True, False)):
        if d > L_:
            continue
        listed = device_configurations(L_, tuple(range(1, K + 1)), min_depth=d, monotone=mono)
        assert len(listed) == count_configurations(L_, K, min_depth=d, monotone=mono)
        assert len(set(listed)) == len(listed)


def test_configurations_are_top_blocks_with_monotone_ranks() -> None:
    for layers, ranks in device_configurations(4, (2, 4, 8)):
        assert layers == tuple(range(4 - len(layers), 4))
        assert list(ranks) == sorted(ranks)


def test_deadline_at_the_smallest_configuration_forces_it() -> None:
    dev = device("a")
    t_min = costs(Fleet(devices=(dev,))).evaluate(dev, (L - 1,), (2,)).time_s
    plan = oracle(Fleet(devices=(dev,)), objective="deadline", deadline_s=t_min)
    assert (plan.devices[0].layers, plan.devices[0].ranks) == ((L - 1,), (2,))
    assert plan.utility == pytest.approx(100 * math.log2(3))
    assert plan.status == "OPTIMAL" and plan.mip_gap == 0.0


def test_unbounded_deadline_trains_everything_at_the_top_rank() -> None:
    fleet = Fleet(devices=(device("a"), device("b", tflops=1.0)))
    plan = oracle(fleet, objective="deadline", deadline_s=1e9)
    # Hand computation: U = sum_i n_i * sum_l (l+1)/L * log2(1 + 4) = 2 * 100 * 2.5 * log2 5.
    assert plan.utility == pytest.approx(2 * 100 * (1 + 2 + 3 + 4) / 4 * math.log2(5))
    assert all(dp.ranks == (4, 4, 4, 4) for dp in plan.devices)


def test_rate_of_a_single_device_is_the_best_ratio_over_its_configurations() -> None:
    dev = device("a", uplink_mbps=0.5)
    fleet = Fleet(devices=(dev,))
    c = costs(fleet)
    problem = PlanningProblem.create(fleet, TINY, JOB)
    best = max(
        problem.utility(0, layers, ranks) / c.evaluate(dev, layers, ranks).time_s
        for layers, ranks in device_configurations(L, JOB.ranks)
    )
    assert oracle(fleet).objective_value == pytest.approx(best, rel=1e-12)


def test_min_time_reaches_the_floor_in_the_shortest_round() -> None:
    fleet = Fleet(devices=(device("a"), device("b", tflops=0.5, uplink_mbps=50.0)))
    full = oracle(fleet, objective="deadline", deadline_s=1e9).utility
    plan = oracle(fleet, objective="min-time", utility_floor=0.6 * full)
    assert plan.utility >= 0.6 * full * (1 - 1e-9)
    # No plan whose round is shorter reaches the floor.
    try:
        tighter = oracle(fleet, objective="deadline", deadline_s=plan.round_time_s * 0.999)
    except InfeasibleError:
        pass  # not even the smallest configurations fit
    else:
        assert tighter.utility < 0.6 * full
    relative = oracle(fleet, objective="min-time", utility_floor_share=0.6)
    assert relative.round_time_s == pytest.approx(plan.round_time_s)


def test_memory_infeasible_device_is_named() -> None:
    fleet = Fleet(devices=(device("ok"), device("small", memory_gb=0.001)))
    with pytest.raises(InfeasibleError) as info:
        oracle(fleet)
    assert "small" in str(info.value) and "memory" in str(info.value)


def test_dropping_min_participants_and_coverage() -> None:
    fleet = Fleet(
        devices=(device("ok"), device("small", memory_gb=0.001), device("fast", tflops=1.0))
    )
    plan = oracle(fleet, allow_dropping=True)
    assert not plan.device("small").participates
    assert plan.device("ok").participates and plan.device("fast").participates
    with pytest.raises(InfeasibleError):
        oracle(fleet, allow_dropping=True, min_participants=3)
    # Coverage: 90% of the samples must train the top 3 layers.
    fleet2 = Fleet(devices=(device("a", uplink_mbps=0.5), device("b", tflops=1.0)))
    free = oracle(fleet2)
    covered = oracle(fleet2, coverage_layers=3, coverage_share=0.9)
    assert all(dp.depth >= 3 for dp in covered.devices)
    assert covered.objective_value <= free.objective_value * (1 + 1e-12)


def test_server_link_carries_the_round_within_the_deadline() -> None:
    fleet = Fleet(devices=(device("a", tflops=1.0, uplink_mbps=100.0), device("b")))
    free = oracle(fleet, objective="deadline", deadline_s=1.0)
    moved = free.total_upload_bytes + free.total_download_bytes
    # 70% of what the free plan needs to move its bytes within the deadline
    server_mbps = moved * 8 / 1e6 / 1.0 * 0.7
    plan = oracle(fleet, objective="deadline", deadline_s=1.0, server_mbps=server_mbps)
    assert plan.total_upload_bytes + plan.total_download_bytes <= (
        server_mbps * 1e6 / 8 * plan.round_time_s * (1 + 1e-9)
    )
    assert plan.round_time_s <= 1.0 * (1 + 1e-9)  # the link's time counts toward the round
    assert plan.utility < free.utility
    assert validate_plan(plan, fleet, TINY, JOB, deadline_s=1.0, server_mbps=server_mbps) == []


def test_free_ranks_can_only_help() -> None:
    fleet = Fleet(devices=(device("a", memory_gb=0.02), device("b", tflops=0.3)))
    mono = oracle(fleet)
    free = oracle(fleet, monotone_ranks=False)
    assert free.objective_value >= mono.objective_value * (1 - 1e-12)
    assert validate_plan(free, fleet, TINY, JOB, monotone_ranks=False) == []


def test_refuses_instances_above_the_limit() -> None:
    job = tiny_job(ranks=(2, 4, 8, 16))
    fleet = Fleet(devices=tuple(device(f"d{i}") for i in range(5)))
    with pytest.raises(PlannerInputError) as info:
        oracle(fleet, job=job, monotone_ranks=False)
    assert f"{MAX_COMBINATIONS:,}" in str(info.value) and "combinations" in str(info.value)
    assert info.value.exit_code == 2
