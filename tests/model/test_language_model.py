"""The LM loads from a local folder through the same call a Hub id takes, with identical outputs."""

from __future__ import annotations

import pytest
import torch

from mmlatent.model.language_model import LanguageModelConfig, RandomLMConfig, load_language_model

SMALL = RandomLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)


def test_save_pretrained_then_load_by_path(tmp_path):
    torch.manual_seed(0)
    lm = load_language_model(LanguageModelConfig(random_init=SMALL), vocab_size=300).eval()
    lm.save_pretrained(tmp_path / "lm")
    assert (tmp_path / "lm" / "model.safetensors").exists()  # safetensors, never a pickle
    loaded = load_language_model(LanguageModelConfig(name_or_path=str(tmp_path / "lm")), vocab_size=300).eval()
    ids = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(loaded(input_ids=ids).logits, lm(input_ids=ids).logits, rtol=0, atol=0)


def test_bad_path_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="lm.name_or_path"):
        load_language_model(LanguageModelConfig(name_or_path=str(tmp_path / "nope")), vocab_size=10)


def test_bad_model_type_names_the_field():
    with pytest.raises(ValueError, match="model_type"):
        load_language_model(LanguageModelConfig(random_init=RandomLMConfig(model_type="not-a-model")), vocab_size=10)
