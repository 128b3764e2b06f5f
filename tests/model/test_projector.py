"""Projector: shapes, pixel-shuffle ordering on a known input, clear config errors."""

from __future__ import annotations

import pytest
import torch

from mmlatent.model.projector import Projector, ProjectorConfig, pixel_shuffle


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("s, tokens", [(1, 16), (2, 4), (4, 1)])
def test_shapes(kind, s, tokens):
    p = Projector(ProjectorConfig(kind=kind, pixel_shuffle=s), vision_dim=96, lm_dim=128, grid_size=(4, 4))
    assert p.num_tokens == tokens
    assert p(torch.randn(3, 16, 96)).shape == (3, tokens, 128)


def test_mlp_is_linear_gelu_linear_with_hidden_mult():
    cfg = ProjectorConfig(kind="mlp", pixel_shuffle=2, hidden_mult=2.0)
    p = Projector(cfg, vision_dim=8, lm_dim=16, grid_size=(4, 4))
    first, act, last = p.net
    assert (first.in_features, first.out_features) == (32, 32) and isinstance(act, torch.nn.GELU)
    assert (last.in_features, last.out_features) == (32, 16)


def test_pixel_shuffle_order_square_grid():
    x = torch.arange(16.0).reshape(1, 16, 1)  # (N, T, D): each patch's feature is its row-major index
    out = pixel_shuffle(x, (4, 4), 2)  # (1, 4, 4)
    expected = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]], dtype=torch.float)
    torch.testing.assert_close(out[0], expected)


def test_pixel_shuffle_order_wide_grid_and_feature_layout():
    # 2x4 grid, D=2: patch t has features (t, 100 + t).
    t = torch.arange(8.0)
    x = torch.stack([t, 100 + t], dim=-1).unsqueeze(0)  # (1, 8, 2)
    out = pixel_shuffle(x, (2, 4), 2)  # (1, 2, 8)
    expected = torch.tensor(
        [[0, 100, 1, 101, 4, 104, 5, 105], [2, 102, 3, 103, 6, 106, 7, 107]], dtype=torch.float
    )  # patches (0,0) (0,1) (1,0) (1,1) of each 2x2 block, each patch's features kept together
    torch.testing.assert_close(out[0], expected)


def test_linear_projector_applies_to_shuffled_tokens():
    p = Projector(ProjectorConfig(kind="linear", pixel_shuffle=2), vision_dim=3, lm_dim=5, grid_size=(4, 4))
    x = torch.randn(2, 16, 3)
    torch.testing.assert_close(p(x), p.net(pixel_shuffle(x, (4, 4), 2)))


def test_grid_not_divisible_names_pixel_shuffle():
    with pytest.raises(ValueError, match="pixel_shuffle"):
        Projector(ProjectorConfig(pixel_shuffle=3), vision_dim=8, lm_dim=8, grid_size=(4, 4))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(pixel_shuffle=0), "projector.pixel_shuffle"),
        (dict(kind="conv"), "projector.kind"),
        (dict(hidden_mult=0.0), "projector.hidden_mult"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ProjectorConfig(**kwargs)


def test_wrong_token_count_is_an_error():
    p = Projector(ProjectorConfig(pixel_shuffle=2), vision_dim=4, lm_dim=4, grid_size=(4, 4))
    with pytest.raises(ValueError, match="4x4"):
        p(torch.randn(1, 15, 4))


def test_centred_tokens_have_zero_mean_and_unit_rms_per_image():
    p = Projector(ProjectorConfig(centre="image"), vision_dim=8, lm_dim=16, grid_size=(2, 2))
    x = torch.randn(3, 4, 8) + 5.0  # a large part shared by every token
    out = p(x)  # (3, 4, 16)
    assert out.mean(1).abs().max() < 1e-5
    assert torch.allclose(out.pow(2).mean((1, 2)), torch.ones(3), atol=1e-4)
    plain = Projector(ProjectorConfig(), vision_dim=8, lm_dim=16, grid_size=(2, 2))
    plain.load_state_dict(p.state_dict())
    ref = plain(x)
    assert torch.allclose(out, (ref - ref.mean(1, keepdim=True)) / ref.sub(ref.mean(1, keepdim=True)).pow(2).mean((1, 2), keepdim=True).sqrt(), atol=1e-4)


def test_batch_centred_tokens_are_standardised_per_feature_and_keep_image_averages():
    p = Projector(ProjectorConfig(centre="batch"), vision_dim=8, lm_dim=16, grid_size=(2, 2))
    x = torch.randn(6, 4, 8) + 5.0  # a large part shared by every token
    out = p.train()(x)  # (6, 4, 16): batch statistics
    flat = out.flatten(0, 1)
    assert flat.mean(0).abs().max() < 1e-5 and bool((flat.var(0, unbiased=False) > 0.5).all())  # batch norm's eps aside, 1
    assert out.mean(1).abs().max() > 0.05  # unlike `image`, an image's average token is kept
    p.eval()
    evaluated = p(x[:1])  # one image in evaluation: the running estimates, not its own statistics
    assert not torch.allclose(evaluated, out[:1], atol=1e-3)
    with pytest.raises(ValueError, match="projector.centre"):
        ProjectorConfig(centre="tokens")
