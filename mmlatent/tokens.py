"""mmlatent's special tokens and where locally built artefacts live: shared by the data and model layers.

Every tokenizer (a Hub id, a local folder, or the tiny synthetic one) gets the same extra tokens: the image
placeholder, the latent block markers and slot, the observation tags and ChatML turn markers.
`add_special_tokens` adds the missing ones and `token_ids` resolves their ids. The data pipeline renders
chats with them (`mmlatent.chat_template`) and the model reads them, so they live here, below both:
`mmlatent/data` and `mmlatent/model` import this module and never each other.

`synthetic_tokenizer_dir` names the folder of the tiny models' tokenizer; `mmlatent.data.synthetic_tokenizer`
builds it there (from the synthetic corpus) and the model layer loads it like any tokenizer folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from transformers import PreTrainedTokenizerBase

SYNTHETIC_TOKENIZER_VERSION = 6
"""Bump when the synthetic corpus or the trainer settings change, so stale builds are not reused."""


@dataclass(frozen=True)
class SpecialTokens:
    """The strings mmlatent adds to every tokenizer. Each becomes one token id."""

    image: str = "<|image|>"
    """One visual slot; an image expands to `tokens_per_image` of these."""
    latent_start: str = "<|latent_start|>"
    """Opens a latent block."""
    latent_end: str = "<|latent_end|>"
    """Closes a latent block."""
    latent: str = "<|latent|>"
    """One latent slot; its input embedding is replaced by a continuous vector."""
    observation_open: str = "<observation>"
    """Opens a span of reasoning text that depends on an auxiliary image (weighted in the loss)."""
    observation_close: str = "</observation>"
    """Closes an observation span."""
    turn_start: str = "<|im_start|>"
    """ChatML turn opener (already present in Qwen tokenizers)."""
    turn_end: str = "<|im_end|>"
    """ChatML turn closer; also the end-of-answer token."""
    pad: str = "<|pad|>"
    """Padding token, used only when the tokenizer has none."""

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]


SPECIAL = SpecialTokens()


@dataclass(frozen=True)
class TokenIds:
    """The ids of `SpecialTokens` in one tokenizer; built by `token_ids`."""

    image: int
    latent_start: int
    latent_end: int
    latent: int
    observation_open: int
    observation_close: int
    turn_start: int
    turn_end: int
    pad: int


def cache_dir() -> Path:
    """Where mmlatent keeps what it builds locally: `$MMLATENT_CACHE`, else `~/.cache/mmlatent`."""
    return Path(os.environ.get("MMLATENT_CACHE", Path.home() / ".cache" / "mmlatent"))


def synthetic_tokenizer_dir(vocab_size: int) -> Path:
    """The folder the synthetic tokenizer of `vocab_size` is built into (`mmlatent.data.synthetic_tokenizer`)."""
    return cache_dir() / f"synthetic-tokenizer-v{SYNTHETIC_TOKENIZER_VERSION}-{vocab_size}"


def add_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add mmlatent's special tokens (those missing) to `tokenizer`, in place, and set a pad token."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL.all() if t not in vocab and t != SPECIAL.pad]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        if SPECIAL.pad not in tokenizer.get_vocab():
            tokenizer.add_tokens([SPECIAL.pad], special_tokens=True)
        tokenizer.pad_token = SPECIAL.pad
    return tokenizer


def token_ids(tokenizer: PreTrainedTokenizerBase) -> TokenIds:
    """Resolve the special-token ids; raises if `add_special_tokens` was not applied."""
    vocab = tokenizer.get_vocab()
    ids = {}
    for f in fields(SpecialTokens):
        text = getattr(SPECIAL, f.name)
        if f.name == "pad":
            ids["pad"] = tokenizer.pad_token_id
        elif text in vocab:
            ids[f.name] = vocab[text]
        else:
            raise ValueError(f"tokenizer lacks special token {text!r}; call add_special_tokens first")
    return TokenIds(**ids)
