"""Token selection: keep the top-k visual tokens most relevant to the current hidden state.

Relevance is one attention head's distribution of the hidden state over the visible visual tokens. The
top-k tokens go to the LQ-Former's cross-attention, so each thought looks at a few salient regions
(content addressing) instead of averaging the whole image. Top-k is not differentiable; a straight-through
factor `1 + w - stopgrad(w)` on each selected token leaves the forward values untouched while letting the
loss train the relevance projections through w.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class TokenSelectionConfig:
    """How many visual tokens a thought looks at, and the width of the relevance head."""

    top_k: int = 8
    """Visual tokens kept per thought."""
    dim: int = 64
    """Width of the relevance query and key projections."""


@dataclass
class Selection:
    """The result of one selection."""

    tokens: Tensor
    """(n, k, D) selected visual tokens (straight-through weighted)."""
    mask: Tensor
    """(n, k) False where a row had fewer than k visible tokens."""
    indices: Tensor
    """(n, k) indices into the M visual tokens, -1 where invalid."""
    relevance: Tensor
    """(n, M) relevance distribution, 0 on invisible tokens."""


class TokenSelector(nn.Module):
    """Relevance of each visual token to a hidden state, and the top-k of them."""

    def __init__(self, cfg: TokenSelectionConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.query = nn.Linear(hidden_size, cfg.dim, bias=False)
        self.key = nn.Linear(hidden_size, cfg.dim, bias=False)

    def forward(self, h: Tensor, visual: Tensor, visual_mask: Tensor) -> Selection:
        """h (n, D), visual (n, M, D), visual_mask (n, M) bool -> the top-k visible tokens."""
        n, M, _ = visual.shape
        q = self.query(h)  # (n, dim)
        k = self.key(visual)  # (n, M, dim)
        scores = torch.einsum("nd,nmd->nm", q, k) / math.sqrt(self.cfg.dim)  # (n, M)
        scores = scores.masked_fill(~visual_mask, float("-inf"))
        any_valid = visual_mask.any(-1, keepdim=True)  # (n, 1)
        relevance = torch.softmax(torch.where(any_valid, scores, torch.zeros_like(scores)), dim=-1)
        relevance = relevance * visual_mask  # (n, M): 0 on invisible tokens, all 0 in an empty row
        top = min(self.cfg.top_k, M)
        idx = relevance.detach().masked_fill(~visual_mask, -1.0).topk(top, dim=-1).indices  # (n, k)
        valid = torch.gather(visual_mask, 1, idx)  # (n, k)
        picked = torch.gather(visual, 1, idx[..., None].expand(n, top, visual.shape[-1]))  # (n, k, D)
        w = torch.gather(relevance, 1, idx)[..., None]  # (n, k, 1)
        picked = picked * (1 + w - w.detach())  # straight-through: values unchanged, gradient to relevance
        return Selection(
            tokens=picked, mask=valid, indices=torch.where(valid, idx, torch.full_like(idx, -1)), relevance=relevance
        )
