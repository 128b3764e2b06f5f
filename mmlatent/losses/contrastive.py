"""Contrastive grounding loss (CoCoVa): symmetric InfoNCE between latent blocks and their targets.

Row i of `a` (a pooled latent block) should be closest to row i of `b` (its pooled target features) among
all rows of the batch, and vice versa. The inverse temperature is learnable and passed in as its log
(CLIP's parameterisation), clamped so exp() <= `max_scale`.

Trade-off: negatives are the other rows of the local batch only (no cross-device gather), so the loss is
cheap and needs no collective, but small per-device batches give few, easy negatives. The clamp is
functional: above log(max_scale) the scale stops receiving gradient, so the caller may also clamp the
parameter in place after each step (as open_clip does) to keep it where gradients can move it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor, max_scale: float = 100.0) -> Tensor:
    """Symmetric cross-entropy over the cosine-similarity matrix.

    a, b: (B, D), row i of a matches row i of b; logit_scale: scalar tensor, log of the inverse
    temperature. Returns a scalar; log(B) when the similarities carry no information, 0 at best.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"info_nce: expected two (B, D) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = F.normalize(a.float(), dim=-1)  # (B, D)
    b = F.normalize(b.float(), dim=-1)  # (B, D)
    scale = logit_scale.float().clamp(max=math.log(max_scale)).exp()
    logits = scale * a @ b.T  # (B, B)
    labels = torch.arange(a.shape[0], device=a.device)  # (B,)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
