"""Token-weighted next-token cross-entropy.

The stages weight tokens differently (observation spans ×2 in stage 1, ×4 in stages 2 and 3), so the loss
takes a per-token weight and returns the weighted mean: sum(w · ce) / sum(w). Normalising by the weight
sum keeps the loss scale comparable across batches with different numbers of observation tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmlatent.tokens import IGNORE_INDEX


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """Mean next-token CE weighted per target token.

    logits: (B, L, V) predictions at every position; labels: (B, L) targets aligned with the inputs
    (position t is predicted from position t-1); weights: (B, L) weight of each target, 0 = ignored.
    """
    pred = logits[:, :-1].float()  # (B, L-1, V)
    target = labels[:, 1:]  # (B, L-1)
    w = weights[:, 1:] * (target != IGNORE_INDEX)  # (B, L-1)
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    total = w.sum()
    return (ce * w.reshape(-1)).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)
