"""The participation floors (C9, C9s) planned by the sweep with an exact cover
(legend/planner/cover.py), checked against the enumerating oracle and the MILP."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import FLEET3, TINY, tiny_job
from test_planner_properties import _outcome, instances, options_for, tolerance

from legend.models.spec import get_model_spec
from legend.planner import cover
from legend.planner.api import PlannerOptions, plan_round
from legend.planner.errors import InfeasibleError
from legend.planner.profiles import Fleet, JobParams, load_fleet

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    instance=instances(max_size=4),
    share=st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.9, 1.0]),
    least=st.integers(min_value=0, max_value=3),
)
def test_cover_sweep_agrees_with_the_oracle(instance, share: float, least: int) -> None:  # type: ignore[no-untyped-def]
    fleet, job, objective, slack = instance
    if objective == "min-time":
        objective = "progress"  # the cover plans progress, rate and deadline
    least = min(least, len(fleet))
    options = options_for(
        objective,
        fleet,
        job,
        slack,
        allow_dropping=True,
        min_participants=least,
        min_sample_share=share,
    )
    oracle = _outcome(fleet, job, options, "brute-force")
    try:
        plan = plan_round(fleet, TINY, job, options)
    except InfeasibleError:
        assert oracle is None, "the cover found no plan; the oracle found one"
        return
    assert oracle is not None, "the cover found a plan the oracle says cannot exist"
    if share > 0 or least > 1:
        assert plan.solver == "cover-sweep"
        assert plan.status == "OPTIMAL" and plan.mip_gap == 0.0
    held = sum(d.num_samples for d in fleet.devices if plan.device(d.device_id).participates)
    assert held >= share * sum(d.num_samples for d in fleet.devices) * (1 - 1e-9)
    assert len(plan.participants) >= max(1, least)
    assert plan.objective_value == pytest.approx(oracle.objective_value, rel=1e-9)


@pytest.mark.parametrize("objective", ["progress", "rate"])
@pytest.mark.parametrize("share", [0.5, 0.75, 0.95])
def test_cover_sweep_matches_the_milp_on_real_devices(objective: str, share: float) -> None:
    """Twelve fleet50 devices of every class, MiniLM: the cover's plan is as good as the
    MILP's (within its gap) and meets the floor."""
    fleet50 = load_fleet(ROOT / "benchmarks" / "fleet50.csv")
    fleet = Fleet(devices=tuple(d for k, d in enumerate(fleet50.devices) if k % 4 == 0))
    spec = get_model_spec("all-MiniLM-L6-v2")
    job = JobParams(ranks=(2, 4, 8, 16), target_modules="qv", local_steps=5, batch_size=16)
    options = PlannerOptions(objective=objective, allow_dropping=True, min_sample_share=share)
    fast = plan_round(fleet, spec, job, options)
    milp = plan_round(fleet, spec, job, options.with_(solver="highs", mip_gap=1e-6))
    assert fast.solver == "cover-sweep" and milp.solver == "highs"
    assert fast.objective_value >= milp.objective_value * (1 - tolerance(milp))
    assert fast.objective_value <= milp.objective_value * (1 + 1e-6)
    total = sum(d.num_samples for d in fleet.devices)
    held = sum(d.num_samples for d in fleet.devices if fast.device(d.device_id).participates)
    assert held >= share * total


def test_a_table_over_budget_goes_to_the_milp(monkeypatch: pytest.MonkeyPatch) -> None:
    options = PlannerOptions(objective="rate", allow_dropping=True, min_sample_share=0.5)
    assert plan_round(FLEET3, TINY, tiny_job(), options).solver == "cover-sweep"
    monkeypatch.setattr(cover, "MAX_CELLS", 10)
    assert plan_round(FLEET3, TINY, tiny_job(), options).solver == "highs"


def test_the_cover_recovers_the_cheapest_devices() -> None:
    """A min-cost covering knapsack by hand: costs 5, 1, 1, 4 and samples 6, 2, 3, 5;
    7 samples are missing. The cheapest covers: {1, 3} (cost 5, 7 samples) and
    {2, 3} (cost 5, 8 samples); {0, 1} costs 6."""
    import numpy as np

    cost = np.asarray([5.0, 1.0, 1.0, 4.0])
    samples = np.asarray([6, 2, 3, 5])
    taken = cover._recover(cost, samples, 0, 7)
    assert float(cost[taken].sum()) == 5.0
    assert int(samples[taken].sum()) >= 7
