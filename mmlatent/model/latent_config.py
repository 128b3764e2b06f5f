"""`LatentConfig`: how a model thinks in latent blocks.

A latent block is `<|latent_start|>` + N slots + `<|latent_end|>`. At slot p the LM input is not a token
embedding but a vector made from the LM's last-layer hidden state at p-1: through a small projection head
(`sketch` mode, SkiLa/Monet), or through the LQ-Former that looks at the most relevant visual tokens
(`thought` mode, CoCoVa). The same loop runs the slots one by one with a KV cache (`sequential`) or
refines all slots in T parallel passes (`jacobi`, PCCoT).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmlatent.model.diffusion_head import DiffusionHeadConfig
from mmlatent.model.lq_former import LQFormerConfig


@dataclass
class LatentConfig:
    """Latent reasoning settings of a model."""

    mode: Literal["sketch", "thought"] = "sketch"
    """`sketch`: slot input = head(hidden state at p-1). `thought`: slot input = LQ-Former(hidden state at
    p-1, top-k visual tokens), gated with the hidden state."""
    slots: int = 4
    """Slots N per latent block in training data."""
    step_budget: int | None = None
    """Most latent steps per block when generating; None: 2 × `slots`."""
    block_end: Literal["model", "slots"] = "model"
    """How a generated block ends. Every slot position is labelled in training: the token after it is
    `<|latent|>` while the block goes on and `<|latent_end|>` after its last slot, and the token after
    `<|latent_end|>` says whether another block opens. `model`: the block ends at the first slot where the LM
    scores `<|latent_end|>` above `<|latent|>` (at most `step_budget` steps; Monet's way, for blocks of varying
    length). `slots`: after exactly `slots` steps, the length every block had in training (Coconut's way),
    whatever the LM says. Either way the LM itself decides whether another block follows."""
    schedule: Literal["sequential", "jacobi"] = "sequential"
    """`sequential`: one cached single-position LM forward per slot. `jacobi`: all slots at once, refined
    over `jacobi_iterations` passes of the LM over the suffix (the prefix is cached once)."""
    jacobi_iterations: int = 3
    """LM passes in Jacobi mode (PCCoT's T). Pass t feeds the latents computed by pass t-1."""
    sketch_head: Literal["identity", "linear", "mlp"] = "linear"
    """Projection of the hidden state in sketch mode (linear and mlp start as the identity)."""
    lq_former: LQFormerConfig = field(default_factory=LQFormerConfig)
    """The LQ-Former of thought mode (built only in thought mode)."""
    diffusion_head: bool = False
    """Build the diffusion reconstruction head (CoCoVa) for the diffusion grounding loss."""
    diffusion: DiffusionHeadConfig = field(default_factory=DiffusionHeadConfig)
    """Shape and noise schedule of the diffusion head."""
    contrastive: bool = False
    """Build the learnable temperature of the contrastive grounding loss."""

    @property
    def budget(self) -> int:
        """Most latent steps per generated block."""
        if self.block_end == "slots":
            return self.slots
        return self.step_budget if self.step_budget is not None else 2 * self.slots

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"latent.slots={self.slots} must be at least 1")
        if self.jacobi_iterations < 2:  # with 1 pass no slot is ever refined: they read the raw <|latent|> embedding
            raise ValueError(f"latent.jacobi_iterations={self.jacobi_iterations} must be at least 2")
        if self.step_budget is not None and self.step_budget < 1:
            raise ValueError(f"latent.step_budget={self.step_budget} must be at least 1")
