"""Diffusion reconstruction loss (CoCoVa): denoise the block's target features given its latents.

A pure function: it takes the denoiser as a callable and a `diffusers` scheduler, so it knows tensors,
not model classes. The target is detached (it is what the latents must explain, not something to move);
gradients reach the denoiser and, through the condition, the latent vectors.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def diffusion_loss(
    denoiser: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor],
    scheduler,
    target: Tensor,
    cond: Tensor,
    cond_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """MSE between the denoiser's prediction and the noise (or velocity) added at a random timestep.

    target (B, Nt, Dt) clean features; cond (B, Nc, Dc) latent vectors; cond_mask (B, Nc) True = valid.
    """
    x0 = target.detach()
    B = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    noisy = scheduler.add_noise(x0, noise, t)  # (B, Nt, Dt)
    if scheduler.config.prediction_type == "v_prediction":
        goal = scheduler.get_velocity(x0, noise, t)
    else:
        goal = noise
    pred = denoiser(noisy, t, cond, cond_mask)
    return F.mse_loss(pred.float(), goal.float())
