"""`LatentVLM`: a backbone plus its tokenizer, the model object users build, train and load.

It owns the tokenizer (with mmlatent's special tokens) and the backbone, and knows how to place visual
tokens into a token sequence. The forward runs teacher-forced text with images in place; latent blocks
(sketch and LQ-Former thoughts) build on `embed_inputs` and the backbone's cached LM forward.
It knows nothing of Lightning or of the data pipeline: it takes tensors and returns outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from mmlatent.model.backbone import ComposedBackbone, LMOutput
from mmlatent.model.config import ModelConfig
from mmlatent.model.language_model import load_language_model
from mmlatent.model.tokenizer import load_tokenizer, token_ids


class LatentVLM(nn.Module):
    """A VLM that can reason in text and in latent blocks."""

    def __init__(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        self.ids = token_ids(self.tokenizer)
        lm = load_language_model(cfg.lm, vocab_size=len(self.tokenizer))
        self.backbone = ComposedBackbone(cfg.vision, cfg.projector, lm)

    @property
    def tokens_per_image(self) -> int:
        return self.backbone.tokens_per_image

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        """(B, L) ids and (N_img, 3, H, W) images -> (B, L, D) LM inputs with visual tokens in place.

        The k-th run of `tokens_per_image` image tokens (row-major over the batch) receives image k.
        """
        embeds = self.backbone.embed_tokens(input_ids)  # (B, L, D)
        slots = input_ids == self.ids.image  # (B, L)
        n_slots = int(slots.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_images * self.tokens_per_image:
            raise ValueError(
                f"{n_slots} image tokens in the batch but {n_images} images × {self.tokens_per_image} tokens"
            )
        if n_images == 0:
            return embeds
        visual = self.backbone.encode_images(pixel_values)  # (N_img, T, D)
        visual = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)  # (N_img * T, D)
        return embeds.masked_scatter(slots.unsqueeze(-1), visual)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        pixel_values: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> LMOutput:
        """Teacher-forced forward over whole sequences (stage 1, the direct baseline)."""
        embeds = self.embed_inputs(input_ids, pixel_values)  # (B, L, D)
        return self.backbone.forward_lm(
            embeds, attention_mask, position_ids, output_hidden_states=output_hidden_states
        )

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
