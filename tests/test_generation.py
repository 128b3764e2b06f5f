"""Batched KV-cached decoding: batched equals one by one, greedy equals a no-cache reference."""

from __future__ import annotations

import torch

from mmlatent.model.generation import GenerationConfig, generate_from_prompts


def reference_greedy(model, prompt, pixels, steps):
    """Greedy decoding by full recompute, one sample, no cache."""
    ids = prompt[None]
    new = []
    for _ in range(steps):
        pos = torch.arange(ids.shape[1])[None]
        logits = model(ids, torch.ones_like(ids), pos, pixels).logits[0, -1]
        tok = int(logits.argmax())
        new.append(tok)
        if tok == model.ids.turn_end:
            break
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return new


def prompts(model):
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (9, 23, 14):
        p = torch.randint(10, 300, (n + 16,), generator=g)
        p[3:19] = model.ids.image
        out.append(p)
    return out, torch.randn(3, 3, 64, 64, generator=g)


def test_batched_equals_one_by_one_and_reference(tiny_model):
    ps, pixels = prompts(tiny_model)
    cfg = GenerationConfig(max_new_tokens=12)
    batched = generate_from_prompts(tiny_model, ps, pixels, cfg)
    for i, p in enumerate(ps):
        single = generate_from_prompts(tiny_model, [p], pixels[i : i + 1], cfg)[0]
        assert single == batched[i]
        assert reference_greedy(tiny_model, p, pixels[i : i + 1], 12) == batched[i]


def test_sampling_is_seeded():
    from mmlatent.model.generation import next_token

    logits = torch.randn(4, 50)
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, seed=0)
    a = next_token(logits, cfg, torch.Generator().manual_seed(1))
    b = next_token(logits, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # top-p keeps only the head of the distribution
    peaked = torch.tensor([[10.0, 9.0, -10.0, -10.0]])
    cfg = GenerationConfig(do_sample=True, top_p=0.5)
    draws = {int(next_token(peaked, cfg, torch.Generator().manual_seed(s))) for s in range(20)}
    assert draws == {0}
