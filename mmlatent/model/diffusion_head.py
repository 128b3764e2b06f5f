"""CoCoVa's diffusion reconstruction head: a small conditional denoiser over visual features.

Conditioned on a latent block's vectors, the network predicts the noise (or the velocity) that a
`diffusers` scheduler added to the block's target visual tokens. The network holds the parameters; the
schedulers hold none and are built from the config on demand (`train_scheduler` for `add_noise` and
`get_velocity` during training, `sample_scheduler` for DDIM sampling in visualisations), as diffusers
separates them. The denoiser is a few pre-norm transformer layers over the target tokens that
cross-attend to the condition; its output layer starts at zero, so at initialisation it predicts zero.

Trade-off: a transformer rather than an MLP denoiser costs a little more, but it sees the target tokens
jointly and attends to each latent vector separately, so it can tell which latent explains which region
instead of reading one pooled summary. The zero-initialised output keeps the first steps harmless, at the
price that the latents receive no gradient from this head until its output layer has moved (one step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn


@dataclass
class DiffusionHeadConfig:
    """Shape and noise schedule of the diffusion head."""

    width: int = 128
    """Transformer width of the denoiser."""
    layers: int = 2
    """Denoiser layers (self-attention over target tokens, cross-attention to the condition, MLP)."""
    heads: int = 4
    """Attention heads; must divide `width`."""
    max_tokens: int = 256
    """Most target tokens per block (size of the learned position table)."""
    num_train_timesteps: int = 1000
    """Diffusion steps of the training schedule."""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    """Noise schedule (diffusers' names); `squaredcos_cap_v2` is the cosine schedule of improved DDPM."""
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    """What the denoiser predicts: the added noise, or the velocity √ᾱ·ε - √(1-ᾱ)·x₀ (the default: it samples
    far better from an undertrained head, whose ε errors DDIM multiplies at high noise)."""
    sample_steps: int = 25
    """DDIM steps when sampling for visualisation."""

    def __post_init__(self) -> None:
        if self.width < 1 or self.heads < 1 or self.width % self.heads:
            raise ValueError(f"diffusion.width={self.width} must be a positive multiple of diffusion.heads={self.heads}")
        if self.layers < 0:
            raise ValueError(f"diffusion.layers={self.layers}: must be >= 0")
        if self.max_tokens < 1:
            raise ValueError(f"diffusion.max_tokens={self.max_tokens}: must be >= 1")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(
                f"diffusion.beta_schedule={self.beta_schedule!r}: expected 'linear', 'scaled_linear' or 'squaredcos_cap_v2'"
            )
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"diffusion.prediction_type={self.prediction_type!r}: expected 'epsilon' or 'v_prediction'")
        if not 1 <= self.sample_steps <= self.num_train_timesteps:
            raise ValueError(
                f"diffusion.sample_steps={self.sample_steps}: must be in [1, num_train_timesteps={self.num_train_timesteps}]"
            )


class _Block(nn.Module):
    """Pre-norm: self-attention over target tokens, cross-attention to the condition, MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, cond: Tensor, cond_pad: Tensor | None) -> Tensor:
        """x (B, Nt, W); cond (B, Nc+1, W); cond_pad (B, Nc+1) True = ignore (torch's convention)."""
        h = self.n1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]  # (B, Nt, W)
        h = self.n2(x)
        x = x + self.cross_attn(h, cond, cond, key_padding_mask=cond_pad, need_weights=False)[0]  # (B, Nt, W)
        return x + self.mlp(self.n3(x))  # (B, Nt, W)


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
        """noisy (B, Nt, Dt); timesteps (B,) integer; cond (B, Nc, Dc); cond_mask (B, Nc) True = valid -> (B, Nt, Dt).

        The timestep embedding is also appended to the condition as one always-visible key, so a row whose
        latent vectors are all masked still attends somewhere (no NaN from an empty softmax).
        """
        B, Nt, _ = noisy.shape
        if Nt > self.cfg.max_tokens:
            raise ValueError(f"{Nt} target tokens > latent.diffusion.max_tokens={self.cfg.max_tokens}")
        dtype = self.inp.weight.dtype
        t = get_timestep_embedding(timesteps.reshape(B), self.cfg.width, flip_sin_to_cos=True, downscale_freq_shift=0)
        t = self.time(t.to(dtype))  # (B, W)
        x = self.inp(noisy.to(dtype)) + self.pos[:Nt][None] + t[:, None]  # (B, Nt, W)
        c = torch.cat([self.cond(cond.to(dtype)), t[:, None]], dim=1)  # (B, Nc+1, W)
        pad = None
        if cond_mask is not None:
            pad = torch.cat([~cond_mask.bool(), cond_mask.new_zeros(B, 1, dtype=torch.bool)], dim=1)  # (B, Nc+1)
        for block in self.blocks:
            x = block(x, c, pad)  # (B, Nt, W)
        return self.out(self.norm(x))  # (B, Nt, Dt)


def train_scheduler(cfg: DiffusionHeadConfig) -> DDPMScheduler:
    """The noise schedule whose `add_noise` / `get_velocity` the diffusion loss uses."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def sample_scheduler(cfg: DiffusionHeadConfig) -> DDIMScheduler:
    """A DDIM sampler with the same betas and prediction type (for visualisation).

    Features are not images in [-1, 1], so no clipping of the predicted x₀. The timesteps keep diffusers'
    default "leading" spacing, which starts a little below the last training step: there ᾱ is ~0 (exactly
    so for the cosine schedule's capped last beta) and ε-prediction's x₀ = (x - √(1-ᾱ)·ε)/√ᾱ blows up,
    while the skipped stretch holds almost no signal.
    """
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        set_alpha_to_one=True,
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
    """Draw target tokens (B, Nt, Dt) given cond (B, Nc, Dc) by `steps` scheduler steps from pure noise.

    Any diffusers scheduler with `set_timesteps`/`step` works (DDIM from `sample_scheduler`, or e.g. a
    DPM-Solver built from the same config). The chain runs in float32 on cond's device; noise is drawn
    with diffusers' `randn_tensor`, so a CPU generator also seeds a GPU run. Returns float32.
    """
    B = cond.shape[0]
    x = randn_tensor((B, *target_shape), generator=generator, device=cond.device, dtype=torch.float32)
    x = x * scheduler.init_noise_sigma  # (B, Nt, Dt)
    scheduler.set_timesteps(steps, device=cond.device)
    for t in scheduler.timesteps:
        t_batch = t.reshape(1).expand(B)  # (B,)
        pred = head(scheduler.scale_model_input(x, t), t_batch, cond, cond_mask).float()  # (B, Nt, Dt)
        x = scheduler.step(pred, int(t), x, generator=generator).prev_sample  # (B, Nt, Dt)
    return x
