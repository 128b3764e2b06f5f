"""Latent interventions: the causal check that a model's latent vectors carry its reasoning.

While generating, every latent slot's input (the vector made from the previous hidden state) can be
replaced before the LM reads it:

- `zero`: the zero vector;
- `noise`: Gaussian noise rescaled to the norm of the vector it replaces (same size, no content);
- `swap`: the vector another question of the batch fed at the same (block, slot) in an untouched run
  (question i takes question i + 1's, cyclically; past the end of the donor's trajectory, the donor's last
  vector; zeros if the donor never entered a block).

If accuracy barely moves under these, the answers do not depend on what the latents hold (CapImagine's
finding for Monet, LVR and Mirage). The trade-off of `swap`: it needs the untouched run's trajectories
first, so it costs two generations; in exchange the substitute is a real latent of the same model, on the
same distribution as the ones it replaces, which zeros and noise are not.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

Intervention = Literal["none", "zero", "noise", "swap"]
INTERVENTIONS: tuple[Intervention, ...] = ("none", "zero", "noise", "swap")


class LatentEdit(Protocol):
    """Replaces the latent inputs of some rows: rows (n,), block and slot numbers (n,), vectors (n, D) -> (n, D)."""

    def __call__(self, rows: Tensor, blocks: Tensor, slots: Tensor, vectors: Tensor) -> Tensor: ...


class ZeroLatents:
    """Every latent input becomes the zero vector."""

    def __call__(self, rows: Tensor, blocks: Tensor, slots: Tensor, vectors: Tensor) -> Tensor:
        return torch.zeros_like(vectors)


class NoiseLatents:
    """Every latent input becomes Gaussian noise with the norm of the vector it replaces."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, rows: Tensor, blocks: Tensor, slots: Tensor, vectors: Tensor) -> Tensor:
        noise = torch.randn(vectors.shape, generator=self.generator, device=vectors.device, dtype=torch.float32)
        scale = vectors.float().norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (noise * scale).to(vectors.dtype)  # (n, D)


class ReplayLatents:
    """Every latent input of row i becomes `trajectories[donor[i]]`'s vector at the same (block, slot)."""

    def __init__(self, trajectories: list[dict[tuple[int, int], Tensor]], donors: list[int]):
        """`trajectories[r]`: row r's untouched run, (block, slot) -> (D,) vector; `donors[i]`: whose to feed row i."""
        self.trajectories, self.donors = trajectories, donors

    def _vector(self, row: int, block: int, slot: int, like: Tensor) -> Tensor:
        donor = self.trajectories[self.donors[row]]
        if not donor:
            return torch.zeros_like(like)
        if (block, slot) in donor:
            return donor[(block, slot)].to(like)
        return donor[max(donor)].to(like)  # past the donor's trajectory: its last vector

    def __call__(self, rows: Tensor, blocks: Tensor, slots: Tensor, vectors: Tensor) -> Tensor:
        out = [self._vector(r, b, s, v) for r, b, s, v in zip(rows.tolist(), blocks.tolist(), slots.tolist(), vectors)]
        return torch.stack(out) if out else vectors


def swap_donors(n: int) -> list[int]:
    """Question i takes the latents of question i + 1 (the last takes the first's): nobody keeps its own."""
    if n < 2:
        raise ValueError("latent_intervention='swap' needs at least two questions in a batch (batch size >= 2)")
    return [(i + 1) % n for i in range(n)]
