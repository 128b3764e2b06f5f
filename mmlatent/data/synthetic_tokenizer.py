"""The tokenizer of the tiny models: a byte-level BPE trained on the synthetic corpus, built once per machine.

It is built with the `tokenizers` library from the synthetic generator's text (every task kind and both
kinds of moves), saved with `save_pretrained` into `mmlatent.cache.synthetic_tokenizer_dir`, and from then
on loaded through `AutoTokenizer.from_pretrained(folder)`: the same path a Hub id takes. Byte-level BPE keeps
every string encodable, so a tiny model can still read an MMMU question, just badly. It lives beside the
synthetic data because it is made from it; the model layer only loads the folder (`TokenizerConfig` with
`name_or_path: null`). `mmlatent data synth` builds it, and so does `mmlatent data tokenizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from mmlatent.atomic import atomic_folder
from mmlatent.data.synthetic import SynthConfig, corpus_texts
from mmlatent.cache import synthetic_tokenizer_dir
from mmlatent.tokens import SPECIAL, add_special_tokens

EXTRA_TEXTS = ["user", "assistant", "system", "Question:", "Answer:", "Context:", "Options:"]
"""Chat-template words and generic text that keep the merges useful beyond the synthetic phrasing."""


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


def build_synthetic_tokenizer(vocab_size: int = 512) -> Path:
    """Build (once) and return the folder of the synthetic tokenizer. Safe under concurrent builders: each
    builds into a temporary folder, and the first rename wins."""
    target = synthetic_tokenizer_dir(vocab_size)
    if (target / "tokenizer.json").exists():
        return target
    with atomic_folder(target, if_exists="keep") as tmp:
        train_synthetic_tokenizer(list(corpus_texts(SynthConfig(), n=2000, seed=0)) + EXTRA_TEXTS, tmp, vocab_size)
    return target
