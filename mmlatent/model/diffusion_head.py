"""CoCoVa's diffusion reconstruction head: a small conditional denoiser over visual features.

Conditioned on a latent block's vectors, the network predicts the noise (or the velocity) that a
`diffusers` scheduler added to the block's target visual tokens. The network holds the parameters; the
schedulers hold none and are built from the config on demand (`train_scheduler` for `add_noise` during
training, `sample_scheduler` for DDIM sampling in visualisations), as diffusers separates them. The
denoiser is a few pre-norm transformer layers over the target tokens that cross-attend to the condition;
its output layer starts at zero, so at initialisation it predicts zero noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn


@dataclass
class DiffusionHeadConfig:
    """Shape and noise schedule of the diffusion head."""

    width: int = 128
    """Transformer width of the denoiser."""
    layers: int = 2
    """Denoiser layers (self-attention over target tokens, cross-attention to the condition, MLP)."""
    heads: int = 4
    """Attention heads."""
    max_tokens: int = 256
    """Most target tokens (size of the learned position table)."""
    num_train_timesteps: int = 1000
    """Diffusion steps of the training schedule."""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    """Noise schedule."""
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """What the denoiser predicts: the added noise, or the velocity."""
    sample_steps: int = 25
    """DDIM steps when sampling for visualisation."""


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, cond: Tensor, cond_pad: Tensor | None) -> Tensor:
        h = self.n1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        h = self.n2(x)
        x = x + self.cross_attn(h, cond, cond, key_padding_mask=cond_pad, need_weights=False)[0]
        return x + self.mlp(self.n3(x))


class DiffusionHead(nn.Module):
    """Denoiser: (noisy target tokens, timesteps, condition) -> predicted noise or velocity."""

    def __init__(self, cfg: DiffusionHeadConfig, target_dim: int, cond_dim: int):
        super().__init__()
        W = cfg.width
        self.cfg = cfg
        self.inp = nn.Linear(target_dim, W)
        self.pos = nn.Parameter(torch.zeros(cfg.max_tokens, W))
        nn.init.normal_(self.pos, std=0.02)
        self.time = nn.Sequential(nn.Linear(W, W), nn.SiLU(), nn.Linear(W, W))
        self.cond = nn.Linear(cond_dim, W)
        self.blocks = nn.ModuleList(_Block(W, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(W)
        self.out = nn.Linear(W, target_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, noisy: Tensor, timesteps: Tensor, cond: Tensor, cond_mask: Tensor | None = None) -> Tensor:
        """noisy (B, Nt, Dt); timesteps (B,); cond (B, Nc, Dc); cond_mask (B, Nc) True = valid -> (B, Nt, Dt)."""
        B, Nt, _ = noisy.shape
        if Nt > self.cfg.max_tokens:
            raise ValueError(f"{Nt} target tokens > latent.diffusion.max_tokens={self.cfg.max_tokens}")
        t = get_timestep_embedding(timesteps, self.cfg.width, flip_sin_to_cos=True, downscale_freq_shift=0)
        t = self.time(t.to(noisy.dtype))  # (B, W)
        x = self.inp(noisy) + self.pos[:Nt][None] + t[:, None]  # (B, Nt, W)
        c = torch.cat([self.cond(cond), t[:, None]], dim=1)  # (B, Nc + 1, W): the timestep is always attendable
        pad = None
        if cond_mask is not None:
            pad = torch.cat([~cond_mask, torch.zeros_like(cond_mask[:, :1])], dim=1)  # (B, Nc + 1)
        for block in self.blocks:
            x = block(x, c, pad)
        return self.out(self.norm(x))


def train_scheduler(cfg: DiffusionHeadConfig) -> DDPMScheduler:
    """The noise schedule used by `add_noise` (and `get_velocity`) in the diffusion loss."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type
    )


def sample_scheduler(cfg: DiffusionHeadConfig) -> DDIMScheduler:
    """A DDIM sampler with the same betas and prediction type (for visualisation)."""
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type, clip_sample=False, set_alpha_to_one=True,
    )


@torch.no_grad()
def sample(
    head: DiffusionHead,
    scheduler: DDIMScheduler,
    cond: Tensor,
    target_shape: tuple[int, int],
    steps: int,
    cond_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw target tokens (B, Nt, Dt) given the condition, by `steps` DDIM steps from pure noise."""
    B = cond.shape[0]
    x = torch.randn((B, *target_shape), generator=generator, device=cond.device, dtype=cond.dtype)
    scheduler.set_timesteps(steps, device=cond.device)
    for t in scheduler.timesteps:
        pred = head(x, t.expand(B).to(cond.device), cond, cond_mask)
        x = scheduler.step(pred, t, x, generator=generator).prev_sample
    return x
