"""Plans serialise to JSON and back without loss, from every kind of planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import TINY, fleets, objectives, tiny_job

from legend.planner.api import PlannerOptions, plan_round
from legend.planner.errors import PlannerInputError
from legend.planner.plan import SCHEMA_VERSION, Plan


def _plan(fleet, objective: str, solver: str) -> Plan:  # type: ignore[no-untyped-def]
    job = tiny_job()
    deadline = 1e6 if objective == "deadline" else None
    options = PlannerOptions(objective=objective, deadline_s=deadline, solver=solver)
    return plan_round(fleet, TINY, job, options, round_index=3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fleet=fleets(max_size=3),
    objective=objectives,
    solver=st.sampled_from(["greedy", "brute-force", "pulp-highs"]),
)
def test_json_round_trip_is_lossless(fleet, objective: str, solver: str) -> None:  # type: ignore[no-untyped-def]
    plan = _plan(fleet, objective, solver)
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan
    assert back.to_json() == text
    # Every device plan survives field by field, floats bit for bit.
    for a, b in zip(plan.devices, back.devices, strict=True):
        assert a.to_dict() == b.to_dict()


def test_save_and_load(tmp_path: Path) -> None:
    from legend.planner.profiles import load_fleet

    fleet = load_fleet(Path(__file__).resolve().parents[1] / "examples" / "fleet.csv")
    plan = _plan(fleet, "rate", "greedy")
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert Plan.load(path) == plan
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["solver"] == "greedy" and data["mip_gap"] is None
    assert len(data["devices"]) == len(fleet)


def test_wrong_schema_or_shape_is_refused(tmp_path: Path) -> None:
    from legend.planner.profiles import load_fleet

    fleet = load_fleet(Path(__file__).resolve().parents[1] / "examples" / "fleet.json")
    data = _plan(fleet, "rate", "greedy").to_dict()
    with pytest.raises(PlannerInputError, match="schema_version"):
        Plan.from_dict({**data, "schema_version": SCHEMA_VERSION + 1})
    del data["devices"]
    with pytest.raises(PlannerInputError, match="devices"):
        Plan.from_dict(data)
    with pytest.raises(PlannerInputError, match="not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(PlannerInputError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
