"""``seconds_per_mb = "auto"``: traffic priced at what the median planned device's uplink
spends on it, resolved when the problem is created."""

from __future__ import annotations

from pathlib import Path

import pytest

from legend.federation.job import JobError, load_job
from legend.models.spec import get_model_spec
from legend.planner.api import PlannerOptions, PlanningProblem, plan_round
from legend.planner.errors import PlannerInputError
from legend.planner.profiles import DeviceProfile, Fleet, JobParams, load_fleet
from legend.planner.types import auto_seconds_per_mb

ROOT = Path(__file__).resolve().parents[1]
SPEC = get_model_spec("all-MiniLM-L6-v2")
JOB = JobParams(ranks=(2, 4, 8, 16))


def _fleet(ups: list[float]) -> Fleet:
    return Fleet(
        devices=tuple(
            DeviceProfile(
                device_id=f"d{i}",
                tflops=0.1 + 0.3 * i,
                memory_gb=4.0,
                uplink_mbps=up,
                downlink_mbps=4 * up,
                num_samples=100,
            )
            for i, up in enumerate(ups)
        )
    )


def test_auto_price_is_the_median_uplinks_seconds_per_megabyte() -> None:
    assert auto_seconds_per_mb(_fleet([2.0, 80.0, 16.0])) == pytest.approx(8.0 / 16.0)
    assert auto_seconds_per_mb(_fleet([2.0, 80.0, 16.0, 24.0])) == pytest.approx(8.0 / 20.0)


def test_auto_plans_as_the_number_it_resolves_to() -> None:
    fleet = load_fleet(ROOT / "examples" / "fleet.csv")
    price = auto_seconds_per_mb(fleet)
    problem = PlanningProblem.create(fleet, SPEC, JOB, PlannerOptions(seconds_per_mb="auto"))
    assert problem.options.seconds_per_mb == pytest.approx(price)
    auto = plan_round(fleet, SPEC, JOB, PlannerOptions(seconds_per_mb="auto"))
    explicit = plan_round(fleet, SPEC, JOB, PlannerOptions(seconds_per_mb=price))
    assert auto.options["seconds_per_mb"] == pytest.approx(price)  # the plan records it
    assert [(d.layers, d.ranks) for d in auto.devices] == [
        (d.layers, d.ranks) for d in explicit.devices
    ]
    assert auto.objective_value == pytest.approx(explicit.objective_value)
    # priced at a device link's speed, not a 1 Gbit/s link's, traffic costs the plan bytes
    assert PlannerOptions().seconds_per_mb == "auto"  # the default
    cheap = plan_round(fleet, SPEC, JOB, PlannerOptions(seconds_per_mb=0.008))
    moved = [sum(d.predicted_upload_bytes for d in p.devices) for p in (auto, cheap)]
    assert moved[0] < moved[1]


def test_price_values_are_checked(tmp_path: Path) -> None:
    with pytest.raises(PlannerInputError, match=r'`seconds_per_mb`.*"auto", got \'fast\''):
        PlannerOptions(seconds_per_mb="fast")
    with pytest.raises(PlannerInputError, match="resolved for a fleet"):
        _ = PlannerOptions(seconds_per_mb="auto").price_per_mb
    job = tmp_path / "job.toml"
    fleet = ROOT / "examples" / "fleet.csv"
    head = f'[job]\nmodel = "all-MiniLM-L6-v2"\nfleet = "{fleet}"\n[planner]\n'
    job.write_text(head + 'seconds_per_mb = "auto"\n')
    assert load_job(job).planner.options().seconds_per_mb == "auto"
    job.write_text(head + 'seconds_per_mb = "x"\n')
    with pytest.raises(JobError, match=r"job.toml.*planner.seconds_per_mb.*'x'"):
        load_job(job)


def test_plan_command_takes_auto_and_refuses_other_words(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from legend.federation.cli import main
    from legend.planner.plan import Plan

    fleet = ROOT / "examples" / "fleet.csv"
    out = tmp_path / "plan.json"
    args = ["plan", "--fleet", str(fleet), "--model", "all-MiniLM-L6-v2", "--out", str(out)]
    assert main([*args, "--seconds-per-mb", "auto"]) == 0
    price = Plan.load(out).options["seconds_per_mb"]
    assert price == pytest.approx(auto_seconds_per_mb(load_fleet(fleet)))
    capfd.readouterr()
    assert main([*args, "--seconds-per-mb", "fast"]) == 2
    assert "--seconds-per-mb must be a number of seconds (e.g. 0.008) or auto, got 'fast'" in (
        capfd.readouterr().err
    )
    assert Plan.load(out).options["seconds_per_mb"] == price  # the refused run wrote nothing
