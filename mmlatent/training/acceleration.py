"""Speed and memory switches of a training run: gradient checkpointing, torch.compile, DDP's defaults.

Mixed precision and the parallel strategy are the Trainer's (`precision: bf16-mixed`, `strategy: ddp` or
`fsdp2`, mmlatent's FSDP2 in `fsdp.py`); what belongs to the model is here, applied by the Lightning module's `configure_model` hook
(before DDP/FSDP wrap the model, and never when a checkpoint is merely loaded for evaluation or export).

- *Gradient checkpointing* recomputes each LM decoder layer in the backward pass instead of storing its
  activations (about one extra forward of compute for most of the activation memory). transformers turns
  the KV cache off inside checkpointed layers, and the latent stages' training forward runs the latent
  loop on a KV cache: a native backbone recomputes its layers against a `ReplayCache` and supports every
  stage; the composed backbone supports the stages that train without a cache (stage 1, direct) and
  refuses the latent stages with a clear error rather than train on a silently broken loop.
- *torch.compile* compiles each decoder layer in place (`nn.Module.compile`): the parameter names, hence
  checkpoints, do not change, and the latent loop's Python control flow (per-slot forwards, masks) stays
  eager around compiled layers. The first steps pay the compilation; sequence lengths vary, so shapes are
  compiled as dynamic after the first recompile.
- *Sharding* is FSDP2 (`fsdp.py`), which runs on CPUs and GPUs alike; Lightning's FSDP1 `FSDPStrategy` refuses
  a CPU accelerator and is not used.
- *DDP*: a stage never reaches some modules (stage 1 never runs the LQ-Former; a batch without latent
  blocks skips it in stages 2 and 3), so `prepare_ddp` turns on DDP's `find_unused_parameters` unless
  the strategy sets it; pass `ddp_find_unused_parameters_false` to trade that safety for the graph walk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from torch import nn

log = logging.getLogger(__name__)


@dataclass
class AccelerationConfig:
    """Model-side speed and memory switches (precision and strategy are Trainer settings)."""

    gradient_checkpointing: bool = False
    """Recompute each LM decoder layer in the backward pass instead of keeping its activations. Composed
    backbones: stage 1 and direct only (the latent stages' KV-cached loop needs a native backbone)."""
    compile: bool = False
    """Compile each LM decoder layer with `torch.compile`, in place (checkpoint keys unchanged)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """`torch.compile` mode of the compiled layers."""


def decoder_layers(model) -> list[nn.Module]:
    """The LM's decoder layers of a `LatentVLM` (composed or native backbone)."""
    decoder = model.backbone.transformers_model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__} has no `layers`: cannot find the decoder layers to compile")
    return list(layers)


def apply_acceleration(model, cfg: AccelerationConfig, trains_with_kv_cache: bool) -> None:
    """Switch on what `cfg` asks for, in place, on a `LatentVLM` (`trains_with_kv_cache`: the stage's
    training forward runs the latent loop on a KV cache)."""
    backbone = model.backbone
    if cfg.gradient_checkpointing:
        if hasattr(backbone, "enable_checkpointing"):
            backbone.enable_checkpointing()  # the native backbone's cache-safe checkpointing
        elif trains_with_kv_cache:
            raise ValueError(
                "model.acceleration.gradient_checkpointing: the composed backbone's checkpointed layers drop the KV "
                "cache the latent stages train with (transformers disables caching there); use it for stage1/direct, "
                "or train the latent stages with a native backbone"
            )
        else:
            backbone.transformers_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        for layer in decoder_layers(model):
            layer.compile(mode=cfg.compile_mode)
        log.info("compiled %d decoder layers (mode=%s)", len(decoder_layers(model)), cfg.compile_mode)


def prepare_ddp(strategy) -> None:
    """Default DDP to `find_unused_parameters=True` when the strategy does not say (see the module docstring)."""
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(strategy, DDPStrategy):
        kwargs = getattr(strategy, "_ddp_kwargs", None)
        if isinstance(kwargs, dict) and "find_unused_parameters" not in kwargs:
            kwargs["find_unused_parameters"] = True
