"""Sketch reconstruction loss (SkiLa): the hidden states that feed a latent block should encode its image.

For a block standing for an auxiliary image, the hidden state at p-1 of each of the N slots is compared
with the image's visual tokens in LM space, pooled to N tokens (`pool_tokens`).

Collapse guard: the target is detached inside the loss, and both sides are normalised before comparing
(layer norm without affine parameters for "mse"; "cosine" is 1 - cos, scale-free by definition). So the
loss cannot be lowered by shrinking the target path (no gradient reaches it, and its scale is divided
out) nor by shrinking the prediction towards zero (its scale is divided out too); only the direction and
the pattern across channels count. The price: the absolute scale of the hidden states is not grounded.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def pool_tokens(features: Tensor, grid: tuple[int, int], n: int) -> Tensor:
    """(B, T = h·w, D) row-major grid tokens -> (B, n, D) by adaptive average pooling.

    A perfect-square n whose side fits the grid pools to a √n × √n grid (row-major output), keeping the
    2D layout; any other n pools the flattened sequence to n tokens. n = 1 is the mean token.
    """
    B, T, D = features.shape
    h, w = grid
    if T != h * w:
        raise ValueError(f"pool_tokens: got {T} tokens for a {h}x{w} grid")
    if n < 1:
        raise ValueError(f"pool_tokens: n={n} must be >= 1")
    side = math.isqrt(n)
    if side * side == n and side <= min(h, w):
        x = features.transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w)
        x = F.adaptive_avg_pool2d(x, side)  # (B, D, √n, √n)
        return x.flatten(2).transpose(1, 2)  # (B, n, D)
    x = F.adaptive_avg_pool1d(features.transpose(1, 2), n)  # (B, D, n)
    return x.transpose(1, 2)  # (B, n, D)


def sketch_loss(pred: Tensor, target: Tensor, kind: Literal["mse", "cosine"] = "mse", mask: Tensor | None = None) -> Tensor:
    """Mean over valid slots of the normalised MSE (or 1 - cos) between prediction and detached target.

    pred (B, N, D) hidden states at slots p-1; target (B, N, D) pooled projected tower features; mask
    (B, N) True where the pair counts (invalid entries may hold anything, NaN included). 0 when no pair
    is valid.
    """
    if pred.shape != target.shape:
        raise ValueError(f"sketch_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    target = target.detach().float()  # (B, N, D)
    pred = pred.float()  # (B, N, D)
    if kind == "mse":
        D = pred.shape[-1]
        per = (F.layer_norm(pred, (D,)) - F.layer_norm(target, (D,))).pow(2).mean(-1)  # (B, N)
    elif kind == "cosine":
        per = 1 - F.cosine_similarity(pred, target, dim=-1)  # (B, N)
    else:
        raise ValueError(f"sketch_loss: kind={kind!r}; expected 'mse' or 'cosine'")
    if mask is None:
        return per.mean()
    mask = mask.bool()
    per = torch.where(mask, per, torch.zeros_like(per))  # (B, N): masked NaN must not leak
    return per.sum() / mask.sum().clamp_min(1)
