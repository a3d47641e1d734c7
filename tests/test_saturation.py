"""The saturating progress model: the response curve, the exact MILP against enumeration,
what saturation does to a plan, and the option's checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from strategies import TINY, device, random_fleet, tiny_job

from legend.models.errors import ModelInputError
from legend.models.priors import _parse, progress_prior
from legend.models.spec import get_model_spec
from legend.planner.api import PlannerOptions, PlanningProblem, plan_round
from legend.planner.errors import PlannerInputError
from legend.planner.profiles import Fleet
from legend.planner.saturation import (
    column_slots,
    plan_progress,
    saturation_curve,
    slot_gains,
)

JOB = tiny_job(ranks=(2, 4))
L = TINY.num_layers
GAINS = tuple(0.2 * (k + 1) ** 2 for k in range(L))  # rising toward the output


def fleet(n: int, seed: int) -> Fleet:
    return random_fleet(n, seed, tflops=(0.02, 0.2), uplink_mbps=(2.0, 20.0), num_samples=(50, 200))


def options(solver: str, saturation: object, **more: object) -> PlannerOptions:
    return PlannerOptions(
        objective="progress",
        solver=solver,
        layer_weights=GAINS,
        rank_gains=(0.4, 1.0),
        saturation=saturation,  # type: ignore[arg-type]
        **more,  # type: ignore[arg-type]
    )


def test_curve_is_the_concave_majorant_scaled_to_slope_one() -> None:
    curve = saturation_curve([(1.0, 0.5), (2.0, 0.8), (3.0, 0.9), (5.0, 0.95), (10.0, 0.95)])
    assert curve.slopes[0] == pytest.approx(1.0)
    assert np.all(np.diff(curve.slopes) < 0)
    assert curve.saturates_at == pytest.approx(5.0)  # flat from 5 to 10: cut there
    assert curve(np.asarray([0.0, 0.5, 1.0, 2.0, 5.0, 8.0])) == pytest.approx(
        [0.0, 0.5, 1.0, 1.6, 1.9, 1.9]
    )
    # a point under the chord of its neighbours is dropped: (1, 0.2) lies under (0,0)-(2,0.8)
    bent = saturation_curve([(1.0, 0.2), (2.0, 0.8), (4.0, 1.0)])
    assert bent.widths == pytest.approx([2.0, 2.0])
    assert bent.slopes == pytest.approx([1.0, 0.25])
    # a falling response saturates at its peak
    assert saturation_curve([(1.0, 1.0), (2.0, 0.7)]).saturates_at == pytest.approx(1.0)


def test_curve_without_a_positive_response_is_refused() -> None:
    with pytest.raises(PlannerInputError, match="response > 0"):
        saturation_curve([(1.0, -0.1), (2.0, 0.0)])


def test_slots_and_progress_by_hand() -> None:
    gains = slot_gains((1.0, 2.0), (0.25, 1.0))
    assert gains == pytest.approx(np.asarray([[0.25, 0.75], [0.5, 1.5]]))
    # column (rank 2 on layer 1) and (rank 2, rank 4 on layers 0, 1)
    slots = column_slots([(2,), (2, 4)], 2, (2, 4))
    assert slots.tolist() == [[0, 0, 1, 0], [1, 0, 1, 1]]
    curve = saturation_curve([(1.0, 1.0), (2.0, 1.0)])  # H(c) = min(c, 1)
    configs = [((1,), (2,)), ((0, 1), (2, 4))]
    # equal samples: layer 1's first slot covered twice (counts once), the rest once
    value = plan_progress(configs, [100, 100], gains, (2, 4), curve)
    assert value == pytest.approx(100 * (0.25 + 0.5 + 1.5))
    # a baseline's layers need not be a top block: layer 0 alone covers layer 0's slot
    assert plan_progress([((0,), (2,))], [100], gains, (2, 4), curve) == pytest.approx(25.0)


def test_linear_response_is_the_additive_model() -> None:
    f = fleet(4, seed=3)
    additive = plan_round(f, TINY, JOB, options("highs", "none", seconds_per_mb=5.0))
    linear = plan_round(
        f, TINY, JOB, options("highs", tuple(float(k) for k in range(1, 9)), seconds_per_mb=5.0)
    )
    assert linear.objective_value == pytest.approx(additive.objective_value, rel=1e-6)
    assert linear.utility == pytest.approx(additive.utility, rel=1e-6)


RESPONSES = {
    "one-device": (1.0, 1.0),
    "soft": (1.0, 1.5, 1.8, 1.9),
    "linear": (1.0, 2.0, 3.0, 4.0, 5.0),
}


@pytest.mark.parametrize(
    ("response", "seed", "price"),
    list(itertools.product(sorted(RESPONSES), (0, 1), (0.0, 5.0, 200.0))),
)
def test_milp_matches_enumeration(response: str, seed: int, price: float) -> None:
    f = fleet(3, seed)
    opts = options("highs", RESPONSES[response], seconds_per_mb=price, mip_gap=0.0)
    exact = plan_round(f, TINY, JOB, opts)
    oracle = plan_round(f, TINY, JOB, opts.with_(solver="brute-force"))
    assert exact.status == "OPTIMAL"
    assert exact.objective_value == pytest.approx(oracle.objective_value, rel=1e-6)
    # the plan's utility is the saturating progress of its configurations
    problem = PlanningProblem.create(f, TINY, JOB, opts)
    configs = [(d.layers, d.ranks) for d in exact.devices]
    assert exact.utility == pytest.approx(problem.progress_of(configs), rel=1e-9)


@pytest.mark.parametrize("backend", ["pulp-cbc", "cvxpy-highs"])
def test_backends_agree_on_the_saturating_program(backend: str) -> None:
    f = fleet(4, seed=5)
    opts = options("highs", RESPONSES["soft"], seconds_per_mb=5.0, mip_gap=0.0)
    reference = plan_round(f, TINY, JOB, opts)
    other = plan_round(f, TINY, JOB, opts.with_(solver=backend))
    assert other.objective_value == pytest.approx(reference.objective_value, rel=1e-6)


def test_saturation_at_one_device_trains_each_extra_slot_once() -> None:
    # equal samples: one device is one mean-sized device, so a second one buys nothing
    f = Fleet(
        devices=tuple(device(f"d{i}", tflops=0.1 + 0.05 * i, num_samples=100) for i in range(4))
    )
    plan = plan_round(f, TINY, JOB, options("highs", (1.0, 1.0), seconds_per_mb=5.0))
    slots = column_slots([d.ranks for d in plan.devices], L, JOB.ranks)
    trained = slots.sum(axis=0)
    # every device trains the output layer's first slot (it must take part); nothing else
    # is trained twice, and something below the output layer is trained
    first_out = (L - 1) * len(JOB.ranks)
    assert trained[first_out] == len(f)
    assert np.delete(trained, first_out).max() <= 1
    assert max(len(d.layers) for d in plan.devices) > 1
    additive = plan_round(f, TINY, JOB, options("highs", "none", seconds_per_mb=5.0))
    moved = sum(d.predicted_upload_bytes for d in plan.devices)
    assert moved < sum(d.predicted_upload_bytes for d in additive.devices)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"saturation": "sometimes"}, "saturation"),
        ({"saturation": (0.0, 1.0)}, "the first > 0"),
        ({"saturation": (1.0, float("nan"))}, "finite"),
        ({"saturation": (1.0, 1.0), "objective": "rate"}, "progress' only"),
    ],
)
def test_saturation_option_is_checked(fields: dict[str, object], match: str) -> None:
    with pytest.raises(PlannerInputError, match=match):
        PlannerOptions(**fields)  # type: ignore[arg-type]


def test_prior_saturation_needs_a_measured_response() -> None:
    with pytest.raises(PlannerInputError, match="no coverage response is stored"):
        PlanningProblem.create(
            fleet(2, 0), TINY, JOB, PlannerOptions(objective="progress", saturation="prior")
        )


def test_stored_coverage_response_is_parsed_and_checked() -> None:
    entry = {
        "layer_gains": [1.0, 1.0],
        "rank_response": {"2": 0.5, "4": 1.0},
        "coverage_response": {"sizes": [1.0, 2.0, 3.0], "response": [0.6, 0.9, 0.95]},
    }
    prior = _parse("m", entry)
    assert prior.coverage_response == ((1.0, 0.6), (2.0, 0.9), (3.0, 0.95))
    assert _parse("m", {**entry, "coverage_response": None}).coverage_response is None
    for bad in ({"sizes": [1.0], "response": [0.5, 0.6]}, {"sizes": [0.0], "response": [1.0]}):
        with pytest.raises(ModelInputError, match="coverage_response"):
            _parse("m", {**entry, "coverage_response": bad})


def test_auto_keeps_the_additive_model_without_a_stored_response() -> None:
    spec = get_model_spec("all-MiniLM-L6-v2")
    prior = progress_prior(spec.name, spec.num_layers)
    assert prior is not None and prior.coverage_response is None
    job = tiny_job(ranks=(2, 4, 8, 16))
    assert PlanningProblem.create(fleet(2, 0), spec, job, PlannerOptions()).saturation is None
    explicit = PlannerOptions(saturation=(1.0, 1.5))
    curve = PlanningProblem.create(fleet(2, 0), spec, job, explicit).saturation
    assert curve is not None and curve.saturates_at == pytest.approx(2.0)


@pytest.mark.parametrize(
    "extra",
    [
        {"allow_dropping": True, "min_sample_share": 0.5},
        {"allow_dropping": True, "min_participants": 2},
        {"server_mbps": 5.0},
        {"coverage_layers": 2, "coverage_share": 0.5},
    ],
    ids=["sample-floor", "participants", "server-link", "layer-coverage"],
)
def test_milp_matches_enumeration_with_coupling_rows(extra: dict[str, object]) -> None:
    f = random_fleet(
        3,
        4,
        tflops=(0.01, 0.2),
        uplink_mbps=(1.0, 20.0),
        num_samples=(20, 300),
        memory_gb=(0.3, 1.0),
    )
    opts = options("highs", (1.0, 1.4), seconds_per_mb=5.0, mip_gap=0.0, **extra)
    exact = plan_round(f, TINY, JOB, opts)
    oracle = plan_round(f, TINY, JOB, opts.with_(solver="brute-force"))
    assert exact.objective_value == pytest.approx(oracle.objective_value, rel=1e-6)


def test_a_saved_plan_re_derives_its_saturating_problem(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A plan's options hold the response as a list (JSON); read back, they must describe
    the same problem (the reports re-plan and compare digests)."""
    from legend.planner.plan import Plan
    from legend.reports.links import options_from_plan

    f = fleet(3, seed=2)
    opts = options("highs", (1.0, 1.5), seconds_per_mb=5.0)
    plan = plan_round(f, TINY, JOB, opts)
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.options["saturation"] == [1.0, 1.5]
    again = options_from_plan(loaded)
    assert again.saturation == (1.0, 1.5)
    assert PlanningProblem.create(f, TINY, JOB, again).digest() == plan.inputs_digest
    assert PlannerOptions(saturation=[1.0, 1.5]) == PlannerOptions(saturation=(1.0, 1.5))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("solver", "match"),
    [("lagrangian", "saturating progress model"), ("sweep", "SAT saturating progress")],
)
def test_solvers_that_cannot_plan_saturation_say_so(solver: str, match: str) -> None:
    with pytest.raises(PlannerInputError, match=match):
        plan_round(fleet(2, 0), TINY, JOB, options(solver, (1.0, 1.2)))
