"""The sketch-mode projection: the hidden state at p-1 becomes the input at slot p.

SkiLa and Monet feed the last-layer hidden state straight back as the next input. A small head (linear or
a residual MLP) lets the model adapt the scale and basis of what it feeds back; both variants start as
the exact identity, so a freshly added head changes nothing until it learns.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn


class SketchHead(nn.Module):
    """(..., D) -> (..., D); identity at initialisation."""

    def __init__(self, kind: Literal["identity", "linear", "mlp"], hidden_size: int):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.proj = nn.Linear(hidden_size, hidden_size)
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(hidden_size))
                self.proj.bias.zero_()
        elif kind == "mlp":
            self.proj = nn.Sequential(
                nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
            )
            nn.init.zeros_(self.proj[-1].weight)
            nn.init.zeros_(self.proj[-1].bias)
        elif kind != "identity":
            raise ValueError(f"latent.sketch_head={kind!r} is not one of identity, linear, mlp")

    def forward(self, h: Tensor) -> Tensor:
        if self.kind == "identity":
            return h
        if self.kind == "mlp":
            return h + self.proj(h)  # residual: zero-initialised output layer makes this the identity
        return self.proj(h)
