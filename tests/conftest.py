"""Shared fixtures: a private cache folder, small synthetic shard sets, the tiny model.

Everything is built under pytest's tmp folders; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Build the synthetic tokenizer into a session folder, not the user's ~/.cache."""
    os.environ["MMLATENT_CACHE"] = str(tmp_path_factory.mktemp("mmlatent-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """64 training and 32 held-out synthetic samples, 16 per shard (4 + 2 shards)."""
    from mmlatent.data.synthetic import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, SynthConfig(), train=64, val=32, seed=0, samples_per_shard=16, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny preset, built once per session (tests must not train it in place)."""
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    return LatentVLM(preset("tiny")).eval()
