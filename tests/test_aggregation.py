"""Aggregation rules: one conformance suite every rule runs, then rule-specific properties."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from legend.federation.adapters import (
    AdapterState,
    ClientUpdate,
    check_update,
    init_global,
    slice_for,
)
from legend.federation.aggregation import (
    AGGREGATORS,
    DEFAULT_AGGREGATOR,
    AggregationInputError,
    aggregate_ffa,
    aggregate_flexlora,
    aggregate_hetlora,
    aggregate_slotwise,
    get_aggregator,
)
from legend.models.errors import InputError
from legend.models.spec import get_model_spec

RULES = sorted(AGGREGATORS)
NUM_LAYERS = 4
DIMS = {"q": (6, 5), "v": (6, 3)}  # module -> (in, out)
HEAD_SHAPES = {"classifier.weight": (2, 6), "classifier.bias": (2,)}
FAST = settings(max_examples=30, deadline=None)


def make_global(r_max: int, seed: int = 0) -> AdapterState:
    """A global state whose A and B are both non-zero, so 'kept' values are visible."""
    rng = np.random.default_rng(seed)
    factors = {
        (layer, m): (rng.normal(size=(r_max, fan_in)), rng.normal(size=(fan_out, r_max)))
        for layer in range(NUM_LAYERS)
        for m, (fan_in, fan_out) in DIMS.items()
    }
    head = {k: rng.normal(size=s) for k, s in HEAD_SHAPES.items()}
    return AdapterState(factors=factors, head=head)


def trained_update(
    global_state: AdapterState,
    device_id: str,
    num_samples: int,
    layers: Sequence[int],
    ranks: Sequence[int],
    seed: int,
    *,
    train_a: bool = True,
) -> ClientUpdate:
    """The device's slice after 'training': B (and A unless frozen) and the head moved."""
    rng = np.random.default_rng(seed)
    part = slice_for(global_state, layers, ranks)
    factors = {
        k: (a + rng.normal(size=a.shape) if train_a else a, b + rng.normal(size=b.shape))
        for k, (a, b) in part.factors.items()
    }
    head = {k: v + rng.normal(size=v.shape) for k, v in part.head.items()}
    return ClientUpdate(
        device_id=device_id,
        num_samples=num_samples,
        state=AdapterState(factors=factors, head=head),
    )


def product(state: AdapterState, key) -> np.ndarray:
    a, b = state.factors[key]
    return b.astype(np.float64) @ a.astype(np.float64)


@st.composite
def rounds(draw, *, same_plan: bool = False, contiguous: bool = True):
    """A global state and 1-4 updates with LEGEND-style or arbitrary plans."""
    r_max = draw(st.integers(1, 8))
    global_state = make_global(r_max, seed=draw(st.integers(0, 1000)))
    num = draw(st.integers(1, 4))

    def plan():
        if contiguous:
            depth = draw(st.integers(1, NUM_LAYERS))
            layers = list(range(NUM_LAYERS - depth, NUM_LAYERS))
        else:
            layers = draw(st.lists(st.integers(0, NUM_LAYERS - 1), min_size=1, unique=True))
        ranks = [draw(st.integers(1, r_max)) for _ in layers]
        return layers, ranks

    shared = plan()
    updates = []
    for i in range(num):
        layers, ranks = shared if same_plan else plan()
        n = draw(st.integers(1, 100))
        updates.append(trained_update(global_state, f"d{i}", n, layers, ranks, seed=1000 + i))
    return global_state, updates


def trained_keys(updates: Sequence[ClientUpdate]) -> set:
    return {k for u in updates for k in u.state.factors}


# -- registry ---------------------------------------------------------------------------


def test_registry_holds_the_four_rules_and_each_states_its_exactness():
    assert RULES == ["ffa", "flexlora", "hetlora", "slotwise"]
    assert DEFAULT_AGGREGATOR == "slotwise"
    for name in RULES:
        assert get_aggregator(name) is AGGREGATORS[name]
        assert "Exactness" in (AGGREGATORS[name].__doc__ or "")
    with pytest.raises(AggregationInputError, match=r"'fedavg' is unknown") as info:
        get_aggregator("fedavg")
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)


# -- conformance: every rule ------------------------------------------------------------


