"""Model and tokenizer loading, offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from legend.models.errors import ModelInputError
from legend.models.loaders import (
    hf_config,
    load_base_model,
    load_tokenizer,
    minilm_path,
    resolve_model,
)
from legend.models.spec import get_model_spec


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_tiny_models_are_frozen_seeded_and_leave_the_global_rng_alone(name: str) -> None:
    rng = torch.random.get_rng_state()
    a = load_base_model(name, seed=3)
    b = load_base_model(name, seed=3)
    c = load_base_model(name, seed=4)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert not a.training
    assert not any(p.requires_grad for p in a.parameters())
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    spec = get_model_spec(name)
    assert a.config.num_hidden_layers == spec.num_layers
    assert a.config.vocab_size == 30522


def test_tiny_llama_batches_with_padding() -> None:
    model = load_base_model("tiny-llama", num_labels=3)
    tokenizer = load_tokenizer("tiny-llama")
    assert tokenizer.pad_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(
        ["a short one", "a somewhat longer sentence here"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (2, 3)


def test_dtype_and_labels() -> None:
    model = load_base_model("tiny-bert", num_labels=5, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.classifier.out_features == 5
    with pytest.raises(ModelInputError, match="`dtype` must be one of"):
        load_base_model("tiny-bert", dtype="float8")
    with pytest.raises(ModelInputError, match="`num_labels` must be an integer >= 1, got 0"):
        load_base_model("tiny-bert", num_labels=0)


@pytest.mark.parametrize(
    "name", ["bert-base-uncased", "roberta-base", "roberta-large", "llama-2-7b"]
)
def test_shape_only_presets_explain_how_to_load_weights(name: str) -> None:
    with pytest.raises(ModelInputError, match="not available offline") as info:
        load_base_model(name)
    assert isinstance(info.value, ValueError)
    assert f"/path/to/{name}" in str(info.value)
    with pytest.raises(ModelInputError):
        load_tokenizer(name)
    # Their shape is still available, e.g. to build a model on the meta device.
    assert hf_config(name).num_hidden_layers == get_model_spec(name).num_layers


def test_bad_names_and_directories(tmp_path: Path) -> None:
    with pytest.raises(ModelInputError, match="unknown model 'gpt-9'"):
        load_base_model("gpt-9")
    with pytest.raises(ModelInputError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelInputError, match="has no weights"):
        resolve_model(str(tmp_path))


def test_local_directory_with_its_own_tokenizer(
    tmp_path: Path, tiny_roberta: Callable[..., Any]
) -> None:
    from transformers import AutoTokenizer

    original = tiny_roberta(vocab_size=30522)
    original.save_pretrained(str(tmp_path))
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(str(tmp_path))
    loaded = load_base_model(str(tmp_path))
    assert resolve_model(str(tmp_path)) == ("local", tmp_path)
    saved, back = _weights(original), _weights(loaded)
    assert all(torch.equal(saved[k], back[k]) for k in saved)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert load_tokenizer(str(tmp_path))("hello")["input_ids"][0] == 101  # [CLS]
    spec = get_model_spec(str(tmp_path))
    assert spec.family == "roberta"
    assert spec.total_params == sum(p.numel() for p in loaded.parameters())


@pytest.fixture(scope="module")
def minilm() -> Any:
    return load_base_model("all-MiniLM-L6-v2", seed=0)


@pytest.mark.slow
def test_minilm_has_the_real_pretrained_weights(minilm: Any) -> None:
    from safetensors.numpy import load_file

    stored = load_file(str(minilm_path() / "model.safetensors"))
    key = next(k for k in stored if k.endswith("encoder.layer.3.attention.self.query.weight"))
    loaded = minilm.bert.encoder.layer[3].attention.self.query.weight.detach().numpy()
    np.testing.assert_array_equal(loaded, stored[key])
    assert not any(p.requires_grad for p in minilm.parameters())
    # The fresh head is seeded.
    again = load_base_model("all-MiniLM-L6-v2", seed=0)
    assert torch.equal(again.classifier.weight, minilm.classifier.weight)


@pytest.mark.slow
def test_minilm_tokenizer_and_forward(minilm: Any) -> None:
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    assert tokenizer.pad_token == "[PAD]"
    with torch.no_grad():
        out = minilm(**batch)
    assert out.logits.shape == (2, 2)
    assert torch.isfinite(out.logits).all()
