"""Measured memory in the cost model: the affine upper-bound fit, the calibration fields and
C6, and the check that a configuration the planner calls feasible trains within the device's
memory (the real all-MiniLM-L6-v2, measured on this host)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from legend.federation.memory import fit_memory_bound, measure_peak_memory, measurement_noise
from legend.models.spec import get_model_spec
from legend.planner.costs import Calibration, CostModel
from legend.planner.errors import PlannerInputError
from legend.planner.profiles import DeviceProfile, Fleet, JobParams

DEVICE = DeviceProfile(
    device_id="d", tflops=1.0, memory_gb=8.0, uplink_mbps=20, downlink_mbps=50, num_samples=9
)

# A calibration file as `legend calibrate` wrote it before memory was measured.
OLD_CALIBRATION = {
    "backward_per_layer_s": 0.05,
    "batch_size": 16,
    "forward_s": 0.3,
    "host": "x86_64 cpu, 2 cores",
    "host_tflops": 0.01,
    "lora_per_rank_s": 1e-5,
    "model": "all-MiniLM-L6-v2",
    "peak_memory_bytes": None,
    "seq_len": 48,
    "target_modules": ["query", "value"],
}


def measured_calibration(**memory: float) -> Calibration:
    data = dict(OLD_CALIBRATION, **memory)
    return Calibration.from_json(json.dumps(data))


# -- the fit --------------------------------------------------------------------------------


def test_fit_recovers_an_affine_model_and_bounds_noisy_measurements() -> None:
    exact = [(d, d * r, 100e6 + d * 40e6 + d * r * 30e3) for d in (1, 2, 4, 6) for r in (2, 16)]
    fit = fit_memory_bound(exact)
    assert fit.headroom == pytest.approx(0.0, abs=1.0)
    assert (fit.static, fit.per_layer, fit.per_rank) == pytest.approx((100e6, 40e6, 30e3))

    rng = np.random.default_rng(0)
    noisy = [(d, s, m + rng.normal(0, 4e6)) for d, s, m in exact]
    fit = fit_memory_bound(noisy)
    over = [fit.predict(d, s) - m for d, s, m in noisy]
    assert min(over) >= 0  # an upper bound of every measurement
    assert fit.headroom > 0  # noise: a left-out sample is not covered by its neighbours
    # Tight: without the headroom the bound touches at least one measurement.
    assert min(over) == pytest.approx(fit.headroom, abs=1e3)
    assert min(fit.static, fit.per_layer, fit.per_rank) >= 0


def test_measurement_noise_raises_the_bound_by_the_largest_repeat_difference() -> None:
    """Neighbours that measured low by chance: the jackknife alone cannot see it, the repeat
    difference can. The bound of a configuration measured high in another process holds."""
    exact = [(d, d * r, 100e6 + d * 40e6 + d * r * 30e3) for d in (1, 2, 4, 6) for r in (2, 16)]
    noise = measurement_noise([150e6, 300e6], [158e6, 297e6])
    assert noise == pytest.approx(8e6)
    plain, raised = fit_memory_bound(exact), fit_memory_bound(exact, noise=noise)
    assert raised.noise == noise
    assert raised.headroom == pytest.approx(plain.headroom + noise)
    assert raised.static == pytest.approx(plain.static + noise)
    # Depth 3 was not measured; in another process it peaks 7 MB above the affine truth.
    truth = 100e6 + 3 * 40e6 + 48 * 30e3
    assert plain.predict(3, 48) < truth + 7e6 <= raised.predict(3, 48)


def test_measurement_noise_and_fit_refuse_bad_input() -> None:
    from legend.federation.errors import FederationInputError

    with pytest.raises(FederationInputError, match="measured twice"):
        measurement_noise([1e6, 2e6], [1e6])
    with pytest.raises(FederationInputError, match="measured twice"):
        measurement_noise([], [])
    samples = [(1, 2, 1e6), (2, 4, 2e6), (4, 8, 4e6)]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(FederationInputError, match="`noise`"):
            fit_memory_bound(samples, noise=bad)


def test_fit_needs_three_samples() -> None:
    from legend.federation.errors import FederationInputError

    with pytest.raises(FederationInputError, match="at least three samples"):
        fit_memory_bound([(1, 2, 1e6), (2, 4, 2e6)])


# -- the calibration file and the cost model --------------------------------------------------


def test_an_old_calibration_loads_and_keeps_the_analytic_memory() -> None:
    cal = Calibration.from_json(json.dumps(OLD_CALIBRATION))
    assert not cal.has_memory and cal.memory_samples == ()
    spec = get_model_spec("all-MiniLM-L6-v2", target_modules="qv")
    job = JobParams(batch_size=16, seq_len=48)
    with_cal = CostModel(spec, job, cal)
    analytic = CostModel(spec, job)
    assert not with_cal.memory_model.measured
    layers, ranks = (3, 4, 5), (4, 8, 8)
    expected = (
        (spec.total_params - spec.head_params) * 4  # frozen fp32 weights
        + spec.head_params * 4
        + spec.head_params * 16  # the head's AdamW state
        + 16 * 48 * (4 * spec.hidden_size + spec.intermediate_size) * 4
        + 16 * spec.num_attention_heads * 48 * 48 * 4  # workspace
        + 3 * spec.activation_bytes_per_layer(16, 48, 4)
        + spec.lora_params(layers, ranks) * 16
    )
    for costs in (with_cal, analytic):
        assert costs.evaluate(DEVICE, layers, ranks).memory_bytes == pytest.approx(expected)


def test_measured_memory_round_trips_and_drives_c6() -> None:
    cal = measured_calibration(
        memory_static_bytes=150e6,
        memory_per_layer_bytes=46e6,
        memory_per_rank_bytes=10e3,
        memory_headroom_bytes=12e6,
        memory_samples=[[1, 2, 180e6], [6, 16, 410e6]],
        memory_method="peak RSS",
    )
    again = Calibration.from_json(cal.to_json())
    assert again == cal and again.memory_samples == ((1, 2, 180e6), (6, 16, 410e6))
    spec = get_model_spec("all-MiniLM-L6-v2", target_modules="qv")
    job = JobParams(batch_size=16, seq_len=48, ranks=(2, 4, 8, 16))
    costs = CostModel(spec, job, cal)
    assert costs.memory_model.measured
    layers, ranks = (3, 4, 5), (4, 8, 8)
    assert costs.evaluate(DEVICE, layers, ranks).memory_bytes == pytest.approx(
        150e6 + 3 * 46e6 + 20 * 10e3
    )
    # A scattered layer set pays activations for every layer backward runs through.
    assert costs.memory_bytes((1, 5), (8, 8)) == pytest.approx(150e6 + 5 * 46e6 + 16 * 10e3)
    # The formulation's linear table says the same.
    table = costs.table(DEVICE)
    k = {r: i for i, r in enumerate(job.ranks)}
    from_table = table.memory_const_bytes + sum(
        table.memory_coef_bytes[layer][k[r]] for layer, r in zip(layers, ranks, strict=True)
    )
    assert from_table == pytest.approx(costs.evaluate(DEVICE, layers, ranks).memory_bytes)


def test_measured_memory_follows_the_job_shape() -> None:
    cal = measured_calibration(
        memory_static_bytes=150e6, memory_per_layer_bytes=46e6, memory_per_rank_bytes=10e3
    )
    spec = get_model_spec("all-MiniLM-L6-v2", target_modules="qv")
    same = CostModel(spec, JobParams(batch_size=16, seq_len=48), cal).memory_model
    double = CostModel(spec, JobParams(batch_size=32, seq_len=48), cal).memory_model
    half = CostModel(spec, JobParams(batch_size=16, seq_len=48, weight_precision="fp16"), cal)
    assert (same.static_bytes, same.per_layer_bytes) == (150e6, 46e6)
    # Twice the batch: twice the activations per layer, a larger workspace.
    assert double.per_layer_bytes == pytest.approx(2 * 46e6)
    assert double.static_bytes > same.static_bytes
    assert double.per_rank_bytes == same.per_rank_bytes
    # Half-precision frozen weights: the frozen part of static halves.
    frozen_fp32 = (spec.total_params - spec.head_params) * 4
    assert half.memory_model.static_bytes == pytest.approx(150e6 - frozen_fp32 / 2)


def test_partial_memory_fields_are_refused() -> None:
    with pytest.raises(PlannerInputError, match="together or not at all"):
        measured_calibration(memory_static_bytes=1e8)
    with pytest.raises(PlannerInputError, match=">= 0"):
        measured_calibration(
            memory_static_bytes=1e8, memory_per_layer_bytes=-1.0, memory_per_rank_bytes=0.0
        )


# -- the planner's feasible configuration trains within the device's memory -------------------


@pytest.mark.slow
def test_planned_minilm_configuration_trains_within_device_memory() -> None:
    """Calibrate MiniLM's memory on this host (depths 1, 2, 4 and 6 at ranks 2, 8 and 16),
    give a device exactly the predicted memory of depth 3 at rank 16 (depth 3 not measured),
    let the planner choose the most useful configuration that fits (it is memory-bound: a
    fourth layer costs far more than the ranks), train it in a fresh process and compare its
    measured peak with the device's memory."""
    from legend.federation.calibrate import run_calibration
    from legend.planner.api import PlannerOptions, plan_round

    batch, seq = 16, 48
    result = run_calibration(
        "all-MiniLM-L6-v2",
        batch_size=batch,
        seq_len=seq,
        ranks=(2, 8, 16),
        depths=(1, 2, 4, 6),
        repeats=1,
        passes=1,
    )
    cal = result.calibration
    assert cal.has_memory and len(cal.memory_samples) == 12
    # Three configurations were measured twice; their difference is in the headroom.
    assert cal.memory_headroom_bytes is not None and cal.memory_headroom_bytes > 0
    assert all(s.predicted_bytes >= s.peak_bytes for s in result.memory_samples)
    spec = get_model_spec("all-MiniLM-L6-v2", target_modules="qv")
    job = JobParams(batch_size=batch, seq_len=seq, local_steps=1, ranks=(2, 4, 8, 16))
    costs = CostModel(spec, job, cal)
    L = spec.num_layers
    budget = costs.memory_bytes(tuple(range(L - 3, L)), (16, 16, 16))
    device = DeviceProfile(
        device_id="tight",
        tflops=1.0,
        memory_gb=budget / 1e9,
        uplink_mbps=100,
        downlink_mbps=100,
        num_samples=100,
    )
    plan = plan_round(
        Fleet(devices=(device,)),
        spec,
        job,
        PlannerOptions(objective="deadline", deadline_s=1e6),
        calibration=cal,
    )
    chosen = plan.devices[0]
    predicted = costs.memory_bytes(chosen.layers, chosen.ranks)
    assert chosen.participates
    assert predicted <= device.memory_bytes
    assert predicted >= 0.9 * device.memory_bytes  # the planner used the memory it had
    (measured,) = measure_peak_memory(
        "all-MiniLM-L6-v2", [(chosen.layers, chosen.ranks)], batch_size=batch, seq_len=seq
    )
    print(
        f"planned layers {chosen.layers} ranks {chosen.ranks}: predicted {predicted / 1e6:.1f} "
        f"MB, device {device.memory_bytes / 1e6:.1f} MB, measured peak {measured / 1e6:.1f} MB"
    )
    assert measured <= device.memory_bytes, (chosen, measured / 1e6, device.memory_bytes / 1e6)
    # Without the measurement the analytic model admits more than the device can hold.
    analytic = CostModel(spec, job).memory_bytes(chosen.layers, chosen.ranks)
    assert analytic < measured
