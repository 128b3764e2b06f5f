"""The KV-cached latent loop: parity with full recompute, gradients through the chain, Jacobi mode."""

from __future__ import annotations


import pytest
import torch

from mmlatent.losses.cross_entropy import weighted_cross_entropy
from mmlatent.model.latent_loop import latent_forward
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.presets import preset
from tests.conftest import assert_cached_loop_matches_recompute, latent_block, right_pad


def tiny(mode="sketch", **latent) -> LatentVLM:
    cfg = preset("tiny")
    cfg.latent.mode = mode
    for k, v in latent.items():
        setattr(cfg.latent, k, v)
    torch.manual_seed(0)
    return LatentVLM(cfg).eval()


def make_batch(model):
    """Three right-padded rows: blocks at different positions and of different lengths, one row without."""
    g = torch.Generator().manual_seed(0)
    T = model.tokens_per_image
    img = [model.ids.image] * T

    def text(n):
        return torch.randint(10, 300, (n,), generator=g).tolist()

    rows = [
        text(3) + img + text(5) + latent_block(model, 3) + text(9),
        text(2) + img + text(11) + latent_block(model, 2) + text(4) + latent_block(model, 4) + text(3),
        text(4) + img + text(12),
    ]
    ids, mask, pos = right_pad(rows, model.ids.pad)
    pixels = torch.randn(3, 3, 64, 64, generator=g)
    return ids, mask, pos, pixels


@pytest.mark.parametrize("mode", ["sketch", "thought"])
def test_kv_cached_loop_equals_full_recompute(mode):
    model = tiny(mode)
    fast = assert_cached_loop_matches_recompute(model, *make_batch(model))
    if mode == "thought":
        assert fast.selected is not None and fast.selected.shape[0] == fast.latent_vectors.shape[0]


@pytest.mark.parametrize("mode", ["sketch", "thought"])
def test_jacobi_with_enough_passes_reaches_the_sequential_result(mode):
    # row 1 chains 2 + 4 = 6 slots: pass t fixes the t-th slot of the chain, so 7 passes give the exact result
    model = tiny(mode, jacobi_iterations=7)
    ids, mask, pos, pixels = make_batch(model)
    with torch.no_grad():
        seq = latent_forward(model, ids, mask, pos, pixels, schedule="sequential")
        jac = latent_forward(model, ids, mask, pos, pixels, schedule="jacobi")
    keep = mask.bool()
    assert (seq.logits - jac.logits)[keep].abs().max() <= 1e-4
    assert jac.forwards == 1 + 7


def test_answer_loss_reaches_the_first_slot_source_and_not_the_frozen_tower():
    cfg = preset("tiny")
    cfg.vision.freeze = True
    torch.manual_seed(0)
    model = LatentVLM(cfg).train()
    ids, mask, pos, pixels = make_batch(model)
    sources = []

    def keep_source(module, args):  # the hidden states the sketch head turns into slot inputs
        args[0].retain_grad()
        sources.append(args[0])

    model.sketch_head.register_forward_pre_hook(keep_source)
    out = latent_forward(model, ids, mask, pos, pixels)
    # the answer: the text after the last block of row 0 only
    labels = torch.full_like(ids, -100)
    end0 = int((ids[0] == model.ids.latent_end).nonzero()[-1])
    labels[0, end0 + 1 : int(mask[0].sum())] = ids[0, end0 + 1 : int(mask[0].sum())]
    loss = weighted_cross_entropy(out.logits, labels, torch.ones_like(labels, dtype=torch.float))
    loss.backward()
    first_source = sources[0]  # hidden states at p-1 of the first slot column (row 0's first slot)
    assert first_source.grad is not None and first_source.grad[0].abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.vision.parameters())
    assert any(p.grad is not None for p in model.backbone.projector.parameters())


def test_jacobi_mode_trains_on_a_fixed_batch():
    model = tiny("sketch", schedule="jacobi", jacobi_iterations=3).train()
    ids, mask, pos, pixels = make_batch(model)
    labels = torch.where(mask.bool() & (ids != model.ids.image), ids, torch.full_like(ids, -100))
    weights = torch.ones_like(ids, dtype=torch.float)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = latent_forward(model, ids, mask, pos, pixels)
        loss = weighted_cross_entropy(out.logits, labels, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_no_latent_tokens_is_a_plain_forward():
    model = tiny()
    ids, mask, pos, pixels = make_batch(model)
    ids = torch.where(ids == model.ids.latent, torch.full_like(ids, 42), ids)
    with torch.no_grad():
        out = latent_forward(model, ids, mask, pos, pixels)
        plain = model(ids, mask, pos, pixels)
    assert out.forwards == 1 and torch.equal(out.logits, plain.logits)


@pytest.mark.parametrize("schedule", ["sequential", "jacobi"])
def test_min_forwards_cuts_text_into_more_forwards_with_the_same_result(schedule):
    """What a sharded run asks of a rank with fewer slot columns than the busiest rank (FSDP2 gathers each
    decoder layer at every call, so every rank must call it equally often)."""
    from mmlatent.model.latent_loop import planned_forwards

    model = tiny("thought", jacobi_iterations=3)
    ids, mask, pos, pixels = make_batch(model)
    no_slots = torch.where(ids == model.ids.latent, torch.full_like(ids, 42), ids)
    with torch.no_grad():
        for batch in (ids, no_slots):
            plain = latent_forward(model, batch, mask, pos, pixels, schedule=schedule)
            assert plain.forwards == planned_forwards(model, batch, schedule)
            more = latent_forward(model, batch, mask, pos, pixels, schedule=schedule, min_forwards=plain.forwards + 5)
            assert more.forwards == plain.forwards + 5
            torch.testing.assert_close(more.logits[mask.bool()], plain.logits[mask.bool()], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(more.latent_vectors, plain.latent_vectors, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="LM forwards asked"):
        latent_forward(model, ids, mask, pos, pixels, schedule=schedule, min_forwards=ids.shape[1] + 9)
