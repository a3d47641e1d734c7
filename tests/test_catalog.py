"""The configuration catalogue, the fleet's cost vectors, device classes and the exact sweep.

Known answers come from enumerating every rank vector of a tiny model; the fleet's cost
vectors are checked against the cost model's own evaluation; the sweep is checked against a
per-device argmax and against the MILP on every backend.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import TINY, tiny_job

from legend.models.errors import InputError
from legend.models.spec import get_model_spec
from legend.planner import cover
from legend.planner.api import PlannerOptions, PlanningProblem, plan_round, rank_gain
from legend.planner.catalog import build_catalogue, fleet_costs, group_identical
from legend.planner.errors import PlannerInputError
from legend.planner.plan import validate_plan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams
from legend.planner.sweep import best_columns, coupling_rows, separable


def device(name: str, **kw: float) -> DeviceProfile:
    base = dict(tflops=0.05, memory_gb=2.0, uplink_mbps=10.0, downlink_mbps=50.0, num_samples=100)
    base.update(kw)
    return DeviceProfile(device_id=name, **base)  # type: ignore[arg-type]


TYPES = (
    dict(tflops=0.5, uplink_mbps=20.0, num_samples=120),
    dict(tflops=0.02, uplink_mbps=2.0, downlink_mbps=10.0, num_samples=300),
    dict(tflops=0.1, uplink_mbps=5.0, num_samples=60),
)


def typed_fleet(kinds: list[int]) -> Fleet:
    return Fleet(
        devices=tuple(device(f"d{i}", **TYPES[k]) for i, k in enumerate(kinds))  # type: ignore[arg-type]
    )


def all_configurations(problem: PlanningProblem):  # type: ignore[no-untyped-def]
    """Every (depth, ranks bottom to top) the program allows, with its utility per sample."""
    L = problem.spec.num_layers
    w = problem.layer_weights
    for d in range(problem.options.min_depth, L + 1):
        for ranks in itertools.product(problem.job.ranks, repeat=d):
            if problem.options.monotone_ranks and any(b < a for a, b in itertools.pairwise(ranks)):
                continue
            yield d, ranks, sum(w[L - d + i] * rank_gain(r) for i, r in enumerate(ranks))


# -- the catalogue ---------------------------------------------------------------------------


@pytest.mark.parametrize("monotone", [True, False])
@pytest.mark.parametrize("coverage", [0, 2])
def test_catalogue_dominates_every_configuration(monotone: bool, coverage: int) -> None:
    """Every configuration has a column with no more layers, no larger rank sum and no less
    utility (within its covered depth when coverage is on), and no column is dominated by
    another: the catalogue is exactly the undominated set."""
    options = PlannerOptions(
        monotone_ranks=monotone, coverage_layers=coverage, coverage_share=0.5 if coverage else 0
    )
    problem = PlanningProblem.create(typed_fleet([0]), TINY, tiny_job((2, 4, 8)), options)
    cat = build_catalogue(problem)
    cov = cat.covered(coverage) if coverage else np.zeros(len(cat), dtype=np.int64)

    def level(d: int) -> int:
        return min(d, coverage) if coverage else 0

    for d, ranks, u in all_configurations(problem):
        s = sum(ranks)
        ok = (
            (cat.depth <= d)
            & (cat.rank_sum <= s)
            & (cat.utility_per_sample >= u - 1e-12)
            & (cov == level(d))
        )
        assert ok.any(), (d, ranks)
    for j in range(len(cat)):
        others = np.arange(len(cat)) != j
        beats = (
            others
            & (cat.depth <= cat.depth[j])
            & (cat.rank_sum <= cat.rank_sum[j])
            & (cat.utility_per_sample >= cat.utility_per_sample[j])
            & (cov == cov[j])
        )
        assert not beats.any(), j
    # each column's rank vector is what its depth, rank sum and utility say
    w = problem.layer_weights
    for j in range(len(cat)):
        layers, ranks = cat.configuration(j)
        assert len(layers) == cat.depth[j] and sum(ranks) == cat.rank_sum[j]
        u = sum(w[layer] * rank_gain(r) for layer, r in zip(layers, ranks, strict=True))
        assert u == pytest.approx(cat.utility_per_sample[j], rel=1e-12)
        if monotone:
            assert list(ranks) == sorted(ranks)


def test_catalogue_utility_is_the_best_per_depth_and_rank_sum() -> None:
    problem = PlanningProblem.create(typed_fleet([0]), TINY, tiny_job((2, 4, 8)))
    cat = build_catalogue(problem)
    best: dict[tuple[int, int], float] = {}
    for d, ranks, u in all_configurations(problem):
        key = (d, sum(ranks))
        best[key] = max(best.get(key, -1.0), u)
    for d, s, u in zip(cat.depth, cat.rank_sum, cat.utility_per_sample, strict=True):
        assert u == pytest.approx(best[(int(d), int(s))], rel=1e-12)


def test_catalogue_columns_cost_what_the_cost_model_says() -> None:
    problem = PlanningProblem.create(typed_fleet([0, 1, 2]), TINY, tiny_job((2, 4, 8)))
    cat = build_catalogue(problem)
    fc = fleet_costs(problem)
    times = fc.times(slice(None), cat)
    for i, dev in enumerate(problem.fleet.devices):
        for j in range(len(cat)):
            cost = problem.costs.evaluate(dev, *cat.configuration(j))
            assert times[i, j] == pytest.approx(cost.time_s, rel=1e-12)
            assert cat.memory_bytes[j] == pytest.approx(cost.memory_bytes, rel=1e-12)
            assert cat.bytes_one_way[j] == pytest.approx(cost.upload_bytes, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    tflops=st.floats(0.01, 50.0),
    up=st.floats(0.5, 500.0),
    down=st.floats(1.0, 1000.0),
    steps=st.integers(1, 20),
    model=st.sampled_from(["tiny-bert", "tiny-llama", "bert-base-uncased", "llama-2-7b"]),
)
def test_fleet_cost_vectors_match_the_cost_model(
    tflops: float, up: float, down: float, steps: int, model: str
) -> None:
    spec = get_model_spec(model)
    dev = DeviceProfile(
        device_id="x", tflops=tflops, memory_gb=80.0, uplink_mbps=up, downlink_mbps=down,
        num_samples=10, local_steps=steps,
    )  # fmt: skip
    problem = PlanningProblem.create(Fleet(devices=(dev,)), spec, JobParams(ranks=(2, 8, 32)))
    fc = fleet_costs(problem)
    L = spec.num_layers
    for d, r in ((1, 2), (L // 2 or 1, 8), (L, 32)):
        cost = problem.costs.evaluate(dev, tuple(range(L - d, L)), (r,) * d)
        t = fc.time_const[0] + fc.time_per_layer[0] * d + fc.time_per_rank[0] * r * d
        c = fc.compute_const[0] + fc.compute_per_layer[0] * d + fc.compute_per_rank[0] * r * d
        assert t == pytest.approx(cost.time_s, rel=1e-12)
        assert c == pytest.approx(cost.compute_s, rel=1e-12)


def test_rank_wider_than_the_model_is_refused() -> None:
    with pytest.raises(InputError, match="rank 128 is wider than the layers"):
        PlanningProblem.create(typed_fleet([0]), TINY, tiny_job((2, 128)))


# -- classes -------------------------------------------------------------------------------


def test_identical_profiles_group_in_fleet_order() -> None:
    fleet = typed_fleet([0, 1, 0, 2, 1, 0])
    groups = group_identical(PlanningProblem.create(fleet, TINY, tiny_job()))
    assert [list(m) for m in groups.members] == [[0, 2, 5], [1, 4], [3]]
    assert list(groups.first) == [0, 1, 3]
    assert list(groups.inverse) == [0, 1, 0, 2, 1, 0]


AGREE_CASES = {
    "rate": {},
    "deadline": {"objective": "deadline", "deadline_s": 0.06},
    "min-time": {"objective": "min-time", "utility_floor_share": 0.7},
    "rate+link": {"server_mbps": 6.0},
    "deadline+link": {"objective": "deadline", "deadline_s": 0.06, "server_mbps": 6.0},
    "rate+coverage": {"coverage_layers": 3, "coverage_share": 0.6},
    "min-time+coverage": {"objective": "min-time", "coverage_layers": 3, "coverage_share": 0.6},
    "rate+dropping": {"allow_dropping": True, "min_participants": 4},
    "deadline+dropping": {
        "objective": "deadline",
        "deadline_s": 0.02,
        "allow_dropping": True,
        "min_participants": 2,
    },
}


@pytest.mark.parametrize("case", sorted(AGREE_CASES))
def test_class_program_agrees_with_per_device_program_and_sweep(case: str) -> None:
    fleet = typed_fleet([0, 1, 0, 2, 1, 0])
    job = tiny_job()
    # 1e-6: a Dinkelbach ratio is proven only as tightly as HiGHS holds the rows of T (its
    # feasibility tolerance); at the default price of traffic that is about 2e-7 here
    base = PlannerOptions(solver="highs", mip_gap=1e-6, **AGREE_CASES[case])
    per_device = plan_round(fleet, TINY, job, base.with_(use_classes=False))
    by_class = plan_round(fleet, TINY, job, base.with_(use_classes=True))
    auto = plan_round(fleet, TINY, job, base.with_(solver="auto"))
    plans = (per_device, by_class, auto)
    assert all(p.status == "OPTIMAL" for p in plans)
    tol = max(*(p.mip_gap or 0 for p in plans), 1e-6)
    for p in plans[1:]:
        assert p.objective_value == pytest.approx(per_device.objective_value, rel=tol)
    problem = PlanningProblem.create(fleet, TINY, job, base)
    floors_only = cover.applies(problem, build_catalogue(problem))
    assert auto.solver == (
        "sweep" if separable(problem) else ("cover-sweep" if floors_only else "highs")
    )
    for plan in plans:
        found = validate_plan(
            plan,
            fleet,
            TINY,
            job,
            deadline_s=base.deadline_s,
            require_all=not base.allow_dropping,
            server_mbps=base.server_mbps,
        )
        assert found == []


# -- the sweep -------------------------------------------------------------------------------


def test_coupling_rows_are_named() -> None:
    fleet = typed_fleet([0, 1])
    assert coupling_rows(PlanningProblem.create(fleet, TINY, tiny_job())) == ()
    opts = PlannerOptions(
        server_mbps=5.0, coverage_layers=2, coverage_share=0.5, allow_dropping=True,
        min_participants=1, min_sample_share=0.5,
    )  # fmt: skip
    rows = coupling_rows(PlanningProblem.create(fleet, TINY, tiny_job(), opts))
    assert rows == (
        "C7 server link", "C8 coverage", "C9 participants", "C9s participating samples"
    )  # fmt: skip
    with pytest.raises(PlannerInputError, match="solver 'sweep' needs a program without"):
        plan_round(fleet, TINY, tiny_job(), opts.with_(solver="sweep"))


@settings(max_examples=30, deadline=None)
@given(
    kinds=st.lists(st.integers(0, 2), min_size=1, max_size=6),
    memory=st.lists(st.floats(0.01, 2.0), min_size=6, max_size=6),
    limit=st.floats(0.005, 0.5),
)
def test_best_columns_is_the_per_device_argmax(
    kinds: list[int], memory: list[float], limit: float
) -> None:
    devices = tuple(
        device(f"d{i}", memory_gb=memory[i], **TYPES[k])  # type: ignore[arg-type]
        for i, k in enumerate(kinds)
    )
    problem = PlanningProblem.create(Fleet(devices=devices), TINY, tiny_job((2, 4, 8)))
    cat = build_catalogue(problem)
    choice, best = best_columns(cat, fleet_costs(problem), limit)
    for i, dev in enumerate(devices):
        fits = []
        for j in range(len(cat)):
            cost = problem.costs.evaluate(dev, *cat.configuration(j))
            if cost.memory_bytes <= dev.memory_bytes and cost.time_s <= limit * (1 + 1e-12):
                fits.append(float(cat.utility_per_sample[j]))
        if not fits:
            assert choice[i] == -1 and best[i] == -np.inf
        else:
            assert best[i] == pytest.approx(max(fits), rel=1e-12)
            assert cat.utility_per_sample[choice[i]] == pytest.approx(max(fits), rel=1e-12)


@pytest.mark.parametrize("solver", ["highs", "pulp-highs"])
def test_highs_is_not_trusted_to_return_its_warm_start_as_optimal(solver: str) -> None:
    """HiGHS (presolve on) once answered a Dinkelbach step of this coupled program with
    "optimal" and the warm start as its solution while its own bound was 0.0135 above it;
    the plan stopped 0.065% short of the optimum with a loose proof. Both backends that hand
    HiGHS a warm start now solve again without it when the status and the bound disagree
    (CVXPY passes none)."""
    fleet = typed_fleet([0, 1, 0, 2, 1, 0])
    opts = PlannerOptions(
        seconds_per_mb=0.64, coverage_layers=3, coverage_share=0.6, use_classes=False
    )
    highs = plan_round(fleet, TINY, tiny_job(), opts.with_(solver=solver))
    cbc = plan_round(fleet, TINY, tiny_job(), opts.with_(solver="pulp-cbc"))
    assert highs.status == "OPTIMAL" and highs.mip_gap is not None and highs.mip_gap <= 1e-4
    assert highs.objective_value == pytest.approx(cbc.objective_value, rel=1e-6)
