"""Optimiser and learning-rate schedule: the one place both are defined.

AdamW with decoupled weight decay on the weight matrices of linear and convolution layers only (none on
biases, norm gains, token embeddings, a tied output head, position embeddings, class tokens or learnable
queries: decaying those pulls lookup tables and positions toward zero), linear warm-up then
cosine (or constant) decay to `min_lr_ratio × lr`, stepped per optimiser step. Per-module learning-rate
groups come from `lr_scale`: a parameter whose name starts with a listed prefix gets that multiple of
`lr` (a scale of 0 freezes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn


@dataclass
class ModuleLR:
    """A learning-rate multiple for every parameter under one module prefix."""

    prefix: str
    """Parameter-name prefix, e.g. `backbone.vision` or `backbone.projector`."""
    scale: float
    """Multiple of the base `lr`; 0 freezes the module."""


@dataclass
class OptimConfig:
    """AdamW and its schedule."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay on linear and convolution weights (see `decayed_parameters`)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas."""
    warmup_steps: int = 20
    """Linear warm-up length in optimiser steps."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Decay after warm-up. Cosine decays over the trainer's estimated total steps."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay as a fraction of `lr`."""
    lr_scale: list[ModuleLR] = field(default_factory=list)
    """Per-module learning-rate multiples (first matching prefix wins)."""


def decayed_parameters(model: nn.Module) -> set[int]:
    """`id`s of the parameters that get weight decay: `weight` of `nn.Linear` and convolution layers, unless
    the same tensor is also an `nn.Embedding`'s (an output head tied to the input embeddings)."""
    decay, embeddings = set(), set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.Embedding):
                embeddings.add(id(p))
            elif name == "weight" and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                decay.add(id(p))
    return decay - embeddings


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Group trainable parameters by (lr scale, decay or not)."""
    decayed = decayed_parameters(model)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((m.scale for m in cfg.lr_scale if name.startswith(m.prefix)), 1.0)
        if scale == 0.0:
            p.requires_grad_(False)
            continue
        decay = id(p) in decayed
        groups.setdefault((scale, decay), []).append(p)
    return [
        {"params": ps, "lr": cfg.lr * scale, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
        for (scale, decay), ps in groups.items()
    ]


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of each group's peak lr at optimiser step `step`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("no trainable parameters: check `optim.lr_scale` and the freeze settings")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
    return opt, sched
