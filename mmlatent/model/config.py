"""`ModelConfig`: everything needed to build a `LatentVLM`, as one typed tree.

Each part's config lives beside its component (vision tower, projector, LM, tokenizer); this file only
groups them so a YAML file or `--model.vlm.lm.random_init.hidden_size=256` on the command line reaches
any field. Named presets are in `presets.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmlatent.model.language_model import LanguageModelConfig
from mmlatent.model.latent_config import LatentConfig
from mmlatent.model.projector import ProjectorConfig
from mmlatent.model.tokenizer import TokenizerConfig
from mmlatent.model.vision_tower import VisionTowerConfig


@dataclass
class ModelConfig:
    """A composed VLM: vision tower -> projector -> causal LM, with its tokenizer."""

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

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A named preset (`tiny`, `tiny-open-clip`, ...); see `mmlatent.model.presets`."""
        from mmlatent.model.presets import preset

        return preset(name)
