"""Token selection: keep the top-k visual tokens most relevant to the current hidden state.

Relevance is one small attention head's distribution of the hidden state over the visible visual tokens:
softmax((W_q h)·(W_k v) / sqrt(dim)) over the tokens the mask lets through. The top-k tokens go to the
LQ-Former's cross-attention, so each thought looks at a few salient regions (content addressing) instead
of averaging the whole image, and the selected indices and the relevance map are what a heatmap shows.

The trade-off is hard selection against gradient. Top-k is not differentiable, so the picked tokens are
multiplied by a straight-through factor `1 + w - stopgrad(w)` (w: the token's relevance): the values the
LQ-Former sees are the raw tokens, and W_q / W_k still get a gradient, but only through the k tokens
already picked. A relevance head trained only that way rarely finds a token it never picks, so the
LQ-Former also reads `relevance` itself (the relevance-weighted mean of all visible tokens), which gives
every token's score a gradient; see `mmlatent.model.lq_former`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TokenSelectionConfig:
    """How many visual tokens a thought looks at, and the width of the relevance head."""

    top_k: int = 8
    """Visual tokens kept per thought (fewer when an image context has fewer tokens)."""
    dim: int = 64
    """Width of the relevance query (W_q h) and key (W_k v) projections."""
    scale: float | None = None
    """None: scores are q·k / sqrt(dim), unbounded. A number: the cosine of q and k times this, so the
    relevance can be sharp (a margin of `scale` per unit of cosine) but not arbitrarily confident: steadier
    under a strong selection loss, slower to learn later (README's tried table compares both)."""
    centre_keys: bool = False
    """Compute keys from the visual tokens minus their mean over the visible tokens, scaled to unit RMS:
    the relevance then reads what tells tokens apart (place, content), not what they share. Without it,
    tokens that share a large common component give nearly equal scores and the selection stays uniform."""

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"latent.lq_former.selection.top_k={self.top_k} must be at least 1")
        if self.dim < 1:
            raise ValueError(f"latent.lq_former.selection.dim={self.dim} must be at least 1")
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"latent.lq_former.selection.scale={self.scale} must be > 0 (or null)")


class TokenSelector(nn.Module):
    """(h, visual tokens, mask) -> the top-k visible tokens by relevance to h."""

    def __init__(self, cfg: TokenSelectionConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.query = nn.Linear(hidden_size, cfg.dim, bias=False)  # W_q: hidden state -> relevance query
        self.key = nn.Linear(hidden_size, cfg.dim, bias=False)  # W_k: visual token -> relevance key

    def relevance(self, h: Tensor, visual: Tensor, visual_mask: Tensor) -> Tensor:
        """h (B, D), visual (B, M, D), visual_mask (B, M) -> (B, M) softmax over the visible tokens.

        0 on invisible tokens; a row with no visible token is all 0 (and has a zero, finite gradient).
        """
        q = self.query(h)  # (B, dim)
        k = self.key(self._centred(visual, visual_mask) if self.cfg.centre_keys else visual)  # (B, M, dim)
        if self.cfg.scale is None:
            factor = 1 / math.sqrt(self.cfg.dim)
        else:  # scale · cos(q, k)
            q, k, factor = F.normalize(q, dim=-1), F.normalize(k, dim=-1), self.cfg.scale
        scores = factor * torch.einsum("bd,bmd->bm", q, k)  # (B, M)
        # a row with nothing visible softmaxes plain zeros instead of all -inf (which would be NaN)
        visible = visual_mask | ~visual_mask.any(-1, keepdim=True)  # (B, M)
        scores = scores.masked_fill(~visible, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(visual.dtype) * visual_mask  # (B, M)

    @staticmethod
    def _centred(visual: Tensor, visual_mask: Tensor) -> Tensor:
        """visual (B, M, D) minus its mean over the visible tokens, divided by their RMS distance from it."""
        m = visual_mask[..., None].to(visual.dtype)  # (B, M, 1)
        count = m.sum(1, keepdim=True).clamp_min(1)  # (B, 1, 1)
        centred = (visual - (visual * m).sum(1, keepdim=True) / count) * m  # (B, M, D)
        rms = (centred.pow(2).sum((1, 2), keepdim=True) / (count * visual.shape[-1])).sqrt()  # (B, 1, 1)
        return centred / (rms + 1e-6)  # (B, M, D)

    def forward(self, h: Tensor, visual: Tensor, visual_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """h (B, D), visual (B, M, D), visual_mask (B, M) bool -> (selected, selected_mask, indices, relevance).

        - selected (B, k, D): the picked tokens, most relevant first, k = min(top_k, M); forward values are
          the raw tokens, the gradient of each also reaches W_q / W_k through its relevance.
        - selected_mask (B, k) bool: False where a row has fewer than k visible tokens.
        - indices (B, k) long: positions of the picked tokens in M, -1 where `selected_mask` is False.
        - relevance (B, M): the full relevance map, 0 on invisible tokens.
        """
        B, M, D = visual.shape
        relevance = self.relevance(h, visual, visual_mask)  # (B, M)
        k = min(self.cfg.top_k, M)
        # invisible tokens rank below every visible one, even a visible one whose relevance underflowed to 0
        rank = relevance.detach().float().masked_fill(~visual_mask, -1.0)  # (B, M)
        idx = rank.topk(k, dim=-1).indices  # (B, k)
        selected_mask = torch.gather(visual_mask, 1, idx)  # (B, k)
        selected = torch.gather(visual, 1, idx[..., None].expand(B, k, D))  # (B, k, D)
        w = torch.gather(relevance, 1, idx)[..., None]  # (B, k, 1)
        # straight-through: w - stopgrad(w) is exactly 0 forward, so the values are the raw tokens
        selected = selected + selected * (w - w.detach())  # (B, k, D)
        selected = torch.where(selected_mask[..., None], selected, 0.0)  # (B, k, D): invalid slots are zero
        indices = idx.masked_fill(~selected_mask, -1)  # (B, k)
        return selected, selected_mask, indices, relevance
