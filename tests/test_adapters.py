"""The shared adapter format: global init, slicing, checkpoints and update checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legend.federation.adapters import (
    AdapterInputError,
    AdapterState,
    ClientUpdate,
    check_update,
    init_global,
    slice_for,
)
from legend.federation.errors import FederationInputError
from legend.models.errors import InputError
from legend.models.spec import get_model_spec

R_MAX = 8


def _head(hidden: int = 64, labels: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "classifier.weight": rng.normal(size=(labels, hidden)).astype(np.float32),
        "classifier.bias": np.zeros(labels, dtype=np.float32),
    }


@pytest.fixture(scope="module")
def spec():
    return get_model_spec("tiny-bert", target_modules="all")


@pytest.fixture(scope="module")
def global_state(spec):
    return init_global(spec, R_MAX, _head(), seed=3)


def _trained(state: AdapterState, seed: int = 0) -> AdapterState:
    """A slice after some 'training': every factor and the head moved."""
    rng = np.random.default_rng(seed)
    return AdapterState(
        factors={
            k: (a + rng.normal(size=a.shape), b + rng.normal(size=b.shape))
            for k, (a, b) in state.factors.items()
        },
        head={k: v + rng.normal(size=v.shape) for k, v in state.head.items()},
    )


# -- init_global ------------------------------------------------------------------------


def test_init_global_covers_every_layer_and_module_at_r_max(spec, global_state):
    assert global_state.layers() == tuple(range(spec.num_layers))
    assert set(global_state.ranks().values()) == {R_MAX}
    assert len(global_state.factors) == spec.num_layers * len(spec.modules)
    for module in spec.modules:
        a, b = global_state.factors[(0, module.name)]
        assert a.shape == (R_MAX, module.in_features)
        assert b.shape == (module.out_features, R_MAX)
        assert a.dtype == np.float32 and b.dtype == np.float32
        # PEFT's kaiming_uniform(a=sqrt(5)): uniform in +-1/sqrt(in); B starts at zero.
        bound = 1.0 / np.sqrt(module.in_features)
        assert np.abs(a).max() <= bound
        assert np.abs(a).max() > 0.8 * bound
        assert abs(float(a.mean())) < 0.1 * bound
        assert not b.any()
    lora = spec.lora_params(tuple(range(spec.num_layers)), (R_MAX,) * spec.num_layers)
    assert global_state.num_params(include_head=False) == lora
    assert global_state.num_params() == lora + 2 * 64 + 2
    assert global_state.nbytes(2) == 2 * global_state.num_params()


def test_init_global_is_deterministic_and_copies_the_head(spec):
    head = _head()
    one = init_global(spec, 4, head, seed=11)
    two = init_global(spec, 4, head, seed=11)
    other = init_global(spec, 4, head, seed=12)
    assert one.equals(two)
    assert not one.equals(other)
    head["classifier.bias"][0] = 99.0
    assert one.head["classifier.bias"][0] == 0.0


@pytest.mark.parametrize("r_max", [0, -1, 2.5, True])
def test_init_global_rejects_bad_r_max(spec, r_max):
    with pytest.raises(AdapterInputError, match="r_max"):
        init_global(spec, r_max, {}, seed=0)


def test_adapter_errors_are_value_errors_under_the_federation_root():
    assert issubclass(AdapterInputError, FederationInputError)
    assert issubclass(AdapterInputError, InputError)
    assert issubclass(AdapterInputError, ValueError)


# -- slice_for --------------------------------------------------------------------------


def test_slice_for_takes_leading_rows_of_a_and_columns_of_b(spec, global_state):
    trained_global = _trained(global_state, seed=1)
    part = slice_for(trained_global, [2, 3], [2, 5])
    assert part.layers() == (2, 3)
    assert set(part.factors) == {(layer, m.name) for layer in (2, 3) for m in spec.modules}
    for (layer, module), (a, b) in part.factors.items():
        r = {2: 2, 3: 5}[layer]
        ga, gb = trained_global.factors[(layer, module)]
        np.testing.assert_array_equal(a, ga[:r, :])
        np.testing.assert_array_equal(b, gb[:, :r])
    for name, value in trained_global.head.items():
        np.testing.assert_array_equal(part.head[name], value)


def test_slice_for_returns_copies(global_state):
    part = slice_for(global_state, [3], [4])
    before = global_state.factors[(3, "query")][0].copy()
    part.factors[(3, "query")][0][:] = 5.0
    part.head["classifier.bias"][:] = 5.0
    np.testing.assert_array_equal(global_state.factors[(3, "query")][0], before)
    assert not global_state.head["classifier.bias"].any()


@pytest.mark.parametrize(
    ("layers", "ranks", "match"),
    [
        ([3], [4, 4], "one entry per layer"),
        ([9], [4], "layer 9 is not in the global"),
        ([3, 3], [4, 4], "twice"),
        ([3], [0], "rank of layer 3 must be an integer >= 1"),
        ([3], [R_MAX + 1], "exceeds the global rank"),
    ],
)
def test_slice_for_rejects_bad_plans(global_state, layers, ranks, match):
    with pytest.raises(AdapterInputError, match=match):
        slice_for(global_state, layers, ranks)


# -- construction and checkpoints -------------------------------------------------------


def test_adapter_state_converts_to_float32_and_checks_structure():
    state = AdapterState(factors={(0, "q"): (np.ones((2, 3)), np.ones((4, 2)))}, head={})
    assert state.factors[(0, "q")][0].dtype == np.float32
    with pytest.raises(AdapterInputError, match="2-D"):
        AdapterState(factors={(0, "q"): (np.ones(3), np.ones((4, 2)))}, head={})
    with pytest.raises(AdapterInputError, match=r"\(layer: int, module: str\)"):
        AdapterState(factors={"0.q": (np.ones((2, 3)), np.ones((4, 2)))}, head={})  # type: ignore[dict-item]
    with pytest.raises(AdapterInputError, match="must be a pair"):
        AdapterState(factors={(0, "q"): [np.ones((2, 3))]}, head={})  # type: ignore[dict-item]
    with pytest.raises(AdapterInputError, match="numeric array"):
        AdapterState(factors={}, head={"w": "text"})  # type: ignore[dict-item]


@st.composite
def adapter_states(draw):
    modules = draw(
        st.lists(
            st.sampled_from(["query", "value", "attention.output.dense", "q_proj", "a|b/c"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    layers = draw(st.lists(st.integers(0, 40), min_size=0, max_size=4, unique=True))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    factors = {}
    for layer in layers:
        r = draw(st.integers(1, 5))
        for module in modules:
            fan_in, fan_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
            a = rng.normal(size=(r, fan_in)).astype(np.float32)
            b = rng.normal(size=(fan_out, r)).astype(np.float32)
            if draw(st.booleans()):
                a[0, 0] = np.float32(np.nextafter(np.float32(1), np.float32(2)))  # last-bit value
            factors[(layer, module)] = (a, b)
    names = draw(st.lists(st.sampled_from(["score.weight", "classifier.dense.bias"]), unique=True))
    head = {n: rng.normal(size=(3, 2)).astype(np.float32) for n in names}
    return AdapterState(factors=factors, head=head)


@settings(max_examples=40, deadline=None)
@given(state=adapter_states())
def test_npz_round_trip_is_exact(tmp_path_factory, state):
    path = tmp_path_factory.mktemp("ckpt") / "state.npz"
    state.to_npz(path)
    back = AdapterState.from_npz(path)
    assert back.equals(state)
    for key, (a, b) in back.factors.items():
        assert a.dtype == np.float32 and b.dtype == np.float32
        assert a.shape == state.factors[key][0].shape


def test_npz_round_trip_of_a_global_state(tmp_path, global_state):
    path = tmp_path / "global.npz"
    global_state.to_npz(path)
    assert AdapterState.from_npz(path).equals(global_state)


def test_from_npz_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(AdapterInputError, match="does not exist"):
        AdapterState.from_npz(tmp_path / "absent.npz")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(AdapterInputError, match="not a legend adapter checkpoint"):
        AdapterState.from_npz(foreign)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(AdapterInputError, match="not readable"):
        AdapterState.from_npz(garbage)


def test_copy_is_deep(global_state):
    clone = global_state.copy()
    assert clone.equals(global_state)
    clone.factors[(0, "query")][0][0, 0] += 1.0
    assert not clone.equals(global_state)


# -- ClientUpdate and check_update -------------------------------------------------------


@pytest.mark.parametrize(
    ("device_id", "num_samples", "match"),
    [("", 3, "device_id"), ("d0", 0, "num_samples"), ("d0", 2.0, "num_samples")],
)
def test_client_update_rejects_bad_fields(device_id, num_samples, match):
    with pytest.raises(AdapterInputError, match=match):
        ClientUpdate(
            device_id=device_id, num_samples=num_samples, state=AdapterState(factors={}, head={})
        )


LAYERS, RANKS = (2, 3), (2, 4)


def _update(state: AdapterState) -> ClientUpdate:
    return ClientUpdate(device_id="dev-7", num_samples=12, state=state)


def _check(global_state, state, **kw):
    return check_update(_update(state), layers=LAYERS, ranks=RANKS, global_state=global_state, **kw)


def _edit(state: AdapterState, key, a=None, b=None, head=None) -> AdapterState:
    factors = dict(state.factors)
    if key is not None:
        old_a, old_b = factors[key]
        factors[key] = (old_a if a is None else a, old_b if b is None else b)
    return AdapterState(factors=factors, head=state.head if head is None else head)


@pytest.fixture
def good(global_state):
    return _trained(slice_for(global_state, LAYERS, RANKS), seed=5)


def test_check_update_accepts_a_trained_slice(global_state, good):
    assert _check(global_state, good) == []


@pytest.mark.parametrize(("value", "word"), [(np.nan, "1 NaN"), (np.inf, "1 Inf")])
def test_check_update_catches_non_finite_values(global_state, good, value, word):
    _, b = good.factors[(3, "value")]
    b = b.copy()
    b[1, 1] = value
    problems = _check(global_state, _edit(good, (3, "value"), b=b))
    assert len(problems) == 1
    assert "dev-7" in problems[0] and "layer 3 `value`" in problems[0] and "B has" in problems[0]
    assert word in problems[0]


def test_check_update_catches_non_finite_head(global_state, good):
    head = {k: v.copy() for k, v in good.head.items()}
    head["classifier.weight"][0, 0] = np.nan
    problems = _check(global_state, _edit(good, None, head=head))
    assert problems == [
        "device 'dev-7': head weight 'classifier.weight' has 1 NaN and 0 Inf values"
    ]


def test_check_update_catches_missing_and_extra_keys(global_state, good):
    factors = dict(good.factors)
    del factors[(2, "key")]
    factors[(1, "query")] = slice_for(global_state, [1], [2]).factors[(1, "query")]
    factors[(3, "not_a_module")] = factors[(3, "query")]
    problems = _check(global_state, AdapterState(factors=factors, head=good.head))
    assert sorted(problems) == sorted(
        [
            "device 'dev-7': layer 2 `key`: missing (planned at rank 2)",
            "device 'dev-7': layer 1 `query`: not in the plan",
            "device 'dev-7': layer 3 `not_a_module`: not in the plan",
        ]
    )


def test_check_update_catches_wrong_rank(global_state, good):
    a, b = slice_for(global_state, [3], [6]).factors[(3, "query")]
    problems = _check(global_state, _edit(good, (3, "query"), a=a, b=b))
    assert problems == ["device 'dev-7': layer 3 `query`: rank 6, planned 4"]


def test_check_update_catches_inconsistent_factor_ranks(global_state, good):
    a, _ = slice_for(global_state, [3], [6]).factors[(3, "query")]
    problems = _check(global_state, _edit(good, (3, "query"), a=a))
    assert len(problems) == 1 and "A has rank 6 but B has rank 4" in problems[0]


def test_check_update_catches_wrong_dimensions(global_state, good):
    a, b = good.factors[(2, "intermediate.dense")]
    problems = _check(global_state, _edit(good, (2, "intermediate.dense"), a=a[:, :-1]))
    assert problems == [
        "device 'dev-7': layer 2 `intermediate.dense`: A has shape (2, 63), expected (2, 64)"
    ]
    problems = _check(global_state, _edit(good, (2, "intermediate.dense"), b=b[:-3, :]))
    assert problems == [
        "device 'dev-7': layer 2 `intermediate.dense`: B has shape (125, 2), expected (128, 2)"
    ]


def test_check_update_catches_head_problems(global_state, good):
    head = dict(good.head)
    head["classifier.weight"] = np.zeros((3, 64), dtype=np.float32)
    del head["classifier.bias"]
    head["pooler.dense.weight"] = np.zeros((2, 2), dtype=np.float32)
    problems = _check(global_state, _edit(good, None, head=head))
    assert sorted(problems) == sorted(
        [
            "device 'dev-7': head weight 'classifier.bias' is missing",
            "device 'dev-7': head weight 'pooler.dense.weight' is not part of the model's head",
            "device 'dev-7': head weight 'classifier.weight' has shape (3, 64), expected (2, 64)",
        ]
    )


def test_check_update_with_frozen_a_flags_changed_a_only(global_state):
    sent = slice_for(global_state, LAYERS, RANKS)
    rng = np.random.default_rng(0)
    b_only = AdapterState(
        factors={k: (a, b + rng.normal(size=b.shape)) for k, (a, b) in sent.factors.items()},
        head=sent.head,
    )
    assert _check(global_state, b_only, frozen_a=True) == []
    a, _ = b_only.factors[(2, "query")]
    moved = _edit(b_only, (2, "query"), a=a + 1e-3)
    assert _check(global_state, moved) == []
    assert _check(global_state, moved, frozen_a=True) == [
        "device 'dev-7': layer 2 `query`: A changed, but A is frozen (FFA-LoRA trains B only)"
    ]


def test_check_update_reports_every_problem_at_once(global_state, good):
    factors = dict(good.factors)
    del factors[(2, "query")]
    a, b = factors[(3, "value")]
    factors[(3, "value")] = (np.full_like(a, np.nan), b)
    problems = _check(global_state, AdapterState(factors=factors, head={}))
    assert len(problems) == 1 + 1 + 2  # missing key, NaN factor, two missing head weights


def test_check_update_rejects_a_plan_that_does_not_fit_the_global_state(global_state, good):
    with pytest.raises(AdapterInputError, match="exceeds the global rank"):
        check_update(_update(good), layers=[3], ranks=[64], global_state=global_state)


# -- import hygiene ---------------------------------------------------------------------


def test_adapter_modules_import_no_torch():
    code = (
        "import sys, legend.federation.adapters, legend.federation.aggregation; "
        "heavy = [m for m in ('torch', 'peft', 'transformers', 'flwr') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent,
    )
    assert out.stdout.strip() == "[]"