@pytest.mark.parametrize("name", RULES)
@FAST
@given(case=rounds(contiguous=False))
def test_result_has_the_global_structure(name, case):
    global_state, updates = case
    out = AGGREGATORS[name](global_state, updates)
    assert out.factors.keys() == global_state.factors.keys()
    assert out.head.keys() == global_state.head.keys()
    for key, (a, b) in out.factors.items():
        ga, gb = global_state.factors[key]
        assert a.shape == ga.shape and b.shape == gb.shape
        assert a.dtype == np.float32 and b.dtype == np.float32
        assert np.isfinite(a).all() and np.isfinite(b).all()


@pytest.mark.parametrize("name", RULES)
@FAST
@given(case=rounds(contiguous=False))
def test_untrained_layers_keep_their_previous_value(name, case):
    global_state, updates = case
    out = AGGREGATORS[name](global_state, updates)
    untrained = global_state.factors.keys() - trained_keys(updates)
    for key in untrained:
        np.testing.assert_array_equal(out.factors[key][0], global_state.factors[key][0])
        np.testing.assert_array_equal(out.factors[key][1], global_state.factors[key][1])


@pytest.mark.parametrize("name", RULES)
@FAST
@given(case=rounds(contiguous=False), data=st.data())
def test_order_of_updates_does_not_matter(name, case, data):
    global_state, updates = case
    shuffled = data.draw(st.permutations(updates))
    one = AGGREGATORS[name](global_state, updates)
    two = AGGREGATORS[name](global_state, shuffled)
    for key in global_state.factors:
        if name == "flexlora":
            # The factors are defined up to an orthogonal gauge; the product is not.
            p1, p2 = product(one, key), product(two, key)
            _assume_truncation_well_defined(global_state, updates, key)
            scale = max(1.0, float(np.abs(p1).max()))
            np.testing.assert_allclose(p1, p2, rtol=0, atol=1e-4 * scale)
        else:
            for side in (0, 1):
                np.testing.assert_allclose(
                    one.factors[key][side], two.factors[key][side], rtol=1e-5, atol=1e-6
                )
    for k in global_state.head:
        np.testing.assert_allclose(one.head[k], two.head[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", RULES)
@FAST
@given(case=rounds(contiguous=False), copies=st.integers(1, 4), data=st.data())
def test_identical_updates_aggregate_to_themselves(name, case, copies, data):
    global_state, updates = case
    template = updates[0]
    if name == "ffa":  # an FFA client sends A unchanged
        sent = slice_for(global_state, template.state.layers(), _layer_ranks(template))
        template = ClientUpdate(
            device_id="t",
            num_samples=1,
            state=AdapterState(
                factors={
                    k: (sent.factors[k][0], b) for k, (_, b) in template.state.factors.items()
                },
                head=template.state.head,
            ),
        )
    clones = [
        ClientUpdate(
            device_id=f"c{i}",
            num_samples=data.draw(st.integers(1, 50)),
            state=template.state.copy(),
        )
        for i in range(copies)
    ]
    out = AGGREGATORS[name](global_state, clones)
    for key, (a, b) in template.state.factors.items():
        r = a.shape[0]
        if name == "flexlora":
            np.testing.assert_allclose(
                product(out, key), b.astype(np.float64) @ a, rtol=1e-4, atol=1e-4
            )
        else:
            np.testing.assert_allclose(out.factors[key][0][:r], a, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(out.factors[key][1][:, :r], b, rtol=1e-6, atol=1e-6)
            # Slots beyond the clients' rank were trained by nobody: previous value.
            ga, gb = global_state.factors[key]
            np.testing.assert_array_equal(out.factors[key][0][r:], ga[r:])
            np.testing.assert_array_equal(out.factors[key][1][:, r:], gb[:, r:])
    for k, v in template.state.head.items():
        np.testing.assert_allclose(out.head[k], v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", RULES)
def test_head_is_sample_weighted_fedavg(name):
    global_state = make_global(4)
    updates = [
        trained_update(global_state, "a", 10, [3], [2], seed=1),
        trained_update(global_state, "b", 30, [2, 3], [4, 4], seed=2),
        trained_update(global_state, "c", 60, [1, 2, 3], [1, 2, 3], seed=3),
    ]
    out = AGGREGATORS[name](global_state, updates)
    for k in global_state.head:
        expected = sum(u.num_samples * u.state.head[k].astype(np.float64) for u in updates) / 100
        np.testing.assert_allclose(out.head[k], expected, rtol=1e-6)


@pytest.mark.parametrize("name", RULES)
def test_rules_are_pure(name):
    global_state = make_global(4)
    updates = [
        trained_update(global_state, "a", 10, [3], [2], seed=1),
        trained_update(global_state, "b", 30, [2, 3], [4, 4], seed=2),
    ]
    before_global = global_state.copy()
    before_updates = [u.state.copy() for u in updates]
    out = AGGREGATORS[name](global_state, updates)
    assert global_state.equals(before_global)
    assert all(u.state.equals(b) for u, b in zip(updates, before_updates, strict=True))
    # The result shares no array with its inputs.
    inputs = [
        *global_state.factors.values(),
        *(p for u in updates for p in u.state.factors.values()),
    ]
    arrays = [x for pair in inputs for x in pair]
    for a, b in out.factors.values():
        assert not any(np.shares_memory(a, x) or np.shares_memory(b, x) for x in arrays)


@pytest.mark.parametrize("name", RULES)
def test_no_updates_leave_the_global_state_unchanged(name):
    global_state = make_global(3)
    assert AGGREGATORS[name](global_state, []).equals(global_state)


def _corrupt(update: ClientUpdate, kind: str) -> ClientUpdate:
    factors = dict(update.state.factors)
    head = dict(update.state.head)
    key = sorted(factors)[0]
    a, b = factors[key]
    if kind == "nan":
        a = a.copy()
        a[0, 0] = np.nan
        factors[key] = (a, b)
    elif kind == "unknown key":
        factors[(key[0], "k")] = factors.pop(key)
    elif kind == "rank above r_max":
        factors[key] = (np.vstack([a] * 9), np.hstack([b] * 9))
    elif kind == "inconsistent rank":
        factors[key] = (a, b[:, :0])
    elif kind == "wrong in_features":
        factors[key] = (a[:, 1:], b)
    elif kind == "head shape":
        head["classifier.bias"] = np.zeros(3)
    elif kind == "unknown head":
        head["pooler.weight"] = np.zeros(3)
    return ClientUpdate(
        device_id=update.device_id,
        num_samples=update.num_samples,
        state=AdapterState(factors=factors, head=head),
    )


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("nan", "non-finite"),
        ("unknown key", "not in the global state"),
        ("rank above r_max", r"common rank in 1\.\.4"),
        ("inconsistent rank", r"common rank in 1\.\.4"),
        ("wrong in_features", "do not match the global"),
        ("head shape", "expected"),
        ("unknown head", "not in the global state"),
    ],
)
def test_updates_that_do_not_fit_are_refused(name, kind, match):
    global_state = make_global(4)
    good = trained_update(global_state, "ok", 5, [3], [2], seed=1)
    bad = _corrupt(trained_update(global_state, "bad", 5, [2, 3], [4, 4], seed=2), kind)
    with pytest.raises(AggregationInputError, match=match) as info:
        AGGREGATORS[name](global_state, [good, bad])
    assert "device 'bad'" in str(info.value) and "device 'ok'" not in str(info.value)


@pytest.mark.parametrize("name", RULES)
def test_two_updates_from_one_device_are_refused(name):
    global_state = make_global(4)
    update = trained_update(global_state, "twice", 5, [3], [2], seed=1)
    with pytest.raises(AggregationInputError, match="more than one update"):
        AGGREGATORS[name](global_state, [update, update])


@pytest.mark.parametrize("name", RULES)
def test_rules_run_on_a_real_model_shape(name):
    """tiny-llama, all seven modules: plans from the output, checked updates, one round."""
    spec = get_model_spec("tiny-llama", target_modules="all")
    head = {"score.weight": np.zeros((2, spec.hidden_size), dtype=np.float32)}
    global_state = init_global(spec, 8, head, seed=0)
    plans = [([3], [8]), ([2, 3], [4, 8]), ([0, 1, 2, 3], [2, 2, 4, 4])]
    updates = [
        trained_update(global_state, f"d{i}", 10 + i, layers, ranks, seed=i, train_a=name != "ffa")
        for i, (layers, ranks) in enumerate(plans)
    ]
    for u, (layers, ranks) in zip(updates, plans, strict=True):
        assert (
            check_update(
                u, layers=layers, ranks=ranks, global_state=global_state, frozen_a=name == "ffa"
            )
            == []
        )
    out = AGGREGATORS[name](global_state, updates)
    assert out.ranks() == global_state.ranks()
    # Every layer was trained by someone, so B (zero at init) became non-zero everywhere.
    assert all(np.abs(b).max() > 0 for _, b in out.factors.values())


def _layer_ranks(update: ClientUpdate) -> list[int]:
    ranks = update.state.layer_ranks()
    return [ranks[layer] for layer in update.state.layers()]


def _dense_weighted_sum(updates: Sequence[ClientUpdate], key) -> np.ndarray:
    holders = [u for u in updates if key in u.state.factors]
    total = sum(u.num_samples for u in holders)
    return sum(u.num_samples / total * product(u.state, key) for u in holders)


def _assume_truncation_well_defined(global_state, updates, key) -> None:
    """The best rank-r approximation is unique only with a gap at the cut-off."""
    if key not in trained_keys(updates):
        return
    r_max = global_state.factors[key][0].shape[0]
    s = np.linalg.svd(_dense_weighted_sum(updates, key), compute_uv=False)
    if s.shape[0] > r_max:
        assume(s[r_max - 1] - s[r_max] > 1e-2 * s[0])


# -- slot-wise ----------------------------------------------------------------------------


@FAST
@given(case=rounds(same_plan=True))
def test_slotwise_with_a_uniform_plan_is_fedavg_of_a_and_b(case):
    global_state, updates = case
    out = aggregate_slotwise(global_state, updates)
    weights = np.array([u.num_samples for u in updates], dtype=np.float64)
    for key in trained_keys(updates):
        r = updates[0].state.ranks()[key]
        a, b = out.factors[key]
        for side, got in ((0, a[:r]), (1, b[:, :r])):
            stacked = np.stack([u.state.factors[key][side] for u in updates])
            expected = np.average(stacked, axis=0, weights=weights)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_slotwise_averages_each_slot_over_its_own_trainers():
    global_state = make_global(4)
    low = trained_update(global_state, "low", 1, [3], [2], seed=1)
    high = trained_update(global_state, "high", 3, [2, 3], [3, 3], seed=2)
    out = aggregate_slotwise(global_state, [low, high])
    key = (3, "q")
    (la, lb), (ha, hb) = low.state.factors[key], high.state.factors[key]
    a, b = out.factors[key]
    np.testing.assert_allclose(a[:2], (1 * la + 3 * ha[:2]) / 4, rtol=1e-6)
    np.testing.assert_allclose(b[:, :2], (1 * lb + 3 * hb[:, :2]) / 4, rtol=1e-6)
    np.testing.assert_allclose(a[2], ha[2], rtol=1e-6)  # only "high" trained slot 2
    np.testing.assert_allclose(b[:, 2], hb[:, 2], rtol=1e-6)
    ga, gb = global_state.factors[key]
    np.testing.assert_array_equal(a[3], ga[3])  # nobody trained slot 3
    np.testing.assert_array_equal(b[:, 3], gb[:, 3])
    np.testing.assert_allclose(out.factors[(2, "v")][0][:3], high.state.factors[(2, "v")][0])
    np.testing.assert_array_equal(out.factors[(1, "v")][0], global_state.factors[(1, "v")][0])


def test_slotwise_is_not_exact_for_different_updates():
    """mean(B) mean(A) != mean(B A): the documented inexactness of separate averaging."""
    global_state = make_global(2)
    updates = [
        trained_update(global_state, "a", 1, [3], [2], seed=1),
        trained_update(global_state, "b", 1, [3], [2], seed=2),
    ]
    out = aggregate_slotwise(global_state, updates)
    gap = np.abs(product(out, (3, "q")) - _dense_weighted_sum(updates, (3, "q"))).max()
    assert gap > 1e-2


# -- HetLoRA ----------------------------------------------------------------------------


def test_hetlora_uses_zero_padding_and_norm_weights():
    global_state = make_global(4)
    low = trained_update(global_state, "low", 10, [3], [2], seed=1)
    high = trained_update(global_state, "high", 30, [3], [4], seed=2)
    out = aggregate_hetlora(global_state, [low, high])
    key = (3, "v")
    norms = np.array([np.linalg.norm(product(u.state, key)) * u.num_samples for u in (low, high)])
    p = norms / norms.sum()
    (la, lb), (ha, hb) = low.state.factors[key], high.state.factors[key]
    pad_a = np.zeros((4, la.shape[1]))
    pad_a[:2] = la
    pad_b = np.zeros((hb.shape[0], 4))
    pad_b[:, :2] = lb
    np.testing.assert_allclose(out.factors[key][0], p[0] * pad_a + p[1] * ha, rtol=1e-5)
    np.testing.assert_allclose(out.factors[key][1], p[0] * pad_b + p[1] * hb, rtol=1e-5)
    # A slot trained by one client only shrinks by that client's weight (zero padding).
    np.testing.assert_allclose(out.factors[key][0][3], p[1] * ha[3], rtol=1e-5)


def test_hetlora_weights_are_the_papers_norm_weights_when_samples_are_equal():
    """Legend's variant multiplies the paper's weight ``||B_i A_i||_F`` by ``n_i``; with equal
    ``n_i`` the two agree, and with unequal ``n_i`` the samples count."""
    global_state = make_global(3)
    key = (3, "q")
    for samples in ((7, 7, 7), (1, 5, 20)):
        updates = [
            trained_update(global_state, f"d{i}", n, [3], [3], seed=10 + i)
            for i, n in enumerate(samples)
        ]
        norms = np.array([np.linalg.norm(product(u.state, key)) for u in updates])
        paper = norms / norms.sum()
        legend = norms * samples / (norms * samples).sum()
        out = aggregate_hetlora(global_state, updates)
        expected = sum(p * u.state.factors[key][0] for p, u in zip(legend, updates, strict=True))
        np.testing.assert_allclose(out.factors[key][0], expected, rtol=1e-5)
        if len(set(samples)) == 1:
            np.testing.assert_allclose(legend, paper)
        else:
            assert np.abs(legend - paper).max() > 0.1


def test_hetlora_keeps_slots_beyond_every_rank():
    global_state = make_global(6)
    updates = [
        trained_update(global_state, "a", 3, [2, 3], [1, 2], seed=1),
        trained_update(global_state, "b", 4, [3], [3], seed=2),
    ]
    out = aggregate_hetlora(global_state, updates)
    for key, r in (((3, "q"), 3), ((2, "v"), 1)):
        ga, gb = global_state.factors[key]
        np.testing.assert_array_equal(out.factors[key][0][r:], ga[r:])
        np.testing.assert_array_equal(out.factors[key][1][:, r:], gb[:, r:])


def test_hetlora_falls_back_to_sample_weights_when_every_update_is_zero():
    global_state = make_global(2)
    updates = []
    for i, n in enumerate((1, 3)):
        u = trained_update(global_state, f"d{i}", n, [3], [2], seed=i)
        factors = {k: (a, np.zeros_like(b)) for k, (a, b) in u.state.factors.items()}
        updates.append(
            ClientUpdate(
                device_id=u.device_id,
                num_samples=n,
                state=AdapterState(factors=factors, head=u.state.head),
            )
        )
    out = aggregate_hetlora(global_state, updates)
    a0, a1 = (u.state.factors[(3, "q")][0] for u in updates)
    np.testing.assert_allclose(out.factors[(3, "q")][0], (a0 + 3 * a1) / 4, rtol=1e-6)


# -- FlexLoRA ---------------------------------------------------------------------------


@FAST
@given(case=rounds(contiguous=False))
def test_flexlora_is_exact_when_the_total_rank_fits(case):
    global_state, updates = case
    out = aggregate_flexlora(global_state, updates)
    r_max = next(iter(global_state.ranks().values()))
    for key in trained_keys(updates):
        total_rank = sum(u.state.ranks().get(key, 0) for u in updates)
        if total_rank <= r_max:
            expected = _dense_weighted_sum(updates, key)
            np.testing.assert_allclose(product(out, key), expected, rtol=1e-4, atol=1e-4)


@FAST
@given(case=rounds(contiguous=False))
def test_flexlora_is_the_best_rank_r_max_approximation(case):
    global_state, updates = case
    out = aggregate_flexlora(global_state, updates)
    r_max = next(iter(global_state.ranks().values()))
    for key in trained_keys(updates):
        dense = _dense_weighted_sum(updates, key)
        s = np.linalg.svd(dense, compute_uv=False)
        got = product(out, key)
        tol = 1e-4 * max(1.0, float(s[0]))
        # Eckart-Young: keeps the top r_max singular values, and the error is the tail.
        s_got = np.linalg.svd(got, compute_uv=False)
        np.testing.assert_allclose(s_got[: min(r_max, s.size)], s[:r_max], atol=tol)
        tail = float(np.sqrt(np.sum(s[r_max:] ** 2)))
        assert abs(np.linalg.norm(dense - got) - tail) <= 10 * tol


def test_flexlora_splits_singular_values_evenly_and_parks_unused_slots():
    global_state = make_global(8)
    updates = [
        trained_update(global_state, "a", 2, [3], [2], seed=1),
        trained_update(global_state, "b", 5, [3], [1], seed=2),
    ]
    out = aggregate_flexlora(global_state, updates)
    a, b = (x.astype(np.float64) for x in out.factors[(3, "q")])
    s = np.linalg.svd(_dense_weighted_sum(updates, (3, "q")), compute_uv=False)[:3]
    # B^T B = A A^T = diag(S) on the used slots: both factors carry sqrt(S).
    np.testing.assert_allclose(b[:, :3].T @ b[:, :3], np.diag(s), atol=1e-5)
    np.testing.assert_allclose(a[:3] @ a[:3].T, np.diag(s), atol=1e-5)
    # Slots 3.. carry nothing (B = 0) but keep the previous A rows so they can still learn.
    assert not b[:, 3:].any()
    np.testing.assert_array_equal(
        out.factors[(3, "q")][0][3:], global_state.factors[(3, "q")][0][3:].astype(np.float32)
    )


def test_flexlora_keeps_slots_past_the_numerical_rank_trainable():
    """Three identical rank-8 updates into a rank-16 global: Delta has rank 8, not 16.

    Slots 8..15 must not end with A and B both near zero (such a slot gets no gradient):
    they get B = 0 and keep A, and a real LoRA forward and backward reaches them.
    """
    import torch

    from legend.federation.apply import AdapterHost
    from legend.models.loaders import load_base_model
    from legend.planner.plan import DevicePlan
    from legend.planner.profiles import JobParams

    spec = get_model_spec("tiny-bert", target_modules="qv")
    base = load_base_model("tiny-bert", seed=1)
    host = AdapterHost(base, spec, JobParams(target_modules="qv"))
    global_state = init_global(spec, 16, host.initial_head(), seed=0)
    layers = list(range(spec.num_layers))
    same = trained_update(global_state, "x", 10, layers, [8] * len(layers), seed=3)
    updates = [ClientUpdate(device_id=f"d{i}", num_samples=10, state=same.state) for i in range(3)]
    out = aggregate_flexlora(global_state, updates)
    for key in out.factors:
        a, b = (x.astype(np.float64) for x in out.factors[key])
        np.testing.assert_allclose(b @ a, product(same.state, key), rtol=1e-4, atol=1e-4)
        assert not b[:, 8:].any()
        assert (np.linalg.norm(a[8:], axis=1) > 0.1).all()

    plan = DevicePlan(device_id="big", layers=tuple(layers), ranks=(16,) * len(layers))
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1, base.config.vocab_size, (4, 12), generator=g),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
        "labels": torch.randint(0, 2, (4,), generator=g),
    }
    with host.activate(plan, slice_for(out, plan.layers, plan.ranks)) as model:
        model(**batch).loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if ".lora_B." in name}
        assert len(grads) == 2 * len(layers)
        for name, grad in grads.items():
            assert grad is not None and grad.shape[1] == 16, name
            per_slot = grad.abs().sum(dim=0)
            assert (per_slot[8:] > 0).all(), f"{name}: slots 8..15 get no gradient"


