"""Local training: the logit-adjusted loss against label skew (tiny BERT, real training)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from legend.federation.training import (
    DeviceData,
    LayerDecrease,
    TokenizedSplit,
    label_log_prior,
    train_steps,
)
from legend.models.loaders import load_base_model


def _split(labels: list[int], seq_len: int = 8) -> TokenizedSplit:
    gen = torch.Generator().manual_seed(0)
    n = len(labels)
    ids = torch.randint(5, 100, (n, seq_len), generator=gen)
    # The label is written into the first token, so the task is learnable.
    ids[:, 1] = torch.tensor(labels) + 1
    return TokenizedSplit(
        tensors={"input_ids": ids, "attention_mask": torch.ones(n, seq_len, dtype=torch.long)},
        labels=torch.tensor(labels, dtype=torch.long),
    )


def _model() -> torch.nn.Module:
    """The tiny BERT preset with every parameter trainable (no LoRA needed here)."""
    model = load_base_model("tiny-bert", num_labels=2, seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def test_log_prior_is_the_smoothed_label_share() -> None:
    split = _split([0] * 6 + [1] * 2)
    prior = label_log_prior(DeviceData(split=split, indices=np.arange(8)), 2)
    np.testing.assert_allclose(prior.exp().numpy(), [7 / 10, 3 / 10], rtol=1e-6)
    # A device holding one label still gives the other a (small) share, and labels the
    # split lacks are counted when the model has more outputs.
    only0 = label_log_prior(DeviceData(split=split, indices=np.arange(6)), 3)
    np.testing.assert_allclose(only0.exp().numpy(), [7 / 9, 1 / 9, 1 / 9], rtol=1e-6)


def _head_bias_shift(loss: str, optimizer: str) -> float:
    """How far a single-label device moves the head toward its label."""
    split = _split([1] * 64)
    model = _model()
    before = model.classifier.bias.detach().clone()
    out = train_steps(
        model,
        DeviceData(split=split, indices=np.arange(64)),
        steps=5,
        batch_size=16,
        learning_rate=1e-2 if optimizer == "adamw" else 0.5,
        weight_decay=0.0,
        seed=(0, 1, 2),
        loss=loss,
        optimizer=optimizer,
    )
    assert math.isfinite(out)
    after = model.classifier.bias.detach()
    return float((after[1] - after[0]) - (before[1] - before[0]))


def test_logit_adjustment_keeps_a_one_label_device_from_dragging_the_head() -> None:
    plain = _head_bias_shift("cross-entropy", "sgd")
    adjusted = _head_bias_shift("logit-adjusted", "sgd")
    assert plain > 0.05  # plain cross-entropy learns "always label 1"
    assert abs(adjusted) < 0.2 * plain


def test_adamw_moves_a_one_label_device_as_far_with_or_without_adjustment() -> None:
    # Why the label-skew recipe pairs the adjusted loss with local SGD: AdamW normalises
    # each step, so the (small) adjusted gradients still move the head by the full rate.
    plain = _head_bias_shift("cross-entropy", "adamw")
    adjusted = _head_bias_shift("logit-adjusted", "adamw")
    assert adjusted > 0.5 * plain > 0


def test_logit_adjusted_training_still_learns_a_balanced_task() -> None:
    labels = [i % 2 for i in range(64)]
    split = _split(labels)
    model = _model()
    data = DeviceData(split=split, indices=np.arange(64))
    kwargs = dict(
        batch_size=16,
        learning_rate=1e-2,
        weight_decay=0.0,
        loss="logit-adjusted",
        optimizer="adamw",
    )
    first = train_steps(model, data, steps=2, seed=(0,), **kwargs)
    later = train_steps(model, data, steps=30, seed=(1,), **kwargs)
    assert later < first


def test_unknown_loss_is_refused() -> None:
    split = _split([0, 1])
    with pytest.raises(ValueError, match="`loss` must be one of"):
        train_steps(
            _model(),
            DeviceData(split=split, indices=np.arange(2)),
            steps=1,
            batch_size=2,
            learning_rate=1e-3,
            weight_decay=0.0,
            seed=(0,),
            loss="focal",
        )


# -- the per-layer first-order loss decrease ----------------------------------------------


def test_layer_decrease_is_the_first_order_loss_decrease_split_by_layer() -> None:
    """Plain SGD on a quadratic: each layer's share is ``lr ||g_l||^2`` exactly, and at a
    small rate the shares add up to the loss decrease actually observed."""
    torch.manual_seed(0)
    w0, w1 = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))
    target0, target1 = torch.randn(5), torch.randn(3, 2)

    def loss() -> torch.Tensor:
        return ((w0 - target0) ** 2).sum() + 3.0 * ((w1 - target1) ** 2).sum()

    lr = 1e-4
    opt = torch.optim.SGD([w0, w1], lr=lr)
    record = LayerDecrease({4: [w0], 6: [w1]})
    before = float(loss().detach())
    opt.zero_grad()
    loss().backward()
    want = {4: lr * float(w0.grad.pow(2).sum()), 6: lr * float(w1.grad.pow(2).sum())}
    record.before_step()
    opt.step()
    record.after_step()
    got = record.per_layer(8)
    assert got[4] == pytest.approx(want[4], rel=1e-5)
    assert got[6] == pytest.approx(want[6], rel=1e-5)
    assert all(math.isnan(got[k]) for k in (0, 1, 2, 3, 5, 7))  # untrained layers
    observed = before - float(loss().detach())
    assert observed == pytest.approx(got[4] + got[6], rel=1e-2)
    # no step taken: nothing measured
    assert all(math.isnan(v) for v in LayerDecrease({0: [w0]}).per_layer(2))


def test_train_steps_records_the_decrease_of_every_trained_layer() -> None:
    labels = [i % 2 for i in range(32)]
    model = _model()
    groups: dict[int, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if "layer" in parts:
            groups.setdefault(int(parts[parts.index("layer") + 1]), []).append(p)
    record = LayerDecrease({k: v for k, v in groups.items() if k >= 1})
    train_steps(
        model,
        DeviceData(split=_split(labels), indices=np.arange(32)),
        steps=3,
        batch_size=8,
        learning_rate=0.1,
        weight_decay=0.0,
        seed=(0,),
        optimizer="sgd",
        decrease=record,
    )
    got = record.per_layer(len(groups))
    assert record.steps == 3
    assert math.isnan(got[0])
    assert all(v > 0 and math.isfinite(v) for v in got[1:])  # SGD always steps downhill
