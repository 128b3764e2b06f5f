"""lmms-eval's entry point for mmlatent: names the model `latent_vlm` without importing it.

lmms-eval reads every `lmms_eval.models` entry point when its model registry starts, for every command it
runs; this function only builds the `ModelManifest` (a class path), so mmlatent, torch and transformers are
imported when `--model latent_vlm` is actually asked for (`lmms_model.py`).
"""

from __future__ import annotations

from typing import Any


def manifest() -> Any:
    """The `ModelManifest` of `latent_vlm` (lmms-eval calls this when it loads the entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="latent_vlm", simple_class_path="mmlatent.evaluation.lmms_model.LatentVLMLmms")
