"""Attention masks and position masks built from token ids: the one place for them.

- `block_attention_mask`: the stage-2 4D mask. Each auxiliary image is visible only to its own latent
  block (the image's tokens, the block's `<|latent_start|>` and its slots); from `<|latent_end|>` on, later
  text sees the image only through the latent vectors. Everything else is causal with padding masked.
  Padding rows attend to themselves so no softmax row is empty (an all-False row gives NaN in SDPA).
- `observation_mask`: tokens strictly inside `<observation>…</observation>` spans, the positions that carry
  the heavier cross-entropy weight and the stage-2 alignment loss.

The trade-off of a dense (B, 1, L, L) boolean mask over a block-sparse one: it costs B·L² bytes (16 MB
for 16 × 1024²), but it is what every attention backend accepts, so native and composed backbones share it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_attention_mask(attention_mask: Tensor, hidden_spans: list[Tensor]) -> Tensor:
    """(B, L) padding mask + per-sample (n, 3) spans [image_start, image_end, visible_until) -> (B, 1, L, L) bool.

    Keys in [image_start, image_end) are visible only to queries in [image_start, visible_until); True means
    "may attend".
    """
    B, L = attention_mask.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()  # (L, L) query x key
    mask = causal[None] & attention_mask.bool()[:, None, :]  # (B, L, L)
    for b, spans in enumerate(hidden_spans):
        for start, end, until in spans.tolist():
            mask[b, until:, start:end] = False  # queries before `start` are already cut by causality
    mask |= torch.eye(L, dtype=torch.bool, device=mask.device)[None]  # padding rows see themselves
    return mask[:, None]  # (B, 1, L, L)


def observation_mask(input_ids: Tensor, open_id: int, close_id: int) -> Tensor:
    """(..., L) ids -> (..., L) bool, True strictly inside observation spans (tags excluded)."""
    opens = (input_ids == open_id).long()
    closes = (input_ids == close_id).long()
    depth = torch.cumsum(opens, -1) - torch.cumsum(closes, -1) - opens  # > 0 strictly inside a span
    return depth > 0
