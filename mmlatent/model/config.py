"""`ModelConfig`: everything needed to build a `LatentVLM`, as one typed tree.

Each part's config lives beside its component (vision tower, projector, LM, native VLM, tokenizer, LoRA);
this file only groups them so a YAML file or `--model.vlm.lm.random_init.hidden_size=256` on the command
line reaches any field. `backbone` picks the composed VLM (`vision`, `projector`, `lm`) or a native
transformers VLM (`native`); the fields of the other kind are then unused. Named presets are in `presets.py`;
a config names one with `preset` and overrides fields on top (the CLI does the merge, `mmlatent.cli`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmlatent.model.language_model import LanguageModelConfig
from mmlatent.model.latent_config import LatentConfig
from mmlatent.model.lora import LoraConfig
from mmlatent.model.native_backbone import NativeBackboneConfig
from mmlatent.model.projector import ProjectorConfig
from mmlatent.model.tokenizer import TokenizerConfig
from mmlatent.model.vision_tower import VisionTowerConfig


@dataclass
class ModelConfig:
    """A VLM (composed: vision tower -> projector -> causal LM; or native), its tokenizer and latent modules."""

    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    """The image encoder (open_clip or timm)."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """Maps vision features to LM-space tokens."""
    lm: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    """The causal language model."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer; mmlatent's special tokens are added to it."""
    latent: LatentConfig = field(default_factory=LatentConfig)
    """How the model reasons in latent blocks (sketch or LQ-Former thoughts; sequential or Jacobi)."""
    backbone: Literal["composed", "qwen2_5_vl", "llava"] = "composed"
    """`composed`: `vision` -> `projector` -> `lm`. `qwen2_5_vl` (Qwen2.5-VL) or `llava` (LlavaForConditionalGeneration):
    a native transformers VLM described by `native`; set `tokenizer.name_or_path` to the same model."""
    native: NativeBackboneConfig = field(default_factory=NativeBackboneConfig)
    """The native VLM (used when `backbone` is not `composed`)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters on the language model (peft), for either backbone kind."""
    system_prompt: str | None = None
    """The system turn of this model's chats: training renders it into every sample without a system turn of
    its own, and generation and evaluation start every prompt with it (a sample's own system turn wins), so
    the model is asked its questions as it was trained. None: only a sample's own system turn. Set it to what
    the training data carry (Monet-SFT conversions: "You are a helpful assistant.")."""
    preset: str | None = None
    """The named preset this config starts from (`tiny`, `tiny-demo`, `siglip-qwen2.5-0.5b`, ...; see
    `mmlatent.model.presets`). In a `mmlatent fit|validate|test|predict` config, `model.vlm.preset: NAME` takes
    the preset's fields as the base and every other `model.vlm` field given overrides them."""

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A named preset (`tiny`, `tiny-open-clip`, ...); see `mmlatent.model.presets`."""
        from mmlatent.model.presets import preset

        return preset(name)
