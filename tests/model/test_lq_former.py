"""LQ-Former and token selection: selection, masking, gradients, gate, batch independence, learnability."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmlatent.model.lq_former import LQFormer, LQFormerConfig, Thought
from mmlatent.model.token_selection import TokenSelectionConfig, TokenSelector

D = 32


def identity_selector(top_k: int) -> TokenSelector:
    sel = TokenSelector(TokenSelectionConfig(top_k=top_k, dim=D), D)
    with torch.no_grad():
        sel.query.weight.copy_(torch.eye(D))
        sel.key.weight.copy_(torch.eye(D))
    return sel


def lq(**kw) -> LQFormer:
    torch.manual_seed(0)
    kw.setdefault("selection", TokenSelectionConfig(top_k=4, dim=16))
    return LQFormer(LQFormerConfig(heads=4, **kw), D)


def test_selector_picks_the_token_aligned_with_h_and_masks_the_rest():
    sel = identity_selector(top_k=2)
    g = torch.Generator().manual_seed(0)
    visual = torch.randn(4, 10, D, generator=g) * 0.1  # (B, M, D)
    h = torch.randn(4, D, generator=g)
    visual[0, 7] = 5 * h[0]
    visual[1, 2] = 5 * h[1]
    visual[3, 4] = 5 * h[3]
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[1, 2] = False  # the best token of row 1 is invisible
    mask[2] = False  # row 2 sees nothing
    mask[3] = False
    mask[3, 4] = True  # row 3 sees a single token: fewer than top_k
    selected, selected_mask, indices, relevance = sel(h, visual, mask)

    assert selected.shape == (4, 2, D) and selected_mask.shape == indices.shape == (4, 2)
    assert relevance.shape == (4, 10) and indices.dtype == torch.long
    assert indices[0, 0] == 7 and relevance[0].argmax() == 7
    assert 2 not in indices[1].tolist() and selected_mask[1].all()
    assert indices[2].tolist() == [-1, -1] and not selected_mask[2].any()
    assert indices[3].tolist() == [4, -1] and selected_mask[3].tolist() == [True, False]
    for t in (selected, relevance):
        assert torch.isfinite(t).all()
    assert torch.all(relevance[2] == 0) and torch.all(selected[2] == 0)
    assert torch.all(relevance[~mask] == 0)
    torch.testing.assert_close(relevance[[0, 1, 3]].sum(-1), torch.ones(3))
    # straight-through: the forward values are exactly the raw tokens
    assert torch.equal(selected[0, 0], visual[0, 7]) and torch.equal(selected[3, 0], visual[3, 4])


def test_selector_keeps_at_most_m_tokens_and_its_relevance_head_gets_a_gradient():
    sel = TokenSelector(TokenSelectionConfig(top_k=8, dim=16), D)
    h = torch.randn(3, D)
    visual = torch.randn(3, 5, D)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2] = False
    selected, selected_mask, indices, _ = sel(h, visual, mask)
    assert selected.shape == (3, 5, D) and indices.shape == (3, 5)  # k = min(top_k, M)
    assert sorted(indices[0].tolist()) == list(range(5))
    selected.pow(2).sum().backward()  # only through the straight-through factor
    for p in (sel.query.weight, sel.key.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_shapes_no_nans_and_gradients_everywhere():
    m = lq()
    h = torch.randn(5, D, requires_grad=True)
    visual = torch.randn(5, 12, D, requires_grad=True)
    mask = torch.ones(5, 12, dtype=torch.bool)
    mask[3, 6:] = False
    mask[4] = False  # no visible token
    t = m(h, visual, mask)
    assert isinstance(t, Thought)
    assert t.vector.shape == (5, D) and t.indices.shape == (5, 4) and t.relevance.shape == (5, 12)
    assert t.gate.shape == (5, 1)
    torch.testing.assert_close(t.gate, torch.full((5, 1), 1 / (1 + math.exp(2.0))))  # sigmoid(gate_init)
    assert torch.isfinite(t.vector).all() and torch.all(t.indices[4] == -1)
    t.vector.pow(2).sum().backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0
    assert torch.isfinite(visual.grad).all() and visual.grad[0].abs().sum() > 0
    assert torch.all(visual.grad[3, 6:] == 0) and torch.all(visual.grad[4] == 0)  # invisible tokens: no gradient
    params = dict(m.named_parameters())
    for name in ("queries", "selector.query.weight", "selector.key.weight", "gate.weight", "gate.bias", "h_in.weight"):
        p = params[name]
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_closed_gate_returns_h_exactly():
    m = lq()
    with torch.no_grad():
        m.gate.bias.fill_(-1e4)
    h = torch.randn(4, D)
    visual = torch.randn(4, 8, D)
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[2] = False
    t = m(h, visual, mask)
    assert torch.all(t.gate == 0) and torch.equal(t.vector, h)


def test_selected_base_is_the_top_token_plus_the_gated_output():
    """`base: selected` hands the LM the most relevant visual token itself (closed gate: exactly that token),
    and an open gate adds the LQ-Former output on top instead of replacing the token."""
    m = lq(base="selected")
    with torch.no_grad():
        m.gate.bias.fill_(-1e4)
    h, visual = torch.randn(4, D), torch.randn(4, 8, D)
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[1, :5] = False
    t = m(h, visual, mask)
    top = visual[torch.arange(4), t.indices[:, 0]]  # (4, D)
    assert torch.equal(t.vector, top)
    assert torch.all(t.indices[1, :1] >= 5)  # the base token of row 1 is a visible one
    with torch.no_grad():
        m.gate.bias.fill_(0.0)
    opened = m(h, visual, mask)
    assert not torch.allclose(opened.vector, top)
    m.cfg.base = "hidden"  # the same weights: g * out + (1 - g) * h with g = 0.5 gives out
    out = (m(h, visual, mask).vector - 0.5 * h) / 0.5
    torch.testing.assert_close(opened.gate, torch.full((4, 1), 0.5))
    torch.testing.assert_close(opened.vector, top + 0.5 * out)


def test_centred_keys_ignore_what_every_token_shares():
    """With `centre_keys`, adding one vector to every visible token or scaling them all leaves the relevance
    unchanged (raw keys change with both), and an invisible token does not move the centre."""
    torch.manual_seed(0)
    h, visual = torch.randn(3, D), torch.randn(3, 9, D)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[2, 6:] = False
    shifted = visual * 3.0 + torch.randn(D) * 10
    hidden_changed = visual.clone()
    hidden_changed[2, 6:] += 100.0
    for centre in (True, False):
        torch.manual_seed(1)
        sel = TokenSelector(TokenSelectionConfig(top_k=2, dim=16, centre_keys=centre), D)
        r = sel.relevance(h, visual, mask)
        same = torch.allclose(r, sel.relevance(h, shifted, mask), atol=1e-5)
        assert same == centre, centre
        torch.testing.assert_close(r, sel.relevance(h, hidden_changed, mask))
        assert torch.all(r[2, 6:] == 0)


def test_scaled_scores_are_a_bounded_cosine():
    """With `scale`, the relevance is softmax(scale · cos(q, k)): scaling h or the tokens changes nothing, and
    no token gets more than exp(2 · scale) times another's relevance, however large q and k grow."""
    torch.manual_seed(0)
    sel = TokenSelector(TokenSelectionConfig(top_k=2, dim=16, scale=4.0), D)
    h, visual = torch.randn(3, D), torch.randn(3, 9, D)
    mask = torch.ones(3, 9, dtype=torch.bool)
    r = sel.relevance(h, visual, mask)
    torch.testing.assert_close(r, sel.relevance(100 * h, 100 * visual, mask))
    q, k = F.normalize(sel.query(h), dim=-1), F.normalize(sel.key(visual), dim=-1)
    torch.testing.assert_close(r, torch.softmax(4.0 * torch.einsum("bd,bmd->bm", q, k), -1))
    assert float(r.detach().max(-1).values.div(r.detach().min(-1).values).max()) <= math.exp(8.0) + 1e-3
    with pytest.raises(ValueError, match=r"selection\.scale=0\.0 must be > 0"):
        TokenSelectionConfig(scale=0.0)


