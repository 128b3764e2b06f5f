"""The released architectures of the flagship recipes, offline: their transformers configs and image processors.

`mmlatent plan` sizes a recipe from its model's architecture, and the recipe tests and the full-size
rehearsal (`benchmarks/rehearsal.py`) build those models with random weights, all on machines that cannot
reach the Hub. `ARCHITECTURES` holds, per Hub id, the `config.json` fields that fix the shapes (as the
model repositories publish them), the image processor's settings and the tokenizer's length.
`hf_config` reads a local folder or a cached/online Hub id first and falls back to this table, so a plan
follows whatever the recipe names. `write_random_model` saves a model of an architecture with random
weights as a Hub repository holds it (weights, config, image processor, tokenizer), optionally with fewer
layers or a smaller vocabulary, and the model then loads through the same `from_pretrained(folder)` as a
Hub id. The tokenizer is the caller's (a tokenizer folder), padded with placeholder tokens to the
released tokenizer's length when asked, so the LM's embedding matrix keeps its released shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmlatent.model.pretrained_source import DTYPES

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Architecture:
    """One released model's shape."""

    family: Literal["qwen2_5_vl", "llava", "causal_lm"]
    """A native VLM family (`ModelConfig.backbone`) or a causal LM (the LM of a composed VLM)."""
    config: dict
    """The transformers config fields (`model_type` first), as in the repository's `config.json`."""
    tokenizer_length: int
    """`len(tokenizer)` of the released tokenizer, before mmlatent adds its special tokens."""
    image_processor: dict = field(default_factory=dict)
    """The image processor's settings (native VLMs)."""


ARCHITECTURES: dict[str, Architecture] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": Architecture(
        family="qwen2_5_vl",
        config={
            "model_type": "qwen2_5_vl", "tie_word_embeddings": True, "image_token_id": 151655,
            "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
            "text_config": {
                "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
                "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True, "use_sliding_window": False,
                "sliding_window": 32768, "max_window_layers": 70, "bos_token_id": 151643, "eos_token_id": 151645,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            },
            "vision_config": {
                "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
                "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu", "in_channels": 3,
            },
        },
        tokenizer_length=151665,
        image_processor={"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                         "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
    ),
    "Qwen/Qwen2.5-0.5B-Instruct": Architecture(
        family="causal_lm",
        config={
            "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
            "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21,
            "bos_token_id": 151643, "eos_token_id": 151645,
        },
        tokenizer_length=151665,
    ),
    "llava-hf/llava-1.5-7b-hf": Architecture(
        family="llava",
        config={
            "model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
            "vision_config": {
                "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            },
            "text_config": {
                "model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "pad_token_id": 32001,
            },
        },
        tokenizer_length=32002,
        image_processor={"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
                         "do_center_crop": True, "resample": 3, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
    ),
}
"""Released architectures by Hub id (the recipes' `name_or_path`)."""


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"no stored architecture for {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def transformers_config(name: str, text_layers: int | None = None, vision_layers: int | None = None,
                        vocab_size: int | None = None):
    """The transformers config of a stored architecture, optionally with fewer layers or another vocabulary."""
    from transformers import AutoConfig

    fields = json.loads(json.dumps(architecture(name).config))  # a deep copy
    text = fields.get("text_config", fields)
    vision = fields.get("vision_config")
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
        if "max_window_layers" in text:
            text["max_window_layers"] = min(text["max_window_layers"], text_layers)
    if vision_layers is not None and vision is not None:
        key = "depth" if "depth" in vision else "num_hidden_layers"
        vision[key] = vision_layers
        if "fullatt_block_indexes" in vision:  # keep the last block a full-attention one, as released
            vision["fullatt_block_indexes"] = sorted({i for i in vision["fullatt_block_indexes"] if i < vision_layers}
                                                     | {vision_layers - 1})
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def hf_config(name_or_path: str, revision: str | None = None):
    """The transformers config a recipe's `name_or_path` names: a local folder, a stored architecture, or (with
    a network) the Hub's `config.json`."""
    from transformers import AutoConfig

    if Path(name_or_path).is_dir() or name_or_path not in ARCHITECTURES:
        return AutoConfig.from_pretrained(name_or_path, revision=revision)
    return transformers_config(name_or_path)


def padded_tokenizer(tokenizer_dir: str | Path, length: int, out: str | Path) -> Path:
    """Save the tokenizer of `tokenizer_dir` at `out` with placeholder tokens appended until it has `length`
    entries, so a model sized for a released tokenizer keeps its shapes (the text tokenises as before)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    taken = set(vocab) | {t["content"] for t in spec.get("added_tokens", [])}
    next_id = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    i = 0
    while next_id < length:
        name = f"<|placeholder_{i}|>"
        i += 1
        if name not in taken:
            vocab[name] = next_id
            next_id += 1
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   **{k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)})
    fast.model_max_length = tok.model_max_length
    fast.save_pretrained(str(out))
    return Path(out)


def write_random_model(name: str, out: str | Path, tokenizer_dir: str | Path, text_layers: int | None = None,
                       vision_layers: int | None = None, vocab_size: int | None = None, dtype: str = "bfloat16",
                       full_tokenizer: bool = False, seed: int = 0) -> Path:
    """Save a random-weight model of architecture `name` at `out` as its Hub repository holds it.

    `text_layers`, `vision_layers`, `vocab_size`: shape overrides (None: as released). The tokenizer is
    `tokenizer_dir`'s, padded to the released tokenizer's length when `full_tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, CLIPImageProcessor, Qwen2VLImageProcessor

    arch = architecture(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = transformers_config(name, text_layers, vision_layers, vocab_size)
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if arch.family == "causal_lm" else AutoModelForImageTextToText
    model = auto.from_config(cfg, dtype=DTYPES[dtype])
    model.save_pretrained(str(out))
    del model
    if arch.family == "qwen2_5_vl":
        Qwen2VLImageProcessor(**arch.image_processor).save_pretrained(str(out))
    elif arch.family == "llava":
        CLIPImageProcessor(**arch.image_processor).save_pretrained(str(out))
    if full_tokenizer:
        padded_tokenizer(tokenizer_dir, arch.tokenizer_length, out)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out
