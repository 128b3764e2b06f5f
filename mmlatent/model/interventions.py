"""Latent interventions: the causal check that a model's latent vectors carry its reasoning.

While generating, every latent slot's input (the vector made from the previous hidden state) can be
replaced before the LM reads it:

- `zero`: the zero vector;
- `noise`: Gaussian noise rescaled to the norm of the vector it replaces (same size, no content);
- `swap`: the vector another question of the batch fed at the same (block, slot) in an untouched run
  (each question takes the next question's, cyclically, trajectory k of it under test-time scaling; past the
  end of the donor's trajectory, the donor's last vector; zeros if the donor never entered a block).

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


def swap_donors(questions: list[int]) -> list[int]:
    """The donor row of every row: `questions[r]` names the question row r asks (test-time scaling repeats a
    question over several rows in a row). Row r takes the row of the next question of the batch (cyclically,
    in order of first appearance) that holds the same trajectory of it (its k-th row, k modulo that question's
    row count): a donor is always another question."""
    order = list(dict.fromkeys(questions))  # distinct questions, in order
    if len(order) < 2:
        raise ValueError(
            f"latent_intervention='swap' needs at least two different questions in a batch, got {len(order)}: "
            f"every question takes another question's latents"
        )
    rows: dict[int, list[int]] = {q: [] for q in order}
    rank = []  # row r is the rank[r]-th row of its question
    for r, q in enumerate(questions):
        rank.append(len(rows[q]))
        rows[q].append(r)
    following = {q: order[(k + 1) % len(order)] for k, q in enumerate(order)}
    return [rows[following[q]][rank[r] % len(rows[following[q]])] for r, q in enumerate(questions)]