def test_rows_are_independent():
    m = lq()
    h = torch.randn(4, D)
    visual = torch.randn(4, 8, D)
    mask = torch.ones(4, 8, dtype=torch.bool)
    full = m(h, visual, mask).vector
    h2, visual2, mask2 = h.clone(), visual.clone(), mask.clone()
    h2[1] += 1.0
    visual2[1] *= 3
    mask2[1, :5] = False
    other = m(h2, visual2, mask2).vector
    torch.testing.assert_close(full[[0, 2, 3]], other[[0, 2, 3]])
    assert not torch.allclose(full[1], other[1])
    alone = m(h[2:3], visual[2:3], mask[2:3]).vector
    torch.testing.assert_close(alone[0], full[2], atol=1e-5, rtol=1e-5)


def test_flattened_slots_batch_bf16_and_dropout():
    m = lq(dropout=0.2)
    n, M = 256, 24  # Jacobi mode: (B·S) rows at once
    h = torch.randn(n, D)
    visual = torch.randn(n, M, D)
    mask = torch.rand(n, M) < 0.5
    mask[::7] = False
    m.eval()
    a, b = m(h, visual, mask), m(h, visual, mask)
    assert torch.isfinite(a.vector).all() and torch.equal(a.vector, b.vector)  # eval: deterministic
    m.train()
    assert not torch.equal(m(h, visual, mask).vector, m(h, visual, mask).vector)  # MC dropout in train mode
    m.eval().to(torch.bfloat16)
    t = m(h.bfloat16(), visual.bfloat16(), mask)
    assert t.vector.dtype == torch.bfloat16 and torch.isfinite(t.vector).all()


