"""LoRA adapters (peft) on the language model of any backbone, with mmlatent's special tokens trainable.

The adapters are injected in place into the backbone's transformers model (`Backbone.transformers_model`:
the causal LM of a composed VLM, the whole native VLM) by peft's `LoraModel`, with a target regex limited to
the LM's decoder, so the vision tower is never adapted and parameter names outside the adapted layers do
not change. A Lightning checkpoint then holds the frozen base plus the adapters: a run resumes
(`--ckpt_path`), hands over to the next stage (`init_from`, with the same `lora` settings) and serves as an
online teacher exactly like a full fine-tune. `merge_lora` folds the adapters into the base weights and
leaves a plain model; `export` does this, so exported folders load with no peft at all.

mmlatent's special tokens (image slot, latent block, observation tags) are fresh embedding rows that a frozen
LM could never learn. `train_special_tokens` trains only those rows (peft's trainable tokens, which follow
the output head when the model ties it to the embeddings) instead of the whole vocabulary matrix.

The adapters and the trained rows are kept in fp32 over a bf16 or fp16 base, as peft's `get_peft_model` does
by default: AdamW updates of a few 1e-4 vanish in bf16's 8-bit mantissa.

Trade-off: every checkpoint stores the frozen base (a plain resume, nothing else to fetch) at the price of
size on disk; only the adapters and the special rows carry gradients and optimiser state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel


@dataclass
class LoraConfig:
    """Low-rank adapters on the language model; its own weights stay frozen."""

    enabled: bool = False
    """Train LoRA adapters instead of the full language model."""
    rank: int = 16
    """Rank r of each adapter (A: r×in, B: out×r)."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / rank)·B·A."""
    dropout: float = 0.05
    """Dropout on the adapter input during training."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Names (last component) of the decoder's linear layers that get adapters."""
    train_special_tokens: bool = True
    """Train the embedding rows of mmlatent's special tokens (and the tied output rows)."""


@dataclass
class LoraAdapters:
    """The injected adapters. A plain object, not a module: the peft tuner wraps the very model the backbone
    already registers, and registering it again would list every weight twice in the state dict."""

    tuner: Any
    """peft's `LoraModel` around the backbone's transformers model."""

    def merge(self) -> PreTrainedModel:
        """Fold the adapters (and trained token rows) into the base weights; returns the plain model."""
        return self.tuner.merge_and_unload()


def _module_name(model: PreTrainedModel, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, special_token_ids: list[int]) -> LoraAdapters:
    """Inject adapters into `model`'s decoder, in place; freeze the LM except adapters and special rows.

    Parameters outside the LM (vision tower, projector) keep their `requires_grad`.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora import LoraModel

    if not cfg.target_modules:
        raise ValueError("lora.target_modules is empty: name the decoder's linear layers to adapt (e.g. q_proj)")
    decoder, embeddings = model.get_decoder(), model.get_input_embeddings()
    lm = [decoder, embeddings, model.get_output_embeddings()]
    lm_params = {id(p) for module in lm if module is not None for p in module.parameters()}
    keep = {name: p.requires_grad for name, p in model.named_parameters() if id(p) not in lm_params}
    prefix = _module_name(model, decoder)
    names = "|".join(map(re.escape, cfg.target_modules))
    pattern = rf"{re.escape(prefix)}\..*\.({names})" if prefix else rf"(.*\.)?({names})"
    tokens = {_module_name(model, embeddings): sorted(set(special_token_ids))} if cfg.train_special_tokens else None
    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern,
        trainable_token_indices=tokens,
    )
    tuner = LoraModel(model, peft_cfg, "default")  # injects in place; marks only the adapters trainable
    tuner._cast_adapter_dtype("default", autocast_adapter_dtype=True)  # fp32 adapters over a bf16 base, as peft's own
    for name, p in model.named_parameters():
        if name in keep:
            p.requires_grad_(keep[name])
    return LoraAdapters(tuner)
