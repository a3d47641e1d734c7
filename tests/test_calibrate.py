"""Host calibration on tiny-bert: the fitted step-time model predicts real step times."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from legend.federation.calibrate import (
    CalibrationResult,
    default_calibration_path,
    fit_step_time,
    load_or_none,
    run_calibration,
)
from legend.federation.cli import main
from legend.federation.errors import FederationInputError
from legend.models.spec import get_model_spec
from legend.planner.costs import Calibration, CostModel
from legend.planner.errors import PlannerInputError
from legend.planner.profiles import DeviceProfile, JobParams

BATCH, SEQ = 8, 32


@pytest.fixture(scope="module")
def result() -> CalibrationResult:
    return run_calibration(
        "tiny-bert", batch_size=BATCH, seq_len=SEQ, target_modules="all", ranks=(2, 16), repeats=6
    )


def test_fit_reproduces_the_measurements(result: CalibrationResult) -> None:
    cal = result.calibration
    assert (cal.model, cal.batch_size, cal.seq_len) == ("tiny-bert", BATCH, SEQ)
    assert cal.target_modules == get_model_spec("tiny-bert", target_modules="all").target_modules
    assert {(s.depth, s.rank) for s in result.samples} == {
        (d, r) for d in (1, 2, 3, 4) for r in (2, 16)
    }
    assert all(len(s.times_s) == 6 and s.step_s == min(s.times_s) for s in result.samples)
    assert cal.forward_s > 0 and cal.backward_per_layer_s > 0 and cal.lora_per_rank_s >= 0
    assert cal.host_tflops > 0
    # Robust fit on a shared host: the typical configuration within 15%, none off by 2x.
    assert result.median_rel_error < 0.15
    assert result.max_rel_error < 1.0
    assert result.forward_only_s > 0


def test_memory_is_measured_per_depth_and_bounded(result: CalibrationResult) -> None:
    cal = result.calibration
    assert cal.has_memory and cal.memory_method.startswith("peak resident set size")
    assert {(m.depth, m.rank) for m in result.memory_samples} == {
        (d, r) for d in (1, 2, 3, 4) for r in (2, 16)
    }
    assert cal.memory_samples == tuple(
        (m.depth, m.rank, m.peak_bytes) for m in result.memory_samples
    )
    # The fitted bound covers every measurement; each adapted layer costs memory.
    assert all(m.predicted_bytes >= m.peak_bytes for m in result.memory_samples)
    assert cal.memory_per_layer_bytes is not None and cal.memory_per_layer_bytes > 0
    deepest = max(m.peak_bytes for m in result.memory_samples if m.depth == 4)
    shallowest = min(m.peak_bytes for m in result.memory_samples if m.depth == 1)
    assert deepest > shallowest
    # Round trip through the JSON file keeps the memory fields.
    assert Calibration.from_json(cal.to_json()) == cal


def test_fit_predicts_a_held_out_depth(result: CalibrationResult) -> None:
    """Fit without depth 3 and predict depth 3's measured steps (taken in the same sweeps,
    so load on the host affects them like the rest)."""
    train = [(s.depth, s.depth * s.rank, s.step_s) for s in result.samples if s.depth != 3]
    forward_s, backward_s, lora_s = fit_step_time(train)
    for s in result.samples:
        if s.depth == 3:
            predicted = forward_s + 3 * backward_s + 3 * s.rank * lora_s
            # Loose: other jobs share the CI cores, and a burst can slow any measurement.
            assert 1 / 1.6 < predicted / s.step_s < 1.6, (s, predicted)


def test_calibrated_cost_model_uses_the_fitted_step_time(result: CalibrationResult) -> None:
    cal = result.calibration
    spec = get_model_spec("tiny-bert", target_modules="all")
    job = JobParams(batch_size=2 * BATCH, seq_len=SEQ, target_modules="all", local_steps=3)
    costs = CostModel(spec, job, cal)
    host_like = DeviceProfile(
        device_id="host",
        tflops=cal.host_tflops,
        memory_gb=8.0,
        uplink_mbps=1e3,
        downlink_mbps=1e3,
        num_samples=1,
    )
    layers, ranks = (1, 2, 3), (4, 8, 8)  # a mix of ranks the calibration never timed
    step_s = cal.forward_s + 3 * cal.backward_per_layer_s + 20 * cal.lora_per_rank_s
    # Twice the tokens of the calibration batch: twice its time, for each of three steps.
    expected = 3 * 2 * step_s
    assert costs.evaluate(host_like, layers, ranks).compute_s == pytest.approx(expected)


def test_calibrated_cost_model_is_monotone_in_depth(result: CalibrationResult) -> None:
    spec = get_model_spec("tiny-bert", target_modules="all")
    job = JobParams(batch_size=BATCH, seq_len=SEQ, target_modules="all")
    costs = CostModel(spec, job, result.calibration)
    device = DeviceProfile(
        device_id="d", tflops=2.0, memory_gb=4.0, uplink_mbps=20, downlink_mbps=50, num_samples=9
    )
    L = spec.num_layers
    for rank in (2, 16):
        times = [
            costs.evaluate(device, tuple(range(L - d, L)), (rank,) * d).compute_s
            for d in range(1, L + 1)
        ]
        assert all(b > a for a, b in itertools.pairwise(times)), times
    # Host seconds scale to a device by the ratio of throughputs.
    slow = DeviceProfile(
        device_id="s", tflops=1.0, memory_gb=4.0, uplink_mbps=20, downlink_mbps=50, num_samples=9
    )
    fast_s = costs.evaluate(device, (3,), (2,)).compute_s
    assert costs.evaluate(slow, (3,), (2,)).compute_s == pytest.approx(2 * fast_s)


def test_default_path_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_calibration_path("tiny-bert", batch_size=8, seq_len=32)
    assert path == tmp_path / "legend" / "calibration" / "tiny-bert-b8-s32.json"
    assert default_calibration_path("tiny-bert", target_modules="all").name == (
        "tiny-bert-b16-s64-all.json"
    )
    assert default_calibration_path("/models/my-bert", target_modules=("query", "value")).name == (
        "my-bert-b16-s64-query+value.json"
    )
    assert load_or_none("tiny-bert", batch_size=8, seq_len=32) is None
    path.parent.mkdir(parents=True)
    path.write_text("not json")
    with pytest.raises(PlannerInputError, match="legend calibrate --model"):
        load_or_none("tiny-bert", batch_size=8, seq_len=32)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(FederationInputError, match="`batch_size` must be an integer >= 1, got 0"):
        run_calibration("tiny-bert", batch_size=0)
    with pytest.raises(FederationInputError, match="exceeds the 128 positions"):
        run_calibration("tiny-bert", seq_len=512)
    with pytest.raises(FederationInputError, match=r"`depths` \[9\] are outside 1\.\.4"):
        run_calibration("tiny-bert", depths=(1, 9))
    with pytest.raises(FederationInputError, match="at least two depths and two ranks"):
        run_calibration("tiny-bert", ranks=(8,))


def test_command_writes_a_loadable_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cal.json"
    args = ["calibrate", "--model", "tiny-bert", "--batch-size", "4", "--seq-len", "16"]
    args += ["--ranks", "2,8", "--repeats", "2", "--no-memory", "--out", str(out)]
    assert main(args) == 0
    cal = Calibration.load(out)
    assert not cal.has_memory  # --no-memory: C6 keeps the analytic memory model
    assert (cal.model, cal.batch_size, cal.seq_len, cal.target_modules) == (
        "tiny-bert",
        4,
        16,
        ("query", "value"),
    )
    printed = capsys.readouterr().out
    assert "backward_per_layer_s" in printed and str(out) in printed
    # Bad input exits with status 2 and one line naming the problem.
    assert main(["calibrate", "--model", "roberta-large", "--out", str(out)]) == 2
    assert "not available offline" in capsys.readouterr().err