def test_bad_config_fails_with_the_field_name():
    with pytest.raises(ValueError, match="heads"):
        LQFormer(LQFormerConfig(heads=5), D)
    with pytest.raises(ValueError, match="top_k"):
        TokenSelectionConfig(top_k=0)


def test_content_addressed_lookup_is_learnable():
    """h holds a key; the thought must find the visual token carrying that key and output its value.

    Keys are shuffled over the 16 tokens in every sample, so no fixed position works: the selector has to
    match content. Top-2 of 16 tokens: chance puts the right token in the selection 1 time in 8, and an
    output that ignores the image has squared error 1 (values are standard normal).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest and leaves the other cores alone
    try:
        torch.manual_seed(0)
        M, K = 16, 16

        def batch(n: int):
            keys = F.one_hot(torch.rand(n, M).argsort(-1), K).float()  # (n, M, K) token j carries key perm[j]
            values = torch.randn(n, M, D - K)  # (n, M, D-K)
            target = torch.randint(0, M, (n,))  # (n,) the wanted token
            h = torch.cat([keys[torch.arange(n), target], torch.zeros(n, D - K)], dim=-1)  # (n, D)
            visual = torch.cat([keys, values], dim=-1)  # (n, M, D)
            return h, visual, torch.ones(n, M, dtype=torch.bool), values[torch.arange(n), target], target

        m = LQFormer(LQFormerConfig(selection=TokenSelectionConfig(top_k=2, dim=16)), D)  # default gate_init
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        for _ in range(300):
            h, visual, mask, want, _ = batch(64)
            loss = (m(h, visual, mask).vector[:, K:] - want).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        h, visual, mask, want, target = batch(512)
        with torch.no_grad():
            t = m(h, visual, mask)
    finally:
        torch.set_num_threads(threads)
    hit = (t.indices == target[:, None]).any(-1).float().mean()
    assert hit > 0.8, hit  # chance: 0.125
    assert (t.vector[:, K:] - want).pow(2).mean() < 0.3  # ignoring the image: 1.0
    assert t.gate.mean() > 0.5, t.gate.mean()  # the gate opened from sigmoid(-2) ≈ 0.12 to let the image in
