"""The causal language model of a composed VLM: any `AutoModelForCausalLM`.

Three ways in, one code path out: a Hub id and a local folder both go through
`AutoModelForCausalLM.from_pretrained` (a test saves a tiny random LM with `save_pretrained` and loads it
back exactly as a user's Hub id would load), and a typed `RandomLMConfig` builds a random model through
`AutoConfig.for_model` + `from_config` for the tiny preset and for from-scratch experiments.
The embedding matrix is resized to the tokenizer (which gained mmlatent's special tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from mmlatent.model.pretrained_source import DTYPES, PretrainedSource
from mmlatent.model.weight_memory import own_aligned_memory


@dataclass
class RandomLMConfig:
    """Shape of a randomly initialised LM (used when `LanguageModelConfig.name_or_path` is None)."""

    model_type: str = "qwen2"
    """A transformers model type with a causal-LM head (`qwen2`, `llama`, `mistral`, ...)."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_hidden_layers: int = 4
    """Number of decoder layers."""
    num_attention_heads: int = 4
    """Query heads per layer."""
    num_key_value_heads: int = 2
    """Key/value heads per layer (grouped-query attention when smaller than the query heads)."""
    intermediate_size: int = 384
    """Width of the MLP."""
    max_position_embeddings: int = 2048
    """Longest sequence the rotary embedding is set up for."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    tie_word_embeddings: bool = True
    """Share input and output embeddings (saves parameters on tiny models)."""


@dataclass
class LanguageModelConfig(PretrainedSource):
    """Which causal LM to use and how to load it (`name_or_path`, `revision`, `dtype`, `attn_implementation`:
    see `PretrainedSource`)."""

    random_init: RandomLMConfig = field(default_factory=RandomLMConfig)
    """Shape of the random model (ignored when `name_or_path` is set)."""
    trust_remote_code: bool = False
    """Allow modelling code from the Hub repository. Off by default (DESIGN §5)."""
    freeze: bool = False
    """Freeze the LM's weights (e.g. for projector-only warm-up)."""


def load_language_model(cfg: LanguageModelConfig, vocab_size: int) -> PreTrainedModel:
    """Load or build the LM and resize its embeddings to `vocab_size` (the tokenizer's length)."""
    dtype = DTYPES[cfg.dtype]
    if cfg.name_or_path is not None:
        try:
            lm = AutoModelForCausalLM.from_pretrained(
                cfg.name_or_path,
                revision=cfg.revision,
                dtype=dtype,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
                use_safetensors=True,
            )
        except OSError as err:
            raise ValueError(f"lm.name_or_path={cfg.name_or_path!r} could not be loaded: {err}") from err
        own_aligned_memory(lm)  # out of the file's buffers: see weight_memory.py
    else:
        r = cfg.random_init
        try:
            hf_cfg = AutoConfig.for_model(
                r.model_type,
                vocab_size=vocab_size,
                hidden_size=r.hidden_size,
                num_hidden_layers=r.num_hidden_layers,
                num_attention_heads=r.num_attention_heads,
                num_key_value_heads=r.num_key_value_heads,
                intermediate_size=r.intermediate_size,
                max_position_embeddings=r.max_position_embeddings,
                rope_theta=r.rope_theta,
                tie_word_embeddings=r.tie_word_embeddings,
            )
        except ValueError as err:
            raise ValueError(f"lm.random_init.model_type={r.model_type!r}: {err}") from err
        hf_cfg._attn_implementation = cfg.attn_implementation
        lm = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    if lm.get_input_embeddings().weight.shape[0] != vocab_size:
        lm.resize_token_embeddings(vocab_size, mean_resizing=False)
    if cfg.freeze:
        lm.requires_grad_(False)
    return lm
