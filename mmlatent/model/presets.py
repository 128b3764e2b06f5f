"""Registry of named model presets, as timm's `create_model` names and litgpt's `Config.from_name`.

A preset is a function returning a fresh `ModelConfig`; it is looked up by exact name, never by matching
substrings. `tiny` is what tests and benchmarks use: about 1.2M parameters, 64-pixel images cut into 16
patches of 16 pixels (one patch per cell of the synthetic grid), a 4-layer 128-wide Qwen2-shaped LM, sketch
mode and the synthetic byte-level BPE tokenizer. `tiny-demo` is the demo's and the tiny recipes' model:
`tiny` at 48 px in thought mode (about 1.4M parameters). Its vision tower trains (`freeze=False`) because a random
tower has nothing to preserve; real presets keep the pretrained tower frozen.

`tiny-qwen2.5-vl` and `tiny-llava` are native transformers VLMs of the same scale (a 2-layer 128-wide LM,
a 2-block 64-wide vision tower, 16 visual tokens per 64-px image, the synthetic tokenizer), built at random
from `RandomNativeConfig`; `qwen2.5-vl-3b` and `llava-1.5-7b` load the released models from the Hub.
"""

from __future__ import annotations

from typing import Callable

from mmlatent.model.config import ModelConfig
from mmlatent.model.language_model import LanguageModelConfig, RandomLMConfig
from mmlatent.model.native_backbone import NativeBackboneConfig, RandomNativeConfig
from mmlatent.model.projector import ProjectorConfig
from mmlatent.model.tokenizer import TokenizerConfig
from mmlatent.model.vision_tower import VisionTowerConfig

PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register(name: str) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    def add(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        if name in PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        PRESETS[name] = fn
        return fn

    return add


def preset(name: str) -> ModelConfig:
    """A fresh `ModelConfig` for preset `name`."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    cfg.preset = name
    return cfg


def _tiny_lm() -> LanguageModelConfig:
    return LanguageModelConfig(random_init=RandomLMConfig(hidden_size=128, num_hidden_layers=4, intermediate_size=384))


@register("tiny")
def tiny() -> ModelConfig:
    return ModelConfig(
        vision=VisionTowerConfig(
            library="timm", name="vit_tiny_patch16_224", image_size=64, depth=2, width=96, heads=3,
            crop_pct=1.0, freeze=False,
        ),
        projector=ProjectorConfig(kind="mlp", pixel_shuffle=1),
        lm=_tiny_lm(),
        tokenizer=TokenizerConfig(),
    )


@register("tiny-demo")
def tiny_demo() -> ModelConfig:
    """The demo's model: `tiny` at 48 px (a 3x3 grid of 16-px cells, one ViT patch per cell, each token
    feature standardised over the batch) thinking in LQ-Former thoughts built on the most relevant of the 9 visual tokens (the
    LQ-Former reads the top 4), ending its blocks itself; about 1.4 M parameters."""
    cfg = tiny()
    cfg.vision.image_size = 48
    cfg.latent.mode = "thought"
    cfg.latent.slots = 4
    cfg.latent.lq_former.num_queries = 4
    cfg.latent.lq_former.layers = 1
    cfg.latent.lq_former.selection.top_k = 4
    cfg.latent.lq_former.selection.centre_keys = True  # keys read what tells cells apart (README's tried table)
    cfg.latent.lq_former.base = "selected"  # a thought hands the LM the cell it selected (see lq_former.py)
    cfg.vision.sincos_pos_embed = 3.0  # cells told apart by place from the start
    cfg.projector.centre = "batch"  # the LM reads what tells cells apart (see projector.py)
    cfg.lm.attn_implementation = "eager"  # the attention grounding of the text-only baselines reads the LM's attention
    return cfg


@register("tiny-open-clip")
def tiny_open_clip() -> ModelConfig:
    cfg = tiny()
    cfg.vision = VisionTowerConfig(library="open_clip", name="mmlatent-vit-tiny-16", image_size=64, freeze=False)
    return cfg


@register("siglip-qwen2.5-0.5b")
def siglip_qwen2_5_0_5b() -> ModelConfig:
    """A real composed VLM: SigLIP ViT-B/16 (open_clip, WebLI weights, frozen) + Qwen2.5-0.5B-Instruct."""
    return ModelConfig(
        vision=VisionTowerConfig(library="open_clip", name="ViT-B-16-SigLIP", pretrained="webli", freeze=True),
        projector=ProjectorConfig(kind="mlp", pixel_shuffle=2),
        lm=LanguageModelConfig(name_or_path="Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16"),
        tokenizer=TokenizerConfig(name_or_path="Qwen/Qwen2.5-0.5B-Instruct"),
    )


def _tiny_native(backbone: str, patch_size: int) -> ModelConfig:
    """A random native VLM of the tiny scale; the vision tower trains (random: nothing to preserve)."""
    return ModelConfig(
        backbone=backbone,
        native=NativeBackboneConfig(random_init=RandomNativeConfig(patch_size=patch_size, image_size=64), freeze_vision=False),
        tokenizer=TokenizerConfig(),
    )


@register("tiny-qwen2.5-vl")
def tiny_qwen2_5_vl() -> ModelConfig:
    """Qwen2.5-VL-shaped: 8-px patches merged 2×2, so a 64-px image gives 4×4 tokens with 3D rotary positions."""
    return _tiny_native("qwen2_5_vl", patch_size=8)


@register("tiny-llava")
def tiny_llava() -> ModelConfig:
    """LLaVA-shaped: a CLIP tower with 16-px patches (4×4 tokens per 64-px image), MLP projector, Llama LM."""
    return _tiny_native("llava", patch_size=16)


@register("qwen2.5-vl-3b")
def qwen2_5_vl_3b() -> ModelConfig:
    """Qwen2.5-VL-3B-Instruct, images at 448 px (256 tokens), vision tower frozen, merger and LM trained."""
    source = "Qwen/Qwen2.5-VL-3B-Instruct"
    return ModelConfig(
        backbone="qwen2_5_vl",
        native=NativeBackboneConfig(name_or_path=source, image_size=448, dtype="bfloat16"),
        tokenizer=TokenizerConfig(name_or_path=source),
    )


@register("llava-1.5-7b")
def llava_1_5_7b() -> ModelConfig:
    """LLaVA-1.5-7B (the `llava-hf` conversion): CLIP ViT-L/14 at 336 px (576 tokens), frozen tower."""
    source = "llava-hf/llava-1.5-7b-hf"
    return ModelConfig(
        backbone="llava",
        native=NativeBackboneConfig(name_or_path=source, dtype="bfloat16"),
        tokenizer=TokenizerConfig(name_or_path=source),
    )
