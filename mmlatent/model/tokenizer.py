"""Loading a model's tokenizer (`TokenizerConfig`), with mmlatent's special tokens added.

Any tokenizer goes through `AutoTokenizer.from_pretrained`: a Hub id, a local folder, or (with
`name_or_path: null`) the tiny models' synthetic tokenizer, a folder built once per machine by
`mmlatent.data.synthetic_tokenizer` (`mmlatent data synth` and `mmlatent data tokenizer` build it). The special
tokens and their ids are `mmlatent.tokens`'s; the LM's embedding matrix is resized to the tokenizer by the
backbone.

An exported folder holds its tokenizer beside mmlatent's own `config.json`, which `AutoTokenizer` reads first
to choose the tokenizer class; it is handed mmlatent's config class for it (transformers would otherwise warn
about an unknown model type on every load), so the class saved in `tokenizer_config.json` is the one loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from mmlatent.model.remote_code import MODEL_TYPE
from mmlatent.tokens import add_special_tokens, synthetic_tokenizer_dir


@dataclass
class TokenizerConfig:
    """Which tokenizer to load."""

    name_or_path: str | None = None
    """A Hub id or a local folder for `AutoTokenizer.from_pretrained`. None: the byte-level BPE tokenizer
    trained on the synthetic corpus (built once per machine by `mmlatent data tokenizer` or `data synth`)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a Hub id."""
    synthetic_vocab_size: int = 512
    """Vocabulary size of the synthetic tokenizer (ignored when `name_or_path` is set)."""
    trust_remote_code: bool = False
    """Allow tokenizer code from the Hub repository. Off by default (DESIGN §5)."""


def load_tokenizer(cfg: TokenizerConfig) -> PreTrainedTokenizerBase:
    """Load the configured tokenizer through `AutoTokenizer` and add mmlatent's special tokens."""
    source = cfg.name_or_path
    if source is None:
        folder = synthetic_tokenizer_dir(cfg.synthetic_vocab_size)
        if not (folder / "tokenizer.json").exists():
            raise ValueError(
                f"tokenizer.name_or_path is null (the synthetic tokenizer), but it is not built yet at {folder}: "
                f"run `mmlatent data tokenizer` (`mmlatent data synth` also builds it)"
            )
        source = str(folder)
    try:
        tok = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, config=export_config(source)
        )
    except OSError as err:
        raise ValueError(f"tokenizer.name_or_path={source!r} could not be loaded: {err}") from err
    return add_special_tokens(tok)


def export_config(source: str) -> PretrainedConfig | None:
    """The config `AutoTokenizer` is handed for `source`: an mmlatent export folder's `config.json` as
    mmlatent's `LatentVLMConfig`; None for anything else (AutoTokenizer reads the source's own config)."""
    path = Path(source) / "config.json"
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None  # not a readable JSON object: AutoTokenizer reports it as it would
    if model_type != MODEL_TYPE:
        return None
    from mmlatent.model.remote_code.configuration_mmlatent import LatentVLMConfig

    return LatentVLMConfig.from_pretrained(source)
