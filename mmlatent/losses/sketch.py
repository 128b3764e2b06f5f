"""Sketch reconstruction loss (SkiLa): the hidden states that feed a latent block should encode its image.

For a block standing for an auxiliary image, the hidden state at p-1 of each of the N slots is compared
with the image's visual tokens in LM space pooled to N tokens. Collapse guard: the target is detached,
and both sides are normalised (layer norm without parameters for MSE; cosine is scale-free), so neither
shrinking the target path nor shrinking the prediction lowers the loss.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def pool_tokens(features: Tensor, grid: tuple[int, int], n: int) -> Tensor:
    """(B, T = h·w, D) row-major grid tokens -> (B, n, D) by adaptive average pooling.

    A perfect-square n that fits the grid pools to a √n × √n grid; otherwise the flattened sequence is
    pooled to n tokens.
    """
    B, T, D = features.shape
    side = math.isqrt(n)
    if side * side == n and side <= min(grid):
        x = features.transpose(1, 2).reshape(B, D, *grid)  # (B, D, h, w)
        return F.adaptive_avg_pool2d(x, side).flatten(2).transpose(1, 2)  # (B, n, D)
    return F.adaptive_avg_pool1d(features.transpose(1, 2), n).transpose(1, 2)  # (B, n, D)


def sketch_loss(pred: Tensor, target: Tensor, kind: Literal["mse", "cosine"] = "mse", mask: Tensor | None = None) -> Tensor:
    """pred, target: (B, N, D); mask: (B, N) True where the pair counts."""
    target = target.detach().float()
    pred = pred.float()
    if kind == "mse":
        per = (F.layer_norm(pred, pred.shape[-1:]) - F.layer_norm(target, target.shape[-1:])).pow(2).mean(-1)
    else:
        per = 1 - F.cosine_similarity(pred, target, dim=-1)  # (B, N)
    if mask is None:
        return per.mean()
    return (per * mask).sum() / mask.sum().clamp_min(1)
