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
    batched = [g.token_ids for g in generate_from_prompts(tiny_model, ps, pixels, cfg)]
    for i, p in enumerate(ps):
        single = generate_from_prompts(tiny_model, [p], pixels[i : i + 1], cfg)[0].token_ids
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


def latent_prompts(model):
    """Prompts of different lengths; two of them end in <|latent_start|>, so they open a block at once."""
    ps, pixels = prompts(model)
    ps[0] = torch.cat([ps[0], torch.tensor([model.ids.latent_start])])
    ps[2] = torch.cat([ps[2], torch.tensor([model.ids.latent_start])])
    return ps, pixels


def test_latent_blocks_batched_equals_one_by_one(tiny_model):
    ps, pixels = latent_prompts(tiny_model)
    cfg = GenerationConfig(max_new_tokens=14)
    batched = generate_from_prompts(tiny_model, ps, pixels, cfg)
    budget = tiny_model.cfg.latent.budget
    for i, p in enumerate(ps):
        single = generate_from_prompts(tiny_model, [p], pixels[i : i + 1], cfg)[0]
        assert single.token_ids == batched[i].token_ids
    # rows that opened a block feed latent steps up to the budget (or an earlier <|latent_end|>)
    for g in (batched[0], batched[2]):
        assert 1 <= g.latent_steps <= budget
        assert g.token_ids[: g.latent_steps] == [tiny_model.ids.latent] * g.latent_steps
        assert g.positions == len(g.token_ids)
    assert batched[1].latent_steps == 0 or batched[1].token_ids[0] != tiny_model.ids.latent


def test_no_latent_forbids_blocks(tiny_model):
    ps, pixels = prompts(tiny_model)
    cfg = GenerationConfig(max_new_tokens=6, latent=False)
    for g in generate_from_prompts(tiny_model, ps, pixels, cfg):
        assert tiny_model.ids.latent_start not in g.token_ids and g.latent_steps == 0


def test_test_time_scaling_votes_over_noisy_trajectories(tiny_model):
    from mmlatent.model.generation import generate_voted

    ps, pixels = latent_prompts(tiny_model)
    cfg = GenerationConfig(max_new_tokens=12, trajectories=4, latent_noise="gaussian", noise_std=1.0, seed=0)
    first = generate_voted(tiny_model, ps, pixels, cfg, extract=lambda t: t[:3] or None)
    again = generate_voted(tiny_model, ps, pixels, cfg, extract=lambda t: t[:3] or None)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]  # seeded
    for g in first:
        assert sum(g.votes.values()) <= 4 and g.positions >= len(g.token_ids)
        if g.votes:
            assert g.text[:3] == max(g.votes, key=g.votes.get)


def test_latent_noise_kinds():
    from mmlatent.model.generation import perturb

    v = torch.ones(200, 64)
    g = torch.Generator().manual_seed(0)
    gauss = perturb(v, GenerationConfig(latent_noise="gaussian", noise_std=0.5), g)
    assert abs(float((gauss - v).std()) - 0.5) < 0.05
    drop = perturb(v, GenerationConfig(latent_noise="dropout", noise_std=0.25), g)
    assert abs(float((drop == 0).float().mean()) - 0.25) < 0.03 and torch.allclose(drop[drop != 0], torch.tensor(1 / 0.75))
    assert torch.equal(perturb(v, GenerationConfig(), g), v)
