"""Where mmlatent keeps what it builds locally (shard sizes, the synthetic tokenizer): one folder for all.

`$MMLATENT_CACHE`, else `~/.cache/mmlatent`. `synthetic_tokenizer_dir` names the folder of the tiny models'
tokenizer: `mmlatent.data.synthetic_tokenizer` builds it there (from the synthetic corpus) and the model
layer loads it like any tokenizer folder, so the name lives below both.
"""

from __future__ import annotations

import os
from pathlib import Path

SYNTHETIC_TOKENIZER_VERSION = 6
"""Bump when the synthetic corpus or the trainer settings change, so stale builds are not reused."""


def cache_dir() -> Path:
    """Where mmlatent keeps what it builds locally: `$MMLATENT_CACHE`, else `~/.cache/mmlatent`."""
    return Path(os.environ.get("MMLATENT_CACHE", Path.home() / ".cache" / "mmlatent"))


def synthetic_tokenizer_dir(vocab_size: int) -> Path:
    """The folder the synthetic tokenizer of `vocab_size` is built into (`mmlatent.data.synthetic_tokenizer`)."""
    return cache_dir() / f"synthetic-tokenizer-v{SYNTHETIC_TOKENIZER_VERSION}-{vocab_size}"
