"""Model shapes: what the planner needs to know about a transformer, with no weights.

A :class:`ModelSpec` lists the layers, the LoRA-adapted linear modules of each layer with
their ``in``/``out`` dimensions, parameter counts and FLOPs per token. It is built from a
Hugging Face ``config.json`` (a dict), a preset name or a local model directory, and it
never imports torch or transformers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from legend.models.errors import ModelInputError

__all__ = [
    "PRESETS",
    "TARGET_MODULE_PRESETS",
    "ModelSpec",
    "ModuleShape",
    "get_model_spec",
    "model_config",
]


@dataclass(frozen=True, kw_only=True)
class ModuleShape:
    """One adapted linear module of a layer (``name`` as PEFT's ``target_modules`` sees it)."""

    name: str
    in_features: int
    out_features: int

    @property
    def params_per_rank(self) -> int:
        """LoRA parameters per unit rank: ``A`` is ``r x in``, ``B`` is ``out x r``."""
        return self.in_features + self.out_features


# Per architecture family: the linear modules of one layer as (suffix, in, out) builders,
# and the target-module presets. Suffixes are what PEFT matches with ``target_modules``.
_FAMILY_OF_MODEL_TYPE = {"bert": "bert", "roberta": "roberta", "llama": "llama", "mistral": "llama"}

TARGET_MODULE_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": {
        "qv": ("query", "value"),
        "attention": ("query", "key", "value", "attention.output.dense"),
        "all": (
            "query",
            "key",
            "value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
    },
    "llama": {
        "qv": ("q_proj", "v_proj"),
        "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    },
}
TARGET_MODULE_PRESETS["roberta"] = TARGET_MODULE_PRESETS["bert"]

# Embedded configs (the fields of each model's config.json the spec reads); no download.
PRESETS: dict[str, dict[str, Any]] = {
    "all-MiniLM-L6-v2": {
        "model_type": "bert",
        "num_hidden_layers": 6,
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_attention_heads": 12,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
    },
    "bert-base-uncased": {
        "model_type": "bert",
        "num_hidden_layers": 12,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
    },
    "roberta-base": {
        "model_type": "roberta",
        "num_hidden_layers": 12,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "vocab_size": 50265,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
    },
    "roberta-large": {
        "model_type": "roberta",
        "num_hidden_layers": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "vocab_size": 50265,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
    },
    "llama-2-7b": {
        "model_type": "llama",
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "tiny-bert": {
        "model_type": "bert",
        "num_hidden_layers": 4,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "vocab_size": 30522,
        "max_position_embeddings": 128,
        "type_vocab_size": 2,
    },
    "tiny-llama": {
        "model_type": "llama",
        "num_hidden_layers": 4,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 30522,
        "max_position_embeddings": 128,
    },
}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The shape of a transformer as the cost model and the planner see it.

    Layers are numbered ``0..num_layers-1``, 0 next to the embeddings. Every layer has the
    same adapted ``modules``. Parameter counts are exact for the Hugging Face
    ``*ForSequenceClassification`` model of the family with ``num_labels`` outputs.
    """

    name: str
    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    num_labels: int = 2
    target_modules: tuple[str, ...]
    modules: tuple[ModuleShape, ...]
    layer_params: int
    embedding_params: int
    head_params: int
    frozen_other_params: int
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def max_rank(self) -> int:
        """The widest LoRA rank that fits every adapted module: ``min(in, out)``."""
        return min(min(m.in_features, m.out_features) for m in self.modules)

    def check_ranks(self, ranks: tuple[int, ...], *, what: str = "rank grid") -> None:
        """Refuse ranks wider than an adapted module (a rank-r factor needs r <= min(in, out))."""
        wide = [r for r in ranks if r > self.max_rank]
        if wide:
            raise ModelInputError(
                f"{what} {list(ranks)}: rank {wide[0]} is wider than the layers of model "
                f"{self.name!r} (adapted modules are at most {self.max_rank} wide); use ranks "
                f"<= {self.max_rank}"
            )

    # -- parameter counts -------------------------------------------------------------
    @cached_property
    def params_per_rank(self) -> int:
        """LoRA parameters per unit rank in one layer, ``p_l = sum_m (in_m + out_m)``."""
        return sum(m.params_per_rank for m in self.modules)

    @property
    def total_params(self) -> int:
        """All parameters of the sequence-classification model (frozen and head)."""
        return (
            self.num_layers * self.layer_params
            + self.embedding_params
            + self.frozen_other_params
            + self.head_params
        )

    def lora_params(self, layers: tuple[int, ...], ranks: tuple[int, ...]) -> int:
        """Trainable LoRA parameters of a configuration (head excluded)."""
        if len(layers) != len(ranks):
            raise ModelInputError(
                f"`ranks` must have one entry per layer: {len(layers)} layers, {len(ranks)} ranks"
            )
        L = self.num_layers
        if any(not 0 <= layer < L for layer in layers):
            for layer in layers:
                self._check_layer(layer)
        return sum(ranks) * self.params_per_rank

    # -- compute ----------------------------------------------------------------------
    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer that take part in matrix products (biases, norms excluded)."""
        h, i = self.hidden_size, self.intermediate_size
        if self.family == "llama":
            kv = self.num_key_value_heads * (h // self.num_attention_heads)
            return 2 * h * h + 2 * h * kv + 3 * h * i
        return 4 * h * h + 2 * h * i

    def layer_forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of one layer per token: ``2 * matmul params + 4 * seq * hidden``."""
        return 2.0 * self.layer_matmul_params + 4.0 * seq_len * self.hidden_size

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of the whole model per token (embedding lookups are free)."""
        head_matmul = self.head_params - (self.num_labels if self.family != "llama" else 0)
        return self.num_layers * self.layer_forward_flops_per_token(seq_len) + 2.0 * head_matmul

    def lora_flops_per_token_per_rank(self) -> float:
        """Extra FLOPs per token and unit rank of LoRA in one layer, forward plus backward.

        Forward ``x A^T B^T`` costs ``2 r (in + out)``; backward computes input and weight
        gradients of both factors, about twice that.
        """
        return 6.0 * self.params_per_rank

    def activation_bytes_per_layer(self, batch_size: int, seq_len: int, act_bytes: int = 4) -> int:
        """Activations one layer saves for backward (Korthikanti et al. 2022, scaled to
        ``act_bytes`` per value): ``b s (34 h + 5 a s) * act_bytes / 2``."""
        per = (
            batch_size * seq_len * (34 * self.hidden_size + 5 * self.num_attention_heads * seq_len)
        )
        return math.ceil(per * act_bytes / 2)

    # -- helpers ----------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ModelInputError(
                f"layer index must be in 0..{self.num_layers - 1} for {self.name}, got {layer}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (used in plan digests and reports)."""
        return {
            "name": self.name,
            "family": self.family,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "num_labels": self.num_labels,
            "target_modules": list(self.target_modules),
            "params_per_rank": self.params_per_rank,
            "head_params": self.head_params,
            "total_params": self.total_params,
        }

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        name: str = "custom",
        target_modules: str | tuple[str, ...] | list[str] = "qv",
        num_labels: int = 2,
    ) -> ModelSpec:
        """Build a spec from the fields of a Hugging Face ``config.json``.

        Parameters
        ----------
        config
            A mapping with at least ``model_type``, ``num_hidden_layers``, ``hidden_size``,
            ``intermediate_size``, ``num_attention_heads`` and ``vocab_size``.
        target_modules
            A preset name (``"qv"``, ``"attention"``, ``"all"``) or module names of the family.
        """
        model_type = str(config.get("model_type", ""))
        family = _FAMILY_OF_MODEL_TYPE.get(model_type)
        if family is None:
            raise ModelInputError(
                f"`model_type` {model_type!r} of {name} is not supported; "
                f"expected one of {sorted(_FAMILY_OF_MODEL_TYPE)}"
            )
        required = (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "vocab_size",
        )
        values: dict[str, int] = {}
        for key in required:
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelInputError(
                    f"config field `{key}` of {name} must be a positive integer, got {value!r}"
                )
            values[key] = value
        if num_labels < 1:
            raise ModelInputError(f"`num_labels` must be >= 1, got {num_labels}")
        h = values["hidden_size"]
        i = values["intermediate_size"]
        heads = values["num_attention_heads"]
        vocab = values["vocab_size"]
        layers = values["num_hidden_layers"]
        kv_heads = int(config.get("num_key_value_heads") or heads)
        max_pos = int(config.get("max_position_embeddings") or 512)
        head_dim = h // heads
        kv = kv_heads * head_dim

        dims: dict[str, tuple[int, int]]
        if family == "llama":
            dims = {
                "q_proj": (h, h),
                "k_proj": (h, kv),
                "v_proj": (h, kv),
                "o_proj": (h, h),
                "gate_proj": (h, i),
                "up_proj": (h, i),
                "down_proj": (i, h),
            }
            layer_params = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
            embedding_params = vocab * h
            other = h  # final RMSNorm
            head = h * num_labels  # `score`, no bias
        else:
            dims = {
                "query": (h, h),
                "key": (h, h),
                "value": (h, h),
                "attention.output.dense": (h, h),
                "intermediate.dense": (h, i),
                "output.dense": (i, h),
            }
            layer_params = 4 * h * h + 2 * h * i + 9 * h + i
            type_vocab = int(config.get("type_vocab_size") or (1 if family == "roberta" else 2))
            embedding_params = (vocab + max_pos + type_vocab) * h + 2 * h
            if family == "bert":
                other = h * h + h  # pooler (frozen)
                head = h * num_labels + num_labels
            else:
                other = 0  # RobertaForSequenceClassification has no pooler
                head = h * h + h + h * num_labels + num_labels

        if isinstance(target_modules, str):
            presets = TARGET_MODULE_PRESETS[family]
            if target_modules not in presets:
                raise ModelInputError(
                    f"`target_modules` preset {target_modules!r} is unknown for the {family} "
                    f"family; expected one of {sorted(presets)} or a list of {sorted(dims)}"
                )
            names = presets[target_modules]
        else:
            names = tuple(target_modules)
            unknown = [n for n in names if n not in dims]
            if unknown or not names:
                raise ModelInputError(
                    f"`target_modules` {list(names)!r} of {name}: unknown {unknown}; "
                    f"expected names from {sorted(dims)}"
                )
            if len(set(names)) != len(names):
                raise ModelInputError(f"`target_modules` has duplicates: {list(names)!r}")
        modules = tuple(
            ModuleShape(name=n, in_features=dims[n][0], out_features=dims[n][1]) for n in names
        )
        return cls(
            name=name,
            family=family,
            num_layers=layers,
            hidden_size=h,
            intermediate_size=i,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab,
            max_position_embeddings=max_pos,
            num_labels=num_labels,
            target_modules=names,
            modules=modules,
            layer_params=layer_params,
            embedding_params=embedding_params,
            head_params=head,
            frozen_other_params=other,
            config=dict(config),
        )


def model_config(model: str) -> tuple[str, dict[str, Any]]:
    """Resolve a preset name, a model directory or a ``config.json`` path to ``(name, config)``."""
    if model in PRESETS:
        return model, dict(PRESETS[model])
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelInputError(f"model config {path} is not readable JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ModelInputError(f"model config {path} must hold a JSON object")
        return path.parent.name or str(path), config
    raise ModelInputError(
        f"unknown model {model!r}: expected a preset ({', '.join(sorted(PRESETS))}), "
        "a local model directory or a config.json path"
    )


def get_model_spec(
    model: str,
    *,
    target_modules: str | tuple[str, ...] | list[str] = "qv",
    num_labels: int = 2,
) -> ModelSpec:
    """The :class:`ModelSpec` of a preset name, a local model directory or a ``config.json``."""
    name, config = model_config(model)
    try:
        return ModelSpec.from_config(
            config, name=name, target_modules=target_modules, num_labels=num_labels
        )
    except ModelInputError as exc:
        if model in PRESETS:
            raise
        path = Path(model)
        path = path / "config.json" if path.is_dir() else path
        raise ModelInputError(f"model config {path}: {exc}") from None
