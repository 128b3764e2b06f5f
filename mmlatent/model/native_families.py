"""The native backbone families by name: imports each family's adapter, so each registers itself.

`native_backbone.py` holds what every family shares and the registry; the adapters (`qwen2_5_vl.py`,
`llava.py`) import it. This module sits above both, so the base never imports its subclasses.
"""

from __future__ import annotations

from mmlatent.model import llava, qwen2_5_vl  # noqa: F401  (each registers its family)
from mmlatent.model.native_backbone import NATIVE_BACKBONES, NativeBackbone, NativeBackboneConfig


def native_backbone_class(kind: str) -> type[NativeBackbone]:
    """The registered family `kind` (a `ModelConfig.backbone` value)."""
    if kind not in NATIVE_BACKBONES:
        raise ValueError(f"backbone={kind!r}: expected one of {sorted(NATIVE_BACKBONES)} (or `composed`)")
    return NATIVE_BACKBONES[kind]


def build_native_backbone(kind: str, cfg: NativeBackboneConfig, tokenizer) -> NativeBackbone:
    """The native backbone of family `kind`, loaded or built at random."""
    return native_backbone_class(kind)(cfg, tokenizer)
