"""Grounding losses as pure functions: sketch (with its collapse guard) and contrastive (diffusion: test_diffusion_head.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mmlatent.losses.contrastive import info_nce
from mmlatent.losses.sketch import pool_tokens, sketch_loss


def test_pool_tokens_on_a_known_grid():
    x = torch.arange(16.0).view(1, 16, 1)  # 4x4 grid holding its own row-major index
    pooled = pool_tokens(x, (4, 4), 4)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_tokens(x, (4, 4), 1).item() == 7.5
    assert pool_tokens(x, (4, 4), 3).shape == (1, 3, 1)  # not a square: 1D pooling


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_sketch_loss_guard_and_gradients(kind):
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 16, generator=g, requires_grad=True)
    pred = torch.randn(2, 4, 16, generator=g, requires_grad=True)
    assert sketch_loss(target.detach(), target, kind) < 1e-6
    # collapse guard: shrinking the target (or the prediction) changes nothing
    base = sketch_loss(pred, target, kind)
    torch.testing.assert_close(sketch_loss(pred, 0.1 * target, kind), base, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(sketch_loss(0.1 * pred, target, kind), base, rtol=1e-3, atol=1e-3)
    base.backward()
    assert target.grad is None and pred.grad.abs().sum() > 0
    # the mask drops pairs
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    loss = sketch_loss(pred.detach(), target.detach(), kind, mask)
    torch.testing.assert_close(loss, sketch_loss(pred.detach()[:1, :2], target.detach()[:1, :2], kind))


def test_info_nce_matches_shuffles_and_temperature():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 32, generator=g)
    scale = torch.tensor(math.log(100.0), requires_grad=True)
    assert info_nce(a, a, scale) < 0.05
    shuffled = info_nce(a, a[torch.randperm(8, generator=g)], torch.tensor(0.0))
    assert abs(float(shuffled) - math.log(8)) < 0.3
    free = torch.tensor(math.log(10.0), requires_grad=True)  # below the clamp
    loss = info_nce(a, a + 0.5 * torch.randn(8, 32, generator=g), free)
    loss.backward()
    assert free.grad is not None and free.grad != 0
    huge = torch.tensor(50.0)  # exp(50) is clamped at 100
    assert torch.isfinite(info_nce(a, a[torch.randperm(8, generator=g)], huge))
    torch.testing.assert_close(info_nce(a, a.roll(1, 0), huge), info_nce(a, a.roll(1, 0), torch.tensor(math.log(100.0))))


def test_pool_tokens_1d_fallback_values_and_errors():
    x = torch.arange(16.0).view(1, 16, 1)
    # 3 is not a square: adaptive 1D pooling over bins [0, 6), [5, 11), [10, 16) of the flat sequence
    assert pool_tokens(x, (4, 4), 3).flatten().tolist() == [2.5, 7.5, 12.5]
    # 9 is a square but a 3x3 grid does not fit a 2x8 grid: 1D pooling again
    assert pool_tokens(torch.randn(2, 16, 5), (2, 8), 9).shape == (2, 9, 5)
    rect = torch.arange(8.0).view(1, 8, 1)  # 2x4 grid -> 1x1 is the mean
    assert pool_tokens(rect, (2, 4), 1).item() == 3.5
    with pytest.raises(ValueError, match="grid"):
        pool_tokens(x, (3, 4), 4)


def test_pool_tokens_keeps_channels_apart():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 36, 7, generator=g)
    pooled = pool_tokens(x, (6, 6), 4)  # (3, 4, 7)
    grid = x.view(3, 6, 6, 7)  # (B, h, w, D)
    torch.testing.assert_close(pooled[:, 1], grid[:, :3, 3:].mean(dim=(1, 2)))  # top-right quadrant
    torch.testing.assert_close(pool_tokens(x, (6, 6), 1)[:, 0], x.mean(1))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_sketch_loss_scale_invariance_masked_nan_and_empty_mask(kind):
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 3, 8, generator=g)
    pred = torch.randn(2, 3, 8, generator=g)
    assert float(sketch_loss(target, target, kind)) == pytest.approx(0.0, abs=1e-5)
    base = sketch_loss(pred, target, kind)
    assert base > 0.1
    torch.testing.assert_close(sketch_loss(pred, 25.0 * target, kind), base, rtol=1e-4, atol=1e-4)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    bad = pred.clone()
    bad[~mask] = float("nan")  # what sits in invalid slots must not leak
    torch.testing.assert_close(sketch_loss(bad, target, kind, mask), sketch_loss(pred, target, kind, mask))
    assert float(sketch_loss(pred, target, kind, torch.zeros(2, 3, dtype=torch.bool))) == 0.0


def test_sketch_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="kind"):
        sketch_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 3), "l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ"):
        sketch_loss(torch.randn(1, 2, 3), torch.randn(1, 3, 3))


def test_info_nce_limits_and_clamp():
    B = 8
    eye = torch.eye(B, 16)  # orthonormal rows: cosine 1 on the diagonal, 0 elsewhere
    big = torch.tensor(math.log(100.0))
    assert float(info_nce(eye, 3.0 * eye, big)) < 1e-6  # perfect pairs, large scale: ~0 (scale-free)
    # unrelated high-dimensional pairs at scale 1 carry no information: ~log(B)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(B, 4096, generator=g), torch.randn(B, 4096, generator=g)
    assert float(info_nce(a, b, torch.tensor(0.0))) == pytest.approx(math.log(B), abs=0.05)
    # a derangement at large scale is confidently wrong: far above log(B)
    assert float(info_nce(eye, eye.roll(1, 0), big)) > 50
    # the clamp: any log-scale above log(max_scale) acts as log(max_scale) and gets no gradient
    above = torch.tensor(math.log(1e6), requires_grad=True)
    loss = info_nce(a, b, above)
    torch.testing.assert_close(loss, info_nce(a, b, big))
    loss.backward()
    assert above.grad == 0
    torch.testing.assert_close(info_nce(a, b, torch.tensor(5.0), max_scale=10.0), info_nce(a, b, torch.tensor(math.log(10.0))))


def test_info_nce_is_symmetric_and_gradients_flow():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 10, generator=g, requires_grad=True)
    b = torch.randn(6, 10, generator=g, requires_grad=True)
    s = torch.tensor(math.log(5.0), requires_grad=True)
    loss = info_nce(a, b, s)
    torch.testing.assert_close(loss, info_nce(b, a, s))
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0 and s.grad != 0
    with pytest.raises(ValueError):
        info_nce(torch.randn(4, 3), torch.randn(5, 3), s)


def test_selection_loss_is_the_mass_in_the_region():
    from mmlatent.losses.selection import selection_loss

    # two blocks of two thoughts over 4 visual tokens; the second thought of block 1 is padding
    relevance = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]],
                              [[0.0, 0.0, 0.2, 0.8], [9.0, 9.0, 9.0, 9.0]]], requires_grad=True)
    valid = torch.tensor([[True, True], [True, False]])
    region = torch.tensor([[True, False, False, False], [False, False, False, True]])
    loss = selection_loss(relevance, valid, region)
    expected = -(math.log(0.6) + math.log(0.8)) / 2  # block means: 0.6 and 0.8 of the mass inside
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert relevance.grad[1, 1].abs().sum() == 0  # padding gets no gradient
    # a block without a region is left out; none at all gives a zero that still backpropagates
    assert selection_loss(relevance, valid, torch.tensor([[True, False, False, False], [False] * 4])).item() == pytest.approx(-math.log(0.6), abs=1e-6)
    assert selection_loss(relevance, valid, torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0
