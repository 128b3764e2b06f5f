"""Grounding losses on latent blocks, gathered from a latent forward and a batch.

The losses themselves are pure functions in `mmlatent/losses/`; this file only lines up their inputs:
which latent vectors belong to which block, and which auxiliary image each block stands for. A stage
turns each term on with a weight (`GroundingConfig`); a weight of 0 skips the work entirely.

- sketch: the block's N latent vectors vs the frozen tower's features of its aux image, projected to LM
  space and pooled to N tokens;
- diffusion: the diffusion head denoises the aux image's visual tokens conditioned on the block's vectors;
- contrastive: InfoNCE between the mean latent vector of each block and the mean target token, across
  the blocks of the batch;
- selection: the thoughts of a block look at the region of the question image the sample says its aux
  image is about (thought mode, samples with `regions`);
- attention (stage 1 and the direct baseline, which have no latent blocks): the LM's own attention from
  each token that reads a region (`Batch.anchors`) falls in that region, the text-only modes' use of the
  same region labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mmlatent.data.batch import Batch
from mmlatent.losses.contrastive import info_nce
from mmlatent.losses.diffusion import diffusion_loss
from mmlatent.losses.selection import selection_loss
from mmlatent.losses.sketch import pool_tokens, sketch_loss
from mmlatent.model.diffusion_head import train_scheduler
from mmlatent.model.latent_vlm import LatentVLM


@dataclass
class GroundingConfig:
    """Weights of the grounding losses on latent blocks (0 turns a loss off)."""

    sketch_weight: float = 0.0
    """Sketch reconstruction (SkiLa); DESIGN's default when on: 0.1."""
    sketch_kind: Literal["mse", "cosine"] = "mse"
    """Normalised MSE or 1 - cos between latent vectors and pooled targets."""
    diffusion_weight: float = 0.0
    """Diffusion reconstruction (CoCoVa); needs `model.vlm.latent.diffusion_head: true`."""
    contrastive_weight: float = 0.0
    """Symmetric InfoNCE (CoCoVa); needs `model.vlm.latent.contrastive: true`."""
    selection_weight: float = 0.0
    """Selection: a block's thoughts look where the sample's `regions` say its aux image is about
    (`losses/selection.py`); needs thought mode (`model.vlm.latent.mode: thought`). In stage 1, whose aux
    images are inline, the selector is asked from the token before each aux image (`anchor_relevance`)."""
    attention_weight: float = 0.0
    """Stage 1 and the direct baseline: the LM's own attention from each anchor (a token that reads a region:
    the `<observation>` token where aux images are dropped, the token before a direct answer, the token before
    an inline aux image) over the prompt's image tokens is trained to fall in the anchor's region
    (`anchor_attention`; -log of its share inside, heads and `attention_layers` averaged). It is how modes
    that reason in text get the region labels the latent blocks' selection loss uses. Needs eager attention
    (`model.vlm.lm.attn_implementation: eager`)."""
    attention_layers: list[int] = field(default_factory=lambda: [-1])
    """LM layers whose attention the attention loss trains (Python indices: -1 is the last)."""
    path_layers: list[int] = field(default_factory=list)
    """The direct baseline: the token before the answer also reads the regions its answer is reached through,
    the k-th (a walk's start cell, then each cell passed) at layer `path_layers[k]`, the answer's own at
    `attention_layers`: the path a chain of thought reads in turn, read here in depth within one position.
    Regions past the list's length are not trained; empty: the answer's region only."""

    def check(self, model: LatentVLM) -> None:
        """Fail at start, naming the field, when a loss is on but the model lacks its module."""
        if self.diffusion_weight > 0 and model.diffusion_head is None:
            raise ValueError("stage.grounding.diffusion_weight > 0 needs model.vlm.latent.diffusion_head: true")
        if self.contrastive_weight > 0 and model.logit_scale is None:
            raise ValueError("stage.grounding.contrastive_weight > 0 needs model.vlm.latent.contrastive: true")
        if self.selection_weight > 0 and model.lq_former is None:
            raise ValueError("stage.grounding.selection_weight > 0 needs thought mode: model.vlm.latent.mode: thought")
        if self.attention_weight > 0:
            if model.backbone.transformers_model.config._attn_implementation != "eager":
                raise ValueError("stage.grounding.attention_weight > 0 needs eager attention: model.vlm.lm.attn_implementation: eager")
            n = model.backbone.num_layers
            bad = [i for i in self.attention_layers if not -n <= i < n]
            if bad or not self.attention_layers:
                raise ValueError(f"stage.grounding.attention_layers={self.attention_layers}: need layer indices in [-{n}, {n})")
            if any(not -n <= i < n for i in self.path_layers):
                raise ValueError(f"stage.grounding.path_layers={self.path_layers}: need layer indices in [-{n}, {n})")
        elif self.path_layers:
            raise ValueError("stage.grounding.path_layers are read by the attention loss: set attention_weight > 0")

    @property
    def any(self) -> bool:
        return self.sketch_weight > 0 or self.diffusion_weight > 0 or self.contrastive_weight > 0 or self.selection_weight > 0


