"""Server optimizers (FedAvg, FedAvgM, FedAdam) over adapter states: known answers."""

from __future__ import annotations

import numpy as np
import pytest

from legend.federation.adapters import AdapterState, ClientUpdate
from legend.federation.server_opt import (
    OptimizerState,
    ServerOptimizer,
    ServerOptimizerError,
    trained_slots,
)


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


def _slots(a: list[float]) -> AdapterState:
    """One module whose ``A`` has one column and a row per rank slot; ``B`` and head zero."""
    col = np.asarray(a, np.float32).reshape(len(a), 1)
    return AdapterState(
        factors={(0, "query"): (col, np.zeros((3, len(a)), np.float32))},
        head={"classifier.bias": np.zeros(2, np.float32)},
    )


def _slot_values(s: AdapterState) -> np.ndarray:
    return s.factors[(0, "query")][0].ravel().astype(np.float64)


def _train_slot0_then_slot1_once(lazy: bool) -> list[float]:
    """Rounds 1-20 train slot 0 only (noisy deltas), round 21 trains slot 1 once by 0.01,
    rounds 22-51 train nothing; returns slot 1's displacement after round 21 and after 51."""
    opt = ServerOptimizer(kind="adam", lr=0.1, lazy=lazy)
    rng = np.random.default_rng(0)
    x, st = _slots([0, 0]), None
    for _ in range(20):
        now = _slot_values(x)
        x, st = opt.step(x, _slots([now[0] + 0.01 * rng.normal(), now[1]]), st, {(0, "query"): 1})
    before = _slot_values(x)[1]
    x, st = opt.step(x, _slots([_slot_values(x)[0], before + 0.01]), st, {(0, "query"): 2})
    after_update = _slot_values(x)[1] - before
    for _ in range(30):
        x, st = opt.step(x, x, st, {})
    return [after_update, _slot_values(x)[1] - before]


def test_dense_adam_amplifies_a_single_update_of_a_rarely_trained_slot() -> None:
    # The pathology lazy stepping removes: after one 0.01 update the dense optimizer keeps
    # moving the slot on its momentum for rounds nobody trained it, ~10 lr in all.
    first, total = _train_slot0_then_slot1_once(lazy=False)
    assert total > 3 * first > 0
    assert total > 0.3


def test_lazy_adam_moves_a_slot_only_in_the_rounds_that_train_it() -> None:
    first, total = _train_slot0_then_slot1_once(lazy=True)
    # its own first step, bias-corrected per parameter: lr * d / (|d| + tau)
    assert first == pytest.approx(0.1 * 0.01 / 0.011, rel=1e-4)
    assert total == first


@pytest.mark.parametrize("kind", ["adam", "momentum"])
def test_lazy_equals_dense_when_every_slot_is_trained(kind) -> None:
    rng = np.random.default_rng(1)
    runs = []
    for lazy in (False, True):
        opt = ServerOptimizer(kind=kind, lr=0.05, lazy=lazy)
        x, st = _slots([0, 0, 0]), None
        for _ in range(8):
            target = _slots(list(_slot_values(x) + rng.normal(size=3) * 0.1))
            x, st = opt.step(x, target, st, {(0, "query"): 3})
        runs.append(_slot_values(x))
        rng = np.random.default_rng(1)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_lazy_momentum_holds_untrained_slots_and_their_momentum() -> None:
    opt = ServerOptimizer(kind="momentum", lr=1.0, beta1=0.5)
    x1, st = opt.step(_slots([0, 0]), _slots([1, 1]), None, {(0, "query"): 2})
    np.testing.assert_allclose(_slot_values(x1), [1, 1])
    # round 2 trains slot 0 only (delta 0): slot 0 coasts on 0.5 * m, slot 1 stays put
    x2, st = opt.step(x1, x1, st, {(0, "query"): 1})
    np.testing.assert_allclose(_slot_values(x2), [1.5, 1.0])
    assert st.m is not None
    np.testing.assert_allclose(st.m.factors[(0, "query")][0].ravel(), [0.5, 1.0])


def test_trained_slots_is_the_largest_rank_per_module() -> None:
    def update(device: str, ranks: dict[int, int]) -> ClientUpdate:
        factors = {
            (layer, "query"): (np.zeros((r, 4), np.float32), np.zeros((5, r), np.float32))
            for layer, r in ranks.items()
        }
        return ClientUpdate(
            device_id=device, num_samples=1, state=AdapterState(factors=factors, head={})
        )

    got = trained_slots([update("a", {5: 2}), update("b", {4: 8, 5: 16}), update("c", {5: 4})])
    assert got == {(5, "query"): 16, (4, "query"): 8}


def test_lazy_counts_round_trip_and_a_dense_checkpoint_still_resumes(tmp_path) -> None:
    opt = ServerOptimizer(kind="adam", lr=0.1)
    _, st = opt.step(_slots([0, 0]), _slots([1, 1]), None, {(0, "query"): 1})
    assert st is not None and st.count is not None
    np.testing.assert_array_equal(st.count.factors[(0, "query")][0].ravel(), [1, 0])
    back = OptimizerState.load(tmp_path, st.save(tmp_path, "r1"))
    assert back.count is not None and back.count.equals(st.count)
    # a checkpoint of the dense optimizer has no counts: every parameter counts every round
    dense = OptimizerState(step=st.step, m=st.m, v=st.v)
    a, _ = opt.step(_slots([1, 0]), _slots([2, 1]), dense, {(0, "query"): 2})
    b, _ = opt.step(
        _slots([1, 0]),
        _slots([2, 1]),
        OptimizerState(step=1, m=st.m, v=st.v, count=_count(1)),
        {(0, "query"): 2},
    )
    assert a.equals(b)


def _count(n: float) -> AdapterState:
    return AdapterState(
        factors={(0, "query"): (np.full((2, 1), n, np.float32), np.full((3, 2), n, np.float32))},
        head={"classifier.bias": np.full(2, n, np.float32)},
    )
