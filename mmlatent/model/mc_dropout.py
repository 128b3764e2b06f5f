"""MC dropout for test-time scaling: dropout masks drawn per row, each row (a trajectory) from its own generator.

`latent_noise: mc_dropout` keeps dropout active in the latent modules only (the LQ-Former's attention and
MLP; the LM and the vision tower stay in eval mode) while generating, so each trajectory of a question
thinks its own thoughts. A module in train mode would draw every row's mask from torch's one global
stream, so a trajectory's masks would depend on which other questions share its batch; `RowDropout` draws
row r's mask from `generators[r]`, seeded per trajectory. The trade-off: one small random draw per row and
dropout site instead of one per site.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RowDropout:
    """Inverted dropout at probability `p` whose mask for row r of its input comes from `generators[r]`."""

    def __init__(self, p: float, generators: list[torch.Generator]):
        if not 0.0 < p < 1.0:
            raise ValueError(f"MC dropout needs a drop probability in (0, 1), got {p} (generation.noise_std)")
        self.p, self.generators = p, generators

    def __call__(self, x: Tensor) -> Tensor:
        """x (n, ...) with n == len(generators) -> x with each row's elements dropped by its own mask."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"RowDropout: {x.shape[0]} rows for {len(self.generators)} generators")
        draws = [torch.rand(x.shape[1:], generator=g, device=x.device) for g in self.generators]
        keep = torch.stack(draws) >= self.p if draws else torch.ones_like(x, dtype=torch.bool)  # (n, ...)
        return x * keep.to(x.dtype) / (1 - self.p)
