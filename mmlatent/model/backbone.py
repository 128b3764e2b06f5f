"""The one small interface every VLM backbone offers, and the composed backbone behind it.

Everything above this file (the latent loop, stages, generation, evaluation) talks to a `Backbone` only:
images to LM-space tokens, text ids to embeddings, and one LM forward on `inputs_embeds` with explicit
position ids, an optional KV cache and, on request, the hidden states of every layer. The composed
backbone is `VisionTower -> Projector -> AutoModelForCausalLM`; native HF VLMs (`native_backbone.py`) implement
the same methods.

The LM forward calls the decoder (`get_decoder()`) and the output head separately, so callers that need
logits only at a few positions (a latent step, the last prompt token) do not pay for the full vocabulary
projection everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import Cache, DynamicCache, PreTrainedModel

from mmlatent.model.projector import Projector, ProjectorConfig
from mmlatent.model.vision_tower import VisionTower, VisionTowerConfig


@dataclass
class LMOutput:
    """What one LM forward returns."""

    last_hidden: Tensor
    """(B, L, D) final-layer hidden states (after the final norm)."""
    logits: Tensor | None
    """(B, L, V) next-token logits, or None when `logits=False` was asked."""
    hidden_states: tuple[Tensor, ...] | None
    """num_layers + 1 tensors of (B, L, D) (embeddings first), when asked for."""
    cache: Cache | None
    """The KV cache after this forward, when one was passed or `use_cache=True`."""
    attentions: tuple[Tensor, ...] | None = None
    """num_layers tensors of (B, heads, S, keys): each layer's attention probabilities, when asked for (the
    LM must run eager attention, `lm.attn_implementation: eager`; fused kernels do not return them)."""


class Backbone(nn.Module):
    """Abstract VLM backbone. Subclasses set `hidden_size`, `num_layers`, `tokens_per_image`, `token_grid`."""

    hidden_size: int
    num_layers: int
    tokens_per_image: int
    token_grid: tuple[int, int]
    """(h, w) grid of an image's LM-space tokens, row-major (grounding targets are pooled on it)."""

    def image_transform(self, train: bool = False) -> Callable[[Image.Image], Tensor]:
        raise NotImplementedError

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, tokens_per_image, D) visual tokens in LM space."""
        raise NotImplementedError

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """(B, L) -> (B, L, D) token embeddings."""
        return self.transformers_model.get_input_embeddings()(input_ids)

    def lm_head(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., V) logits."""
        return self.transformers_model.get_output_embeddings()(hidden)

    def new_cache(self) -> Cache:
        raise NotImplementedError

    @property
    def transformers_model(self) -> PreTrainedModel:
        """The transformers model holding the LM's decoder, embeddings and head (LoRA adapters go into it)."""
        raise NotImplementedError

    def bind_images(self, image_mask: Tensor) -> None:
        """Where the image tokens sit in the (B, L) sequences the next `forward_lm` calls run over.

        `LatentVLM.embed_inputs` calls this with its image-slot mask. Backbones whose positions depend on the
        image layout (Qwen2.5-VL's multimodal rotary positions) keep it; the default ignores it.
        """

    def lm_positions(self, position_ids: Tensor, start: int) -> Tensor:
        """The decoder's position ids for 1D `position_ids` (B, S) at columns start .. start+S-1 (default: as given)."""
        return position_ids

    def running(self, cache: Cache | None) -> ContextManager:
        """Context of one decoder call with `cache` (native backbones track it for activation checkpointing)."""
        return nullcontext()

    def truncate_cache(self, cache: Cache, length: int) -> None:
        """Cut `cache` back to its first `length` positions, in place."""
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)  # transformers 5: a negative count removes that many trailing positions

    def forward_lm(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor,
        cache: Cache | None = None,
        output_hidden_states: bool = False,
        logits: bool = True,
        output_attentions: bool = False,
    ) -> LMOutput:
        """One decoder forward on `inputs_embeds` (B, S, D) with explicit 1D positions (B, S), appending to
        `cache` when given; the head runs only when `logits`; `output_attentions` returns every layer's
        attention probabilities."""
        start = cache.get_seq_length() if cache is not None else 0  # the column of this segment's first input
        attention_mask = additive_for_eager(attention_mask, inputs_embeds.dtype, self.transformers_model.config)
        with self.running(cache):
            out = self.transformers_model.get_decoder()(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=self.lm_positions(position_ids, start),
                cache=cache,
                use_cache=cache is not None,
                output_hidden_states=output_hidden_states,
                **({"output_attentions": True} if output_attentions else {}),
            )
        last = out.last_hidden_state  # (B, S, D)
        attentions = out.attentions if output_attentions else None
        if output_attentions and (not attentions or any(a is None for a in attentions)):
            raise ValueError("output_attentions: the LM returned no attention probabilities; run it with "
                             "eager attention (model.vlm.lm.attn_implementation: eager)")
        return LMOutput(
            last_hidden=last,
            logits=self.lm_head(last) if logits else None,
            hidden_states=out.hidden_states if output_hidden_states else None,
            cache=getattr(out, "cache", None),
            attentions=attentions,
        )


class ComposedBackbone(Backbone):
    """Vision tower (open_clip or timm) -> projector -> any causal LM from transformers."""

    def __init__(self, vision_cfg: VisionTowerConfig, projector_cfg: ProjectorConfig, lm: PreTrainedModel):
        super().__init__()
        self.vision = VisionTower(vision_cfg)
        self.lm = lm
        self.hidden_size = lm.config.get_text_config().hidden_size
        self.num_layers = lm.config.get_text_config().num_hidden_layers
        self.projector = Projector(projector_cfg, self.vision.hidden_size, self.hidden_size, self.vision.grid_size)
        self.tokens_per_image = self.projector.num_tokens
        self.token_grid = self.projector.token_grid

    def image_transform(self, train: bool = False) -> Callable[[Image.Image], Tensor]:
        return self.vision.image_transform(train=train)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        feats = self.vision(pixel_values)  # (N, T_patch, D_vision)
        return self.projector(feats.to(self.projector_dtype))  # (N, tokens_per_image, D)

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def new_cache(self) -> Cache:
        return DynamicCache(config=self.lm.config)

    @property
    def transformers_model(self) -> PreTrainedModel:
        return self.lm


def additive_for_eager(mask: Tensor | None, dtype: torch.dtype, config) -> Tensor | None:
    """A (B, 1, Q, K) boolean mask (True: attend) as eager attention needs it. transformers hands a 4D mask to
    the attention as given; SDPA reads a boolean one, but eager adds the mask to the scores, so a boolean mask
    would block nothing (not even the future)."""
    if mask is None or mask.dim() != 4 or mask.dtype != torch.bool or getattr(config, "_attn_implementation", None) != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
