"""The frozen-prefix cache: train an adapted top block from stored features.

A device that adapts only its top layers ``first..L-1`` runs the layers below them frozen
and without LoRA, so their output for a given sample never changes: it is the base model's
hidden state at the input of layer ``first``. With ``train.cache_prefix`` a device computes
those features once for its local samples (in eval mode, so without dropout) and every local
step then runs forward only from layer ``first`` up. The cost model charges a step that way
(:mod:`legend.planner.costs`); this module is what the host runs, so the trained update is
the one a device with the cache would send.

Supported for the encoder families whose layers sit in ``<backbone>.encoder.layer`` behind
``<backbone>.embeddings`` (bert, roberta). The forward pass of the ``transformers`` model
itself is reused: for the duration of a call the encoder's layer list holds only the layers
from ``first`` up and the embeddings' output is replaced by the features, so masks, pooler
and head run exactly as in the full model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

__all__ = ["PREFIX_FAMILIES", "feature_rows", "from_layer", "prefix_features"]

# model families whose layers the cache can skip
PREFIX_FAMILIES = ("bert", "roberta")


def _backbone(model: Any) -> tuple[Any, Any]:
    """The ``transformers`` backbone (``model.bert``, ``model.roberta``) and its encoder, of a
    PEFT model or a plain ``*ForSequenceClassification`` model."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = hf.base_model
    encoder = getattr(backbone, "encoder", None)
    if encoder is None or not hasattr(encoder, "layer") or not hasattr(backbone, "embeddings"):
        raise ValueError(
            f"{type(hf).__name__} has no `encoder.layer` behind `embeddings`; the frozen-prefix "
            f"cache supports the {' and '.join(PREFIX_FAMILIES)} families"
        )
    return backbone, encoder


@contextmanager
def _layers(encoder: Any, layers: torch.nn.ModuleList) -> Iterator[None]:
    full = encoder.layer
    encoder.layer = layers
    try:
        yield
    finally:
        encoder.layer = full


def prefix_features(
    model: Any,
    tensors: dict[str, torch.Tensor],
    first: int,
    *,
    batch_size: int,
) -> torch.Tensor:
    """The hidden states at the input of layer ``first`` for every row of ``tensors`` (token
    tensors without labels), computed by the frozen layers ``0..first-1`` in eval mode."""
    backbone, encoder = _backbone(model)
    if not 0 < first < len(encoder.layer):
        raise ValueError(f"`first` must be in 1..{len(encoder.layer) - 1}, got {first}")
    was_training = model.training
    model.eval()
    n = next(iter(tensors.values())).shape[0]
    out = []
    try:
        with torch.no_grad(), _layers(encoder, encoder.layer[:first]):
            for start in range(0, n, batch_size):
                chunk = {k: v[start : start + batch_size] for k, v in tensors.items()}
                out.append(backbone(**chunk).last_hidden_state)
    finally:
        model.train(was_training)
    return torch.cat(out)


@contextmanager
def from_layer(model: Any, first: int, features: torch.Tensor) -> Iterator[None]:
    """Within the block, a forward pass of ``model`` on a batch whose features at the input
    of layer ``first`` are ``features`` runs only the layers ``first..L-1``, pooler and head.

    The batch's token tensors still go in (the attention mask shapes the layers' masks); the
    embeddings' output is replaced by ``features``.
    """
    backbone, encoder = _backbone(model)

    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        if output.shape != features.shape:
            raise ValueError(
                f"cached features of shape {tuple(features.shape)} for a batch of shape "
                f"{tuple(output.shape)}"
            )
        return features

    handle = backbone.embeddings.register_forward_hook(hook)
    try:
        with _layers(encoder, encoder.layer[first:]):
            yield
    finally:
        handle.remove()


def feature_rows(features: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """Rows ``index`` (positions in the device's sample order) of a device's features."""
    index_t = torch.as_tensor(np.asarray(index), dtype=torch.long, device=features.device)
    return features.index_select(0, index_t)
