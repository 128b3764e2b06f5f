"""The composed backbone behind the one interface, with an open_clip tower and with a timm tower."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.presets import PRESETS, preset


@pytest.mark.parametrize("name", ["tiny", "tiny-open-clip"])
def test_forward_shapes_and_interface(name):
    torch.manual_seed(0)
    model = LatentVLM(preset(name)).eval()
    bb = model.backbone
    assert bb.tokens_per_image == 16  # 64 px, 16-px patches
    pixels = torch.stack([bb.image_transform()(Image.new("RGB", (100, 80), c)) for c in ("red", "blue")])
    assert pixels.shape == (2, 3, 64, 64)
    visual = bb.encode_images(pixels)
    assert visual.shape == (2, 16, bb.hidden_size)
    ids = torch.randint(0, 100, (2, 30))
    ids[0, 2:18] = model.ids.image
    ids[1, 5:21] = model.ids.image
    pos = torch.arange(30).expand(2, 30)
    out = model(ids, torch.ones_like(ids), pos, pixels, output_hidden_states=True)
    assert out.logits.shape == (2, 30, len(model.tokenizer))
    assert len(out.hidden_states) == bb.num_layers + 1
    assert all(h.shape == (2, 30, bb.hidden_size) for h in out.hidden_states)
    # the image embeddings really sit at the image-token positions
    embeds = model.embed_inputs(ids, pixels)
    torch.testing.assert_close(embeds[1, 5:21], visual[1])


def test_kv_cached_forward_equals_full_forward():
    torch.manual_seed(0)
    model = LatentVLM(preset("tiny")).eval()
    bb = model.backbone
    embeds = torch.randn(2, 20, bb.hidden_size)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 17:] = 0  # right padding
    pos = torch.arange(20).expand(2, 20)
    full = bb.forward_lm(embeds, mask, pos)
    cache = bb.new_cache()
    first = bb.forward_lm(embeds[:, :12], mask[:, :12], pos[:, :12], cache=cache)
    rest = bb.forward_lm(embeds[:, 12:], mask, pos[:, 12:], cache=first.cache)
    got = torch.cat([first.logits, rest.logits], dim=1)
    keep = mask.bool()
    assert (got - full.logits)[keep].abs().max() < 1e-5


def test_mismatched_images_are_a_clear_error():
    model = LatentVLM(preset("tiny"))
    ids = torch.full((1, 20), model.ids.image)
    with pytest.raises(ValueError, match="image tokens"):
        model.embed_inputs(ids, torch.zeros(2, 3, 64, 64))


def test_frozen_tower_default_and_trainable_tiny():
    assert preset("tiny").vision.freeze is False  # random tiny tower learns
    assert preset("siglip-qwen2.5-0.5b").vision.freeze is True  # pretrained towers stay frozen
    assert set(PRESETS) >= {"tiny", "tiny-open-clip", "siglip-qwen2.5-0.5b"}
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("tin")


def test_tiny_parameter_budget():
    n = LatentVLM(preset("tiny")).num_parameters()
    assert 1_000_000 < n < 5_000_000, n
