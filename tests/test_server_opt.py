"""Server optimizers (FedAvg, FedAvgM, FedAdam) over adapter states: known answers."""

from __future__ import annotations

import numpy as np
import pytest

from legend.federation.adapters import AdapterState
from legend.federation.server_opt import OptimizerState, ServerOptimizer, ServerOptimizerError


def _state(a: float, b: float, h: float) -> AdapterState:
    return AdapterState(
        factors={(3, "query"): (np.full((2, 4), a, np.float32), np.full((5, 2), b, np.float32))},
        head={"classifier.bias": np.full(2, h, np.float32)},
    )


def _values(s: AdapterState) -> tuple[float, float, float]:
    a, b = s.factors[(3, "query")]
    return float(a[0, 0]), float(b[0, 0]), float(s.head["classifier.bias"][0])


def test_none_takes_the_aggregate() -> None:
    prev, agg = _state(0, 0, 0), _state(1, 2, 3)
    new, st = ServerOptimizer().step(prev, agg, None)
    assert new is agg and st is None


def test_momentum_accumulates_deltas() -> None:
    opt = ServerOptimizer(kind="momentum", lr=0.5, beta1=0.9)
    x0 = _state(0, 0, 0)
    x1, st = opt.step(x0, _state(1, 2, -1), None)
    np.testing.assert_allclose(_values(x1), (0.5, 1.0, -0.5))
    # Second round: delta (1, 1, 1) relative to x1; m = 0.9 * m + delta.
    x2, st = opt.step(x1, _state(1.5, 2.0, 0.5), st)
    np.testing.assert_allclose(_values(x2), (0.5 + 0.5 * 1.9, 1.0 + 0.5 * 2.8, -0.5 + 0.5 * 0.1))
    assert st is not None and st.step == 2 and st.v is None


def test_adam_first_step_is_lr_times_sign_damped_by_tau() -> None:
    opt = ServerOptimizer(kind="adam", lr=0.1, tau=1e-3)
    x1, st = opt.step(_state(0, 0, 0), _state(0.01, -1.0, 0.0), None)
    # Bias-corrected first step: lr * d / (|d| + tau); zero delta stays put.
    np.testing.assert_allclose(
        _values(x1), (0.1 * 0.01 / 0.011, -0.1 * 1.0 / 1.001, 0.0), rtol=1e-5
    )
    assert st is not None and st.step == 1 and st.m is not None and st.v is not None


def test_adam_steps_are_scale_invariant_where_tau_is_small() -> None:
    opt = ServerOptimizer(kind="adam", lr=0.05, tau=1e-8)
    small, _ = opt.step(_state(0, 0, 0), _state(1e-3, 1e-3, 1e-3), None)
    large, _ = opt.step(_state(0, 0, 0), _state(10.0, 10.0, 10.0), None)
    np.testing.assert_allclose(_values(small), _values(large), rtol=1e-4)


def test_state_round_trips_through_files(tmp_path) -> None:
    opt = ServerOptimizer(kind="adam", lr=0.1)
    _, st = opt.step(_state(0, 0, 0), _state(1, 2, 3), None)
    assert st is not None
    entry = st.save(tmp_path, "round_0001_server_opt")
    back = OptimizerState.load(tmp_path, entry)
    assert back.step == st.step
    assert back.m is not None and st.m is not None and back.m.equals(st.m)
    assert back.v is not None and st.v is not None and back.v.equals(st.v)
    # The same next step from the original and the reloaded state.
    a, _ = opt.step(_state(1, 1, 1), _state(2, 2, 2), st)
    b, _ = opt.step(_state(1, 1, 1), _state(2, 2, 2), back)
    assert a.equals(b)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kind": "yogi"}, "`server_optimizer` must be one of none, momentum, adam, got 'yogi'"),
        ({"lr": 0.0}, "`server_lr` must be > 0, got 0.0"),
        ({"beta1": 1.0}, "`server_beta1` must be in [0, 1), got 1.0"),
        ({"tau": -1.0}, "`server_tau` must be > 0, got -1.0"),
    ],
)
def test_bad_settings_name_the_field(kwargs, needle) -> None:
    with pytest.raises(ServerOptimizerError) as err:
        ServerOptimizer(**kwargs)
    assert needle in str(err.value)
    assert isinstance(err.value, ValueError)


def test_bad_checkpoint_entry_is_named(tmp_path) -> None:
    with pytest.raises(ServerOptimizerError, match="no integer `step`"):
        OptimizerState.load(tmp_path, {"m": "x.npz"})
