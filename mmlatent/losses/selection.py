"""Selection grounding loss: a latent block's thoughts should look at the region its step is about.

Where the data says which part of a question image an auxiliary image is about (`regions` in the sample:
the highlighted cell, a crop's box), the thoughts of the block standing for that aux image are trained to
put their relevance (`TokenSelector`'s distribution over the visual tokens) there: the loss is
-log(mass of the block's mean relevance inside the region), averaged over the blocks that have a region.

It supervises only where the LQ-Former looks, not what it makes of it: the thought's content still comes
from the stage's other losses. The trade-off is its need for region labels; blocks without one are left
out, so a corpus without them simply gets no selection term.
"""

from __future__ import annotations

import torch
from torch import Tensor


def selection_loss(relevance: Tensor, valid: Tensor, region: Tensor) -> Tensor:
    """relevance (n, N, M): each block's N thoughts' maps over its sample's M visual tokens; valid (n, N):
    real thoughts; region (n, M) bool: the tokens the block should look at -> mean -log(mass in region)
    over the blocks with a non-empty region (0 when none has one)."""
    has = region.any(-1) & valid.any(-1)  # (n,)
    if not bool(has.any()):
        return relevance.sum() * 0.0
    weights = valid[..., None].to(relevance.dtype)  # (n, N, 1)
    mean = (relevance * weights).sum(1) / weights.sum(1).clamp_min(1)  # (n, M) the block's mean relevance
    mass = (mean * region.to(mean.dtype)).sum(-1)  # (n,)
    return -torch.log(mass[has].clamp_min(1e-6)).mean()