def test_flexlora_revives_zero_a_rows_past_the_numerical_rank():
    """A previous A row of zeros cannot learn: it becomes a unit row orthogonal to the rest."""
    global_state = make_global(6)
    key = (3, "q")
    ga, gb = global_state.factors[key]
    ga = ga.copy()
    ga[2:] = 0.0
    global_state = AdapterState(
        factors={**global_state.factors, key: (ga, gb)}, head=global_state.head
    )
    one = trained_update(global_state, "a", 4, [3], [2], seed=1)
    twin = ClientUpdate(device_id="b", num_samples=4, state=one.state)
    out = aggregate_flexlora(global_state, [one, twin])
    a, b = (x.astype(np.float64) for x in out.factors[key])
    np.testing.assert_allclose(b @ a, product(one.state, key), rtol=1e-4, atol=1e-4)
    assert not b[:, 2:].any()
    np.testing.assert_allclose(a[2:] @ a[2:].T, np.eye(4), atol=1e-6)
    np.testing.assert_allclose(a[2:] @ a[:2].T, 0.0, atol=1e-5)
    again = aggregate_flexlora(global_state, [one, twin])
    np.testing.assert_array_equal(again.factors[key][0], out.factors[key][0])


def test_flexlora_never_builds_the_dense_update_of_a_large_layer():
    """A Llama-7B ``up_proj`` (4096 -> 11008): a dense float32 delta-W alone is 180 MB."""
    fan_in, fan_out, r_max = 4096, 11008, 16
    rng = np.random.default_rng(0)
    key = (31, "up_proj")

    def pair(r):
        return (
            rng.normal(size=(r, fan_in)).astype(np.float32),
            rng.normal(size=(fan_out, r)).astype(np.float32),
        )

    global_state = AdapterState(factors={key: pair(r_max)}, head={})
    updates = [
        ClientUpdate(
            device_id=f"d{i}", num_samples=n, state=AdapterState(factors={key: pair(r)}, head={})
        )
        for i, (n, r) in enumerate(((10, 4), (20, 8), (30, 8), (40, 16)))
    ]
    dense_bytes = fan_in * fan_out * 4
    tracemalloc.start()
    try:
        start = time.perf_counter()
        out = aggregate_flexlora(global_state, updates)
        elapsed_s = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < dense_bytes / 10, f"peak {peak / 1e6:.1f} MB"
    assert elapsed_s < 10.0
    a, b = out.factors[key]
    assert a.shape == (r_max, fan_in) and b.shape == (fan_out, r_max)
    assert np.isfinite(a).all() and np.isfinite(b).all()


