"""Local training and evaluation on the host (torch).

The train split is tokenized once per run into fixed-length tensors; a device's data is a
view of its partition's indices, so no device copies or re-tokenizes anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from legend.federation.job import LOSSES, OPTIMIZERS
from legend.federation.prefix import feature_rows, from_layer, prefix_features

__all__ = [
    "LOSSES",
    "DeviceData",
    "LayerDecrease",
    "TokenizedSplit",
    "evaluate",
    "label_log_prior",
    "tokenize",
    "train_steps",
]


@dataclass(frozen=True)
class TokenizedSplit:
    """Fixed-length token tensors of a split and its labels."""

    tensors: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: np.ndarray | Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        out = {k: v.index_select(0, idx) for k, v in self.tensors.items()}
        out["labels"] = self.labels.index_select(0, idx)
        return out


@dataclass(frozen=True)
class DeviceData:
    """One device's share of the train split (indices into a shared :class:`TokenizedSplit`)."""

    split: TokenizedSplit
    indices: np.ndarray

    @property
    def num_samples(self) -> int:
        return len(self.indices)


_CHARS_PER_TOKEN_BOUND = 64


def tokenize(
    tokenizer: Any, texts: Sequence[str], labels: np.ndarray, seq_len: int
) -> TokenizedSplit:
    # A token spans at least one character, and words longer than the tokenizer's limit
    # become one unknown token: cutting each text at a bound far above ``seq_len`` tokens
    # keeps the result and spares tokenizing megabytes of a long line.
    limit = seq_len * _CHARS_PER_TOKEN_BOUND
    enc = tokenizer(
        [t if len(t) <= limit else t[:limit] for t in texts],
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    tensors = {
        k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    return TokenizedSplit(
        tensors=tensors, labels=torch.tensor(np.asarray(labels), dtype=torch.long)
    )


class LayerDecrease:
    """The first-order decrease of the training loss that each layer's adapter bought.

    A step moves the parameters from ``theta`` to ``theta'`` while the gradient is ``g``;
    to first order the loss falls by ``<g, theta - theta'>``, and that inner product splits
    exactly over the parameters, so each layer's share is the inner product over its own
    LoRA factors (``lr * ||g_l||^2`` for plain SGD; any optimizer's step counts as taken).
    Summed over the local steps and divided by their number, it is what the device's
    configuration contributed to its training progress, layer by layer: the signal the
    progress model (:mod:`legend.federation.progress`) fits the layer gains from.

    ``layer_params`` maps a model layer to its trainable LoRA factors
    (:meth:`legend.federation.apply.AdapterHost.layer_parameters`).
    """

    def __init__(self, layer_params: Mapping[int, Sequence[torch.nn.Parameter]]) -> None:
        self.layer_params = {int(k): list(v) for k, v in layer_params.items() if v}
        self.total = dict.fromkeys(self.layer_params, 0.0)
        self.steps = 0
        # (layer, factor, its value, its gradient) before the step being taken
        self._before: list[tuple[int, torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def before_step(self) -> None:
        """Keep each factor and its gradient (call after ``backward``, before the step)."""
        self._before = [
            (layer, p, p.detach().clone(), p.grad.detach().clone())
            for layer, params in self.layer_params.items()
            for p in params
            if p.grad is not None
        ]

    def after_step(self) -> None:
        """Add each layer's ``<g, theta - theta'>`` of the step just taken."""
        step: dict[int, torch.Tensor] = {}
        for layer, p, theta, grad in self._before:
            part = torch.sum(grad * (theta - p.detach()))
            step[layer] = part if layer not in step else step[layer] + part
        for layer, value in step.items():  # one read of the device per layer
            self.total[layer] += float(value)
        self._before = []
        self.steps += 1

    def per_layer(self, num_layers: int) -> tuple[float, ...]:
        """Mean decrease per step of every model layer (NaN where nothing was trained or no
        step was taken)."""
        out = [math.nan] * num_layers
        if self.steps:
            for layer, total in self.total.items():
                out[layer] = total / self.steps
        return tuple(out)


def train_steps(
    model: torch.nn.Module,
    data: DeviceData,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    seed: Sequence[int],
    loss: str = "cross-entropy",
    optimizer: str = "adamw",
    decrease: LayerDecrease | None = None,
    prefix_layers: int = 0,
) -> float:
    """Run ``steps`` optimizer steps on batches drawn (seeded) from the device's data.

    ``prefix_layers > 0`` trains from the frozen-prefix cache (:mod:`legend.federation.prefix`):
    the output of the frozen layers ``0..prefix_layers-1`` is computed once for the device's
    samples, without dropout, and every step runs forward from layer ``prefix_layers`` up.
    The model must adapt no layer below it.

    Returns the mean training loss; ``decrease``, when given, records every step's
    first-order loss decrease per layer (:class:`LayerDecrease`). Only parameters that
    require grad are optimised (the planned LoRA factors and the head); a fresh optimizer
    every round, as in FedAvg.

    ``loss`` is ``"cross-entropy"`` or ``"logit-adjusted"``: cross-entropy of the logits
    plus ``log pi`` of the device's own label distribution ``pi`` (add-one smoothed), the
    balanced-softmax form of logit adjustment (Menon et al., ICLR 2021; FedLC, ICML 2022).
    Under label skew a device then has no incentive to move the shared head toward its
    local majority label; the model is evaluated on the plain logits. ``optimizer`` is
    ``"adamw"`` or ``"sgd"`` (plain SGD; AdamW normalises every parameter's step, so a device
    whose gradients are tiny still moves as far as one that learns; see
    :mod:`legend.federation.server_opt`).
    """
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {', '.join(LOSSES)}, got {loss!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"`optimizer` must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
        if optimizer == "adamw"
        else torch.optim.SGD(params, lr=learning_rate, weight_decay=weight_decay)
    )
    rng = np.random.default_rng([*list(seed), 4])
    # Dropout draws from torch's global generator: seed a private copy of it from the
    # device's seed so that an update does not depend on what the process ran before
    # (engines that train devices in other processes or orders then agree).
    torch_seed = int(np.random.default_rng([*list(seed), 5]).integers(2**62))
    device = _device_of(model)
    features = None
    if prefix_layers > 0:
        tensors = {
            k: v for k, v in _to(data.split.batch(data.indices), device).items() if k != "labels"
        }
        features = prefix_features(model, tensors, prefix_layers, batch_size=batch_size)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(torch_seed)
        losses = _train_loop(
            model,
            opt,
            data,
            rng,
            steps=steps,
            batch_size=batch_size,
            log_prior=label_log_prior(data, _num_labels(model)).to(device)
            if loss == "logit-adjusted"
            else None,
            decrease=decrease,
            prefix=(prefix_layers, features) if features is not None else None,
        )
    model.eval()
    return float(np.mean(losses)) if losses else math.nan


def _train_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DeviceData,
    rng: np.random.Generator,
    *,
    steps: int,
    batch_size: int,
    log_prior: torch.Tensor | None = None,
    decrease: LayerDecrease | None = None,
    prefix: tuple[int, torch.Tensor] | None = None,
) -> list[float]:
    model.train()
    losses: list[float] = []
    n = data.num_samples
    order = rng.permutation(n)
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > n:
            order = rng.permutation(n)
            cursor = 0
        take = order[cursor : cursor + min(batch_size, n)]
        cursor += len(take)
        batch = _to(data.split.batch(data.indices[take]), _device_of(model))
        optimizer.zero_grad(set_to_none=True)
        cached = (
            nullcontext()
            if prefix is None
            else from_layer(model, prefix[0], feature_rows(prefix[1], take))
        )
        with cached:
            if log_prior is None:
                loss = model(**batch).loss
            else:
                labels = batch.pop("labels")
                logits = model(**batch).logits
                loss = torch.nn.functional.cross_entropy(logits + log_prior, labels)
        if not torch.isfinite(loss):
            losses.append(math.nan)
            break
        loss.backward()
        if decrease is not None:
            decrease.before_step()
        optimizer.step()
        if decrease is not None:
            decrease.after_step()
        losses.append(float(loss.detach()))
    return losses


def _device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (the host's device)."""
    return next(model.parameters()).device


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _num_labels(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "num_labels", 0) or 0)


def label_log_prior(data: DeviceData, num_labels: int = 0) -> torch.Tensor:
    """``log`` of the device's label distribution over ``num_labels`` labels, add-one smoothed.

    ``num_labels`` defaults to the largest label in the split plus one.
    """
    labels = data.split.labels.index_select(0, torch.as_tensor(data.indices, dtype=torch.long))
    num_labels = max(num_labels, int(data.split.labels.max()) + 1 if len(data.split) else 1)
    counts = torch.bincount(labels, minlength=num_labels).to(torch.float32) + 1.0
    return torch.log(counts / counts.sum())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, split: TokenizedSplit, *, batch_size: int = 64
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on a split."""
    model.eval()
    correct = 0
    total_loss = 0.0
    n = len(split)
    device = _device_of(model)
    for start in range(0, n, batch_size):
        batch = _to(split.batch(np.arange(start, min(n, start + batch_size))), device)
        out = model(**batch)
        total_loss += float(out.loss) * len(batch["labels"])
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    return correct / max(n, 1), total_loss / max(n, 1)


def probe_layer_decrease(
    model: torch.nn.Module,
    split: TokenizedSplit,
    layer_params: Mapping[int, Sequence[torch.nn.Parameter]],
    num_layers: int,
    *,
    examples: int = 0,
    batch_size: int = 64,
) -> tuple[float, ...]:
    """Per model layer, the first-order decrease of the expected loss that a gradient step
    of unit rate on that layer's LoRA factors would buy: ``||g_l||^2`` for the gradient
    ``g_l`` of the loss over the layer's factors, estimated without the sampling noise that
    a squared minibatch gradient carries, as ``<g_l^(1), g_l^(2)>`` of the two halves of the
    examples used (independent halves make it unbiased; it can come out negative where the
    layer's signal is below its noise). NaN for a layer without factors.

    This is the server's probe of what every layer's adapter would buy
    (:mod:`legend.federation.progress`): measured on held-out data at the global model,
    without dropout, for every layer whether or not a device trains it. ``examples`` > 0
    uses the first that many examples of ``split`` (all otherwise; at least two). The
    parameters' ``.grad`` are left set.
    """
    n = len(split) if examples <= 0 else min(examples, len(split))
    if n < 2:
        return (math.nan,) * num_layers
    model.eval()
    device = _device_of(model)
    halves: list[dict[int, list[torch.Tensor]]] = []
    for lo, hi in ((0, n // 2), (n // 2, n)):
        for p in model.parameters():
            p.grad = None
        for start in range(lo, hi, batch_size):
            batch = _to(split.batch(np.arange(start, min(hi, start + batch_size))), device)
            loss = model(**batch).loss * (len(batch["labels"]) / (hi - lo))
            loss.backward()
        halves.append(
            {
                int(layer): [p.grad.detach().clone() for p in group if p.grad is not None]
                for layer, group in layer_params.items()
            }
        )
    out = [math.nan] * num_layers
    for layer, first in halves[0].items():
        second = halves[1][layer]
        if first and 0 <= layer < num_layers:
            out[layer] = float(sum(torch.sum(a * b) for a, b in zip(first, second, strict=True)))
    return tuple(out)
