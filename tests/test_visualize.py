"""The latent-block picture: question image, per-thought selection heatmaps, target and reconstruction."""

from __future__ import annotations


import pytest
from PIL import Image

from mmlatent.data.pipeline import ShardStream
from mmlatent.data.processor import Processor
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.presets import preset
from mmlatent.training.stages import StageConfig, build_stage
from mmlatent.visualize import visualize_sample


def first_batch(model, synth_dir, stage: str):
    layout = build_stage(StageConfig(name=stage, align_weight=0.0)).layout(model.cfg.latent.slots)
    proc = Processor.for_model(model, layout)
    urls = sorted(str(p) for p in (synth_dir / "val").glob("*.tar"))
    return next(iter(ShardStream(urls, proc, proc.collate, 2,
                                 shuffle_buffer=0, loop=False)))


def test_visualisation_png_has_every_panel(synth_dir, tmp_path):
    cfg = preset("tiny")
    cfg.latent.mode, cfg.latent.diffusion_head = "thought", True
    cfg.latent.diffusion.sample_steps = 3
    model = LatentVLM(cfg).eval()
    path = visualize_sample(model, first_batch(model, synth_dir, "stage3"), tmp_path / "block.png", row=1)
    img = Image.open(path)
    # question image + 4 thought heatmaps + aux target + target PCA + reconstruction PCA = 8 panels side by side
    assert img.width > 6 * img.height / 1.5 and img.height > 200


def test_visualisation_needs_a_latent_block(synth_dir, tmp_path, tiny_model):
    with pytest.raises(ValueError, match="no latent block"):
        visualize_sample(tiny_model, first_batch(tiny_model, synth_dir, "stage1"), tmp_path / "x.png")
