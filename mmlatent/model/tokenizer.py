"""Tokenizer loading and mmlatent's special tokens.

Any tokenizer (a Hub id, a local folder, or the tiny synthetic one) goes through `AutoTokenizer` and then
gets the same extra tokens: the image placeholder, the latent block markers and slot, the observation tags
and ChatML turn markers. The LM's embedding matrix is resized to match by the backbone.

The tiny preset's tokenizer is a byte-level BPE trained with `tokenizers` on the synthetic corpus. It is
built once into a cache folder, saved with `save_pretrained`, and then loaded back through
`AutoTokenizer.from_pretrained(folder)`: the same path a Hub id takes. Byte-level BPE keeps every string
encodable, so the tiny model can still read an MMMU question, just badly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase

SYNTHETIC_TOKENIZER_VERSION = 5
"""Bump when the synthetic corpus or the trainer settings change, so stale caches are not reused."""


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


@dataclass
class TokenizerConfig:
    """Which tokenizer to load."""

    name_or_path: str | None = None
    """A Hub id or a local folder for `AutoTokenizer.from_pretrained`. None builds (once, cached) and loads
    the byte-level BPE tokenizer trained on the synthetic corpus."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a Hub id."""
    synthetic_vocab_size: int = 512
    """Vocabulary size of the synthetic tokenizer (ignored when `name_or_path` is set)."""
    trust_remote_code: bool = False
    """Allow tokenizer code from the Hub repository. Off by default (DESIGN §5)."""


def cache_dir() -> Path:
    """Where mmlatent keeps what it builds locally: `$MMLATENT_CACHE`, else `~/.cache/mmlatent`."""
    return Path(os.environ.get("MMLATENT_CACHE", Path.home() / ".cache" / "mmlatent"))


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


def train_synthetic_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int) -> Path:
    """Train a byte-level BPE on `texts` and save it as a transformers tokenizer folder at `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL.pad, SPECIAL.turn_start, SPECIAL.turn_end],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=SPECIAL.pad, eos_token=SPECIAL.turn_end, model_max_length=4096
    )
    add_special_tokens(fast)
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def synthetic_tokenizer_dir(vocab_size: int) -> Path:
    """Build (once) and return the folder of the synthetic tokenizer. Safe under concurrent builders."""
    target = cache_dir() / f"synthetic-tokenizer-v{SYNTHETIC_TOKENIZER_VERSION}-{vocab_size}"
    if (target / "tokenizer.json").exists():
        return target
    from mmlatent.data.synthetic import SynthConfig, corpus_texts

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tok-"))
    try:
        # Chat-template words and generic text keep the merges useful beyond the synthetic phrasing.
        extra = ["user", "assistant", "system", "Question:", "Answer:", "Context:", "Options:"]
        train_synthetic_tokenizer(list(corpus_texts(SynthConfig(), n=2000, seed=0)) + extra, tmp, vocab_size)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its folder is equivalent
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(cfg: TokenizerConfig) -> PreTrainedTokenizerBase:
    """Load the configured tokenizer through `AutoTokenizer` and add mmlatent's special tokens."""
    source = cfg.name_or_path or str(synthetic_tokenizer_dir(cfg.synthetic_vocab_size))
    try:
        tok = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as err:
        raise ValueError(f"tokenizer.name_or_path={source!r} could not be loaded: {err}") from err
    return add_special_tokens(tok)
