"""mmlatent: train vision-language models to reason in latent space.

`mmlatent.LatentVLM.from_pretrained(dir_or_hub_id)` loads an exported model; the rest lives in the
subpackages (`model`, `data`, `losses`, `training`, `hub`). Attributes are imported lazily so that
`import mmlatent` (and the CLI's help) stays fast.
"""

from __future__ import annotations

__all__ = ["LatentVLM"]


def __getattr__(name: str):
    if name == "LatentVLM":
        from mmlatent.model.latent_vlm import LatentVLM

        return LatentVLM
    raise AttributeError(f"module 'mmlatent' has no attribute {name!r}")