def anchor_relevance(model: LatentVLM, batch: Batch, embeds: Tensor, last_hidden: Tensor) -> Tensor:
    """(N_anc, M) where the LQ-Former's selector, asked from each inline aux image's anchor token (the token
    before it, `batch.anchors`), looks among the prompt's images: stage 1's selection grounding, which
    trains the hidden state a later latent block starts from to say where its image comes from.

    embeds (B, L, D) the LM inputs; last_hidden (B, L, D) the LM's final hidden states."""
    visual = model.visual_context(batch.input_ids, embeds, batch.prompt_end)
    rows, cols = batch.anchors.unbind(-1)  # (N_anc,), (N_anc,)
    tokens, mask = visual.visible(rows, cols + 1)  # (N_anc, M, D), (N_anc, M)
    return model.lq_former.selector.relevance(last_hidden[rows, cols], tokens, mask)


def anchor_attention(model: LatentVLM, batch: Batch, embeds: Tensor, attentions: tuple[Tensor, ...], layers: list[int],
                     path_layers: list[int] = ()) -> Tensor:
    """(N_anc, M) where the LM looks in the prompt's images from each anchor token (`batch.anchors`): its
    attention probabilities over the prompt's image tokens, averaged over heads and `layers` (an anchor of
    path step k: at `path_layers[k]` alone), renormalised over those tokens.

    embeds (B, L, D) the LM inputs; attentions: per layer (B, H, L, L) probabilities."""
    visual = model.visual_context(batch.input_ids, embeds, batch.prompt_end)
    rows, cols = batch.anchors.unbind(-1)  # (N_anc,), (N_anc,)
    att = torch.stack([attentions[i][rows, :, cols] for i in layers]).mean((0, 2))  # (N_anc, L): layers, heads averaged
    for step, layer in enumerate(path_layers):
        at_step = (batch.anchor_steps == step)[:, None]  # (N_anc, 1)
        att = torch.where(at_step, attentions[layer][rows, :, cols].mean(1), att)  # (N_anc, L): that layer, heads averaged
    keys = visual.positions[rows].clamp_max(att.shape[-1] - 1)  # (N_anc, M) the image tokens' columns
    on_image = torch.gather(att, 1, keys) * visual.valid[rows]  # (N_anc, M)
    return on_image / on_image.sum(-1, keepdim=True).clamp_min(1e-12)


def block_vectors(input_ids: Tensor, latent_mask: Tensor, latent_vectors: Tensor, latent_start: int, blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Per-slot rows (the latent vectors, or the thoughts' relevance maps) of the chosen blocks, padded:
    ((n, N_max, D), (n, N_max) valid mask).

    Blocks are numbered across the batch in row-major order of their `<|latent_start|>` tokens (the numbering
    of `Batch.aux_blocks`); `latent_vectors` (n_slots, D) follow `latent_mask`'s row-major order.
    """
    block_id = torch.cumsum((input_ids == latent_start).flatten().long(), 0) - 1  # (B·L,) block of each position
    slot_block = block_id[latent_mask.flatten()]  # (n_slots,)
    members = [latent_vectors[slot_block == int(b)] for b in blocks]  # each (N_b, D)
    n_max = max(m.shape[0] for m in members)
    D = latent_vectors.shape[-1]
    out = latent_vectors.new_zeros(len(members), n_max, D)
    valid = torch.zeros(len(members), n_max, dtype=torch.bool, device=latent_vectors.device)
    for i, m in enumerate(members):
        out[i, : m.shape[0]] = m
        valid[i, : m.shape[0]] = True
    return out, valid  # (n, N_max, D), (n, N_max)


def grounding_losses(
    model: LatentVLM, batch: Batch, latent_mask: Tensor, latent_vectors: Tensor, cfg: GroundingConfig,
    relevance: Tensor | None = None,
) -> dict[str, Tensor]:
    """Weighted `*_loss` terms for the blocks of `batch` that have an aux image; {} when none applies.
    `relevance` (n_slots, M): the thoughts' maps (thought mode), for the selection loss."""
    if not cfg.any or batch.aux_blocks.numel() == 0:
        return {}
    losses: dict[str, Tensor] = {}
    if cfg.selection_weight > 0 and relevance is not None:
        maps, valid = block_vectors(batch.input_ids, latent_mask, relevance, model.ids.latent_start, batch.aux_blocks)
        region = batch.aux_regions[:, : maps.shape[-1]]  # (n, M)
        losses["selection_loss"] = cfg.selection_weight * selection_loss(maps, valid, region)
    if not (cfg.sketch_weight > 0 or cfg.diffusion_weight > 0 or cfg.contrastive_weight > 0):
        return losses
    vectors, valid = block_vectors(batch.input_ids, latent_mask, latent_vectors, model.ids.latent_start, batch.aux_blocks)
    targets = model.grounding_targets(batch.aux_pixel_values)  # (n, T, D), no gradient
    if cfg.sketch_weight > 0:
        pooled = pool_tokens(targets, model.backbone.token_grid, vectors.shape[1])  # (n, N_max, D)
        losses["sketch_loss"] = cfg.sketch_weight * sketch_loss(vectors, pooled, cfg.sketch_kind, valid)
    if cfg.diffusion_weight > 0:
        sched = train_scheduler(model.cfg.latent.diffusion)
        losses["diffusion_loss"] = cfg.diffusion_weight * diffusion_loss(model.diffusion_head, sched, targets, vectors, valid)
    if cfg.contrastive_weight > 0 and vectors.shape[0] > 1:
        mean_latent = (vectors * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)  # (n, D)
        losses["contrastive_loss"] = cfg.contrastive_weight * info_nce(mean_latent, targets.mean(1), model.logit_scale)
    return losses


