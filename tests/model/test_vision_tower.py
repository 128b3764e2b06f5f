"""Vision tower: patch-token shapes, library preprocessing, freezing, local weights files, clear errors.

Tiny random towers at 64 px with 16-px patches (a 4x4 grid); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses

import open_clip
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from mmlatent.model.vision_tower import VisionTower, VisionTowerConfig

TIMM_TINY = VisionTowerConfig(library="timm", name="vit_tiny_patch16_224", image_size=64, depth=2, width=96, heads=3)
OPEN_CLIP_TINY = VisionTowerConfig(library="open_clip", name="mmlatent-vit-tiny-16", image_size=64)
TINY = {"timm": TIMM_TINY, "open_clip": OPEN_CLIP_TINY}


def tower(library: str, **changes) -> VisionTower:
    torch.manual_seed(0)
    return VisionTower(dataclasses.replace(TINY[library], **changes))


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # (N, 3, H, W)


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_patch_tokens_shape(library):
    t = tower(library)
    assert t.grid_size == (4, 4) and t.num_tokens == 16 and t.hidden_size == 96 and t.image_size == (64, 64)
    assert t(images()).shape == (2, 16, 96)  # CLS dropped


def test_open_clip_tokens_are_its_own_pre_projection_tokens():
    """Same weights through open_clip's `output_tokens` path: ln_post'd tokens without CLS, before `proj`."""
    torch.manual_seed(0)
    clip = open_clip.create_model("mmlatent-vit-tiny-16").eval()
    visual = clip.visual
    visual.output_tokens = True
    x = images()
    _, expected = visual(x)  # (N, 16, width)
    t = VisionTower(OPEN_CLIP_TINY)
    t.model.load_state_dict(visual.state_dict(), strict=False)  # the tower dropped `proj`
    # forward_intermediates and forward run the blocks through different kernels: equal up to rounding.
    torch.testing.assert_close(t(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_image_transform_is_the_librarys(library):
    t = tower(library)
    pil = Image.new("RGB", (100, 80), (200, 30, 90))
    for train in (False, True):
        assert t.image_transform(train=train)(pil).shape == (3, 64, 64)
    normalize = t.image_transform().transforms[-1]
    if library == "timm":
        expected_mean = t.model.pretrained_cfg["mean"]  # vit_tiny's (0.5, 0.5, 0.5)
    else:
        expected_mean = open_clip.OPENAI_DATASET_MEAN
    assert tuple(float(m) for m in normalize.mean) == pytest.approx(tuple(expected_mean))


def test_timm_crop_pct_keeps_the_whole_image():
    pil = Image.new("RGB", (64, 64), (0, 0, 0))
    pil.paste((255, 255, 255), (0, 0, 4, 4))  # a white corner that timm's default 0.9 crop cuts off
    cut = tower("timm").image_transform()(pil)
    whole = tower("timm", crop_pct=1.0).image_transform()(pil)
    assert cut[:, 0, 0].max() < 0.9  # the corner pixel is no longer white after resize + crop
    torch.testing.assert_close(whole[:, :4, :4], torch.ones(3, 4, 4))  # (1 - 0.5) / 0.5


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_frozen_tower(library):
    t = tower(library, freeze=True)
    assert not any(p.requires_grad for p in t.parameters())
    t.train()
    assert t.training and not t.model.training and not any(m.training for m in t.model.modules())
    out = t(images())
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_unfrozen_tower_trains(library):
    t = tower(library, freeze=False).train()
    assert t.model.training and all(p.requires_grad for p in t.parameters())
    x = images()
    before = t(x).detach()
    t(x).pow(2).mean().backward()
    # Every parameter gets a gradient: nothing unused is left for DDP to complain about.
    assert all(p.grad is not None for p in t.parameters())
    torch.optim.SGD(t.parameters(), lr=0.1).step()
    assert not torch.allclose(t(x), before)


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_local_weights_file_round_trip(library, tmp_path):
    src = tower(library).eval()
    path = tmp_path / "tower.safetensors"
    save_file(src.model.state_dict(), str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = VisionTower(dataclasses.replace(TINY[library], pretrained=str(path))).eval()
    x = images()
    torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)


def test_timm_classification_checkpoint_loads_at_another_size(tmp_path):
    """A timm file with its classifier head, saved at 224 px, loads into the 64-px tower (pos-embed resampled)."""
    torch.manual_seed(0)
    full = timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=96, num_heads=3).eval()
    path = tmp_path / "model.safetensors"
    save_file(full.state_dict(), str(path))
    at_224 = VisionTower(dataclasses.replace(TIMM_TINY, image_size=None, pretrained=str(path)))
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(at_224(x), full.forward_features(x)[:, 1:], rtol=0, atol=0)
    at_64 = VisionTower(dataclasses.replace(TIMM_TINY, pretrained=str(path)))
    assert at_64(images()).shape == (2, 16, 96)


def test_open_clip_full_checkpoint_goes_through_create_model(tmp_path):
    """A whole open_clip checkpoint (`visual.*` and text keys), as a .bin read with weights_only=True."""
    torch.manual_seed(0)
    clip = open_clip.create_model("mmlatent-vit-tiny-16").eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), path)
    torch.manual_seed(123)
    t = VisionTower(dataclasses.replace(OPEN_CLIP_TINY, pretrained=str(path)))
    clip.visual.output_tokens = True
    x = images()
    torch.testing.assert_close(t(x), clip.visual(x)[1], rtol=1e-5, atol=1e-5)  # kernels differ, see above


def test_open_clip_overrides_build_a_smaller_tower():
    t = tower("open_clip", image_size=32, depth=1, width=64, heads=2, patch_size=8)
    assert t.grid_size == (4, 4) and t.hidden_size == 64
    assert len(t.model.transformer.resblocks) == 1 and t.model.transformer.resblocks[0].attn.num_heads == 2
    assert t(torch.randn(1, 3, 32, 32)).shape == (1, 16, 64)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(library="keras"), "vision.library"),
        (dict(name="not_a_timm_model"), "vision.name"),
        (dict(pretrained="/no/such/weights.safetensors"), "vision.pretrained"),
        (dict(pretrained="laion2b_s34b_b79k"), "vision.pretrained"),  # timm takes a file or "hub"
        (dict(image_size=0), "vision.image_size"),
        (dict(crop_pct=1.5), "vision.crop_pct"),
    ],
)
def test_timm_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        VisionTower(dataclasses.replace(TIMM_TINY, **changes))


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(name="ViT-Nope-99"), "vision.name"),
        (dict(pretrained="not_a_tag"), "vision.pretrained"),
        (dict(pretrained="missing.pth"), "vision.pretrained"),
        (dict(name="ViT-B-16-SigLIP", depth=1), "vision.name"),  # a timm-backed config: no ViT overrides
        (dict(crop_pct=1.0), "vision.crop_pct"),
        (dict(heads=5), "vision.heads"),  # 96 does not split into 5 heads
    ],
)
def test_open_clip_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        VisionTower(dataclasses.replace(OPEN_CLIP_TINY, **changes))


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_wrong_weights_file_is_an_error_not_a_random_tower(library, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"something.else": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="vision.pretrained"):
        VisionTower(dataclasses.replace(TINY[library], pretrained=str(path)))


def test_unreadable_weights_file_names_the_field(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"not a safetensors file")
    for cfg in (TIMM_TINY, OPEN_CLIP_TINY):
        with pytest.raises(ValueError, match="vision.pretrained"):
            VisionTower(dataclasses.replace(cfg, pretrained=str(path)))


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_sincos_pos_embed_sets_row_and_column_codes_on_the_patches(library):
    """`sincos_pos_embed`: the patch positions get fixed 2D sin-cos codes × scale (first half of the channels
    the row, second half the column), the prefix (CLS) embedding is kept, and the tower's tokens change."""
    from mmlatent.model.vision_tower import sincos_2d

    plain, coded = tower(library), tower(library, sincos_pos_embed=3.0)
    get = (lambda t: t.model.pos_embed[0]) if library == "timm" else (lambda t: t.model.positional_embedding)
    table, before = get(coded), get(plain)
    assert torch.equal(table[0], before[0])  # CLS untouched
    codes = sincos_2d((4, 4), table.shape[1])  # (16, D)
    assert torch.allclose(table[1:], 3.0 * codes)
    half = table.shape[1] // 2
    rows, cols = codes[:, :half].view(4, 4, half), codes[:, half:].view(4, 4, -1)
    assert torch.equal(rows[:, 0], rows[:, 3]) and not torch.equal(rows[0], rows[1])  # rows vary down only
    assert torch.equal(cols[0], cols[3]) and not torch.equal(cols[:, 0], cols[:, 1])  # columns across only
    assert not torch.allclose(plain(images()), coded(images()))
