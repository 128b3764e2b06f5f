"""Contrastive grounding loss (CoCoVa): symmetric InfoNCE between latent blocks and their targets.

Row i of `a` (a pooled latent block) should be closest to row i of `b` (its pooled target features) among
all rows of the batch, and vice versa. The inverse temperature is learnable and passed in as its log
(CLIP's parameterisation), clamped so it cannot blow up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor, max_scale: float = 100.0) -> Tensor:
    """Symmetric cross-entropy over cosine similarities. a, b: (B, D); logit_scale: scalar log-scale."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    scale = logit_scale.float().clamp(max=math.log(max_scale)).exp()
    logits = scale * a @ b.T  # (B, B)
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
