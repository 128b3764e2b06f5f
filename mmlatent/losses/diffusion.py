"""Diffusion reconstruction loss (CoCoVa): denoise the block's target features given its latents.

A pure function: it takes the denoiser as a callable and a `diffusers` scheduler, so it knows tensors,
not model classes. One timestep per sample is drawn uniformly, the scheduler noises the target
(`add_noise`), and the denoiser's output is regressed onto the noise (ε-prediction) or the velocity
(`get_velocity`, v-prediction), as the scheduler's config says. The target is detached (it is what the
latents must explain, not something to move); gradients reach the denoiser and, through the condition,
the latent vectors.

Trade-off: one Monte-Carlo timestep per sample per step keeps the cost at one denoiser forward, at the
price of a noisy loss; the mean over tokens and channels keeps its scale independent of the target size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
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

    denoiser(noisy (B, Nt, Dt), t (B,), cond, cond_mask) -> (B, Nt, Dt); scheduler: a diffusers scheduler
    with `add_noise` (and `get_velocity` for v-prediction); target (B, Nt, Dt) clean features; cond
    (B, Nc, Dc) latent vectors; cond_mask (B, Nc) True = valid. `generator` (CPU or target's device) makes
    the timesteps and noise reproducible.
    """
    x0 = target.detach().float()  # (B, Nt, Dt)
    B = x0.shape[0]
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"diffusion_loss: prediction_type={kind!r}; expected 'epsilon' or 'v_prediction'")
    gen_device = generator.device if generator is not None else x0.device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=generator, device=gen_device)
    t = t.to(x0.device)  # (B,)
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (B, Nt, Dt)
    noisy = scheduler.add_noise(x0, noise, t)  # (B, Nt, Dt)
    goal = scheduler.get_velocity(x0, noise, t) if kind == "v_prediction" else noise  # (B, Nt, Dt)
    pred = denoiser(noisy, t, cond, cond_mask)  # (B, Nt, Dt)
    return F.mse_loss(pred.float(), goal)
