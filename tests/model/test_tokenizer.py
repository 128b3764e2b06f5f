"""Special tokens on the synthetic tokenizer and on a foreign one; save/load through AutoTokenizer."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmlatent.model.language_model import LanguageModelConfig, RandomLMConfig, load_language_model
from mmlatent.model.tokenizer import TokenizerConfig, load_tokenizer
from mmlatent.tokens import SPECIAL, add_special_tokens, token_ids


def test_synthetic_tokenizer_round_trip(tmp_path):
    tok = load_tokenizer(TokenizerConfig())
    text = "Start at the framed cell. <observation>Its arrow points right.</observation> The answer is B."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # every special token is a single id and survives save/load through AutoTokenizer
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for s in SPECIAL.all():
        assert len(again(s, add_special_tokens=False)["input_ids"]) == 1, s
    assert token_ids(again) == token_ids(tok)
    # byte-level: text the synthetic corpus never saw still round-trips
    odd = "MMMU: ∫ x² dx = 3.5×10⁻³ (Ünïcode)"
    assert again.decode(again(odd, add_special_tokens=False)["input_ids"]) == odd


def test_special_tokens_added_to_foreign_tokenizer_and_embeddings_resized():
    core = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign = PreTrainedTokenizerFast(tokenizer_object=core)
    before = len(foreign)
    add_special_tokens(foreign)
    assert len(foreign) == before + len(SPECIAL.all())  # incl. a pad token it lacked
    ids = token_ids(foreign)
    assert foreign.convert_ids_to_tokens(ids.latent) == SPECIAL.latent
    lm = load_language_model(
        LanguageModelConfig(random_init=RandomLMConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64)),
        vocab_size=len(foreign),
    )
    assert lm.get_input_embeddings().weight.shape[0] == len(foreign)


def test_synthetic_tokenizer_not_built_is_a_clear_error(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setenv("MMLATENT_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match="synthetic tokenizer.*not built yet.*mmlatent data tokenizer"):
        load_tokenizer(TokenizerConfig())
    from mmlatent.data.synthetic_tokenizer import build_synthetic_tokenizer

    folder = build_synthetic_tokenizer()
    assert folder.is_relative_to(tmp_path) and load_tokenizer(TokenizerConfig()).name_or_path == str(folder)
    assert build_synthetic_tokenizer() == folder  # built once: a second call reuses the folder