def test_flexlora_large_layer_is_exact_when_the_ranks_fit():
    fan_in, fan_out, r_max = 4096, 11008, 16
    rng = np.random.default_rng(1)
    key = (0, "up_proj")
    global_state = AdapterState(
        factors={key: (rng.normal(size=(r_max, fan_in)), rng.normal(size=(fan_out, r_max)))},
        head={},
    )
    updates = [
        ClientUpdate(
            device_id=f"d{i}",
            num_samples=n,
            state=AdapterState(
                factors={key: (rng.normal(size=(r, fan_in)), rng.normal(size=(fan_out, r)))},
                head={},
            ),
        )
        for i, (n, r) in enumerate(((10, 4), (30, 8), (60, 4)))
    ]
    out = aggregate_flexlora(global_state, updates)
    a, b = out.factors[key]
    # Check B A x = sum_i w_i B_i A_i x on random probe vectors (no dense matrix needed).
    probe = rng.normal(size=(fan_in, 3))
    got = b.astype(np.float64) @ (a.astype(np.float64) @ probe)
    expected = sum(
        u.num_samples / 100 * (u.state.factors[key][1] @ (u.state.factors[key][0] @ probe))
        for u in updates
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())


# -- FFA-LoRA ---------------------------------------------------------------------------


def test_ffa_keeps_a_and_ignores_what_clients_send_for_it():
    global_state = make_global(4)
    updates = [
        trained_update(global_state, "a", 1, [3], [2], seed=1, train_a=True),
        trained_update(global_state, "b", 3, [2, 3], [4, 4], seed=2, train_a=False),
    ]
    out = aggregate_ffa(global_state, updates)
    for key in global_state.factors:
        np.testing.assert_array_equal(out.factors[key][0], global_state.factors[key][0])
    (_, lb), (_, hb) = (u.state.factors[(3, "q")] for u in updates)
    b = out.factors[(3, "q")][1]
    np.testing.assert_allclose(b[:, :2], (lb + 3 * hb[:, :2]) / 4, rtol=1e-6)
    np.testing.assert_allclose(b[:, 2:], hb[:, 2:], rtol=1e-6)


@FAST
@given(case=rounds(same_plan=True))
def test_ffa_is_exact_when_ranks_agree(case):
    global_state, updates = case
    frozen = [
        trained_update(
            global_state,
            u.device_id,
            u.num_samples,
            u.state.layers(),
            _layer_ranks(u),
            seed=i,
            train_a=False,
        )
        for i, u in enumerate(updates)
    ]
    out = aggregate_ffa(global_state, frozen)
    for key in trained_keys(frozen):
        # Over the trained slots (the rest keep their previous value and product).
        r = frozen[0].state.ranks()[key]
        a, b = out.factors[key]
        got = b[:, :r].astype(np.float64) @ a[:r]
        np.testing.assert_allclose(got, _dense_weighted_sum(frozen, key), rtol=1e-4, atol=1e-4)
