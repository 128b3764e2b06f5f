"""Batched KV-cached decoding: batched equals one by one, greedy equals a no-cache reference."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

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


@contextmanager
def steered(model, token_ids: list[int], shift: float) -> Iterator[None]:
    """Add `shift` to the LM head's logits of `token_ids` while inside (a forward hook: the shared model's
    weights are not touched), e.g. to make a random model open latent blocks."""

    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., token_ids] += shift
        return logits

    handle = model.backbone.transformers_model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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


def test_block_end_slots_runs_every_block_as_trained(tiny_model, monkeypatch):
    """With the head steered to `<|latent_end|>`, `block_end: model` closes each block after its first slot;
    `block_end: slots` ignores the head and runs exactly `slots` steps, the length of a trained block."""
    ids, slots = tiny_model.ids, tiny_model.cfg.latent.slots
    ps, pixels = latent_prompts(tiny_model)
    for end, steps in (("model", 1), ("slots", slots)):
        monkeypatch.setattr(tiny_model.cfg.latent, "block_end", end)
        with steered(tiny_model, [ids.latent_end], 1e4):
            out = generate_from_prompts(tiny_model, ps, pixels, GenerationConfig(max_new_tokens=slots + 3))
        for g in (out[0], out[2]):  # the rows whose prompt opened a block
            assert g.token_ids[: steps + 1] == [ids.latent] * steps + [ids.latent_end], end
            assert g.latent_steps == steps


def test_no_latent_forbids_blocks(tiny_model):
    """With the head steered to <|latent_start|> (and, inside a block, to going on: `<|latent|>` over
    `<|latent_end|>`), `latent=True` opens a block at once and feeds its slots (`entered_latent`, recorded
    latents); `latent=False` decodes the same prompts without any block."""
    ids = tiny_model.ids
    ps, pixels = prompts(tiny_model)
    with steered(tiny_model, [ids.latent_start, ids.latent], 1e4):
        opened = generate_from_prompts(tiny_model, ps, pixels, GenerationConfig(max_new_tokens=6, return_latents=True))
        closed = generate_from_prompts(tiny_model, ps, pixels, GenerationConfig(max_new_tokens=6, latent=False))
    for g in opened:  # the control: the steering does reach the latent path
        assert g.token_ids == [ids.latent_start] + [ids.latent] * 5 and g.entered_latent and g.latent_steps == 5
        assert [(r.block, r.slot) for r in g.latents] == [(0, s) for s in range(5)]
    for g in closed:
        assert ids.latent_start not in g.token_ids and ids.latent not in g.token_ids
        assert not g.entered_latent and g.latent_steps == 0


def test_a_block_marker_is_never_text(tiny_model):
    """Outside a block, `<|latent_end|>` (nothing to close) and `<|latent|>` are never emitted, however
    likely the head makes them; the decoded text stays plain."""
    ids = tiny_model.ids
    ps, pixels = prompts(tiny_model)
    with steered(tiny_model, [ids.latent_end, ids.latent], 1e4):
        out = generate_from_prompts(tiny_model, ps, pixels, GenerationConfig(max_new_tokens=6, latent=False))
    for g in out:
        assert len(g.token_ids) == 6 and not {ids.latent_end, ids.latent} & set(g.token_ids)


def test_test_time_scaling_votes_over_noisy_trajectories(tiny_model):
    """M noisy trajectories per prompt vote: the votes count every trajectory's answer and the winner's text
    is returned; the noise really moves the latent trajectories (noise-free copies of a prompt all agree,
    noisy ones differ from them, each by its own noise of the configured size). Nothing here depends on the
    random weights of the session's tiny model."""
    from mmlatent.model.generation import generate_voted

    ids = tiny_model.ids
    M, std = 4, 1.0
    ps, pixels = latent_prompts(tiny_model)
    cfg = GenerationConfig(max_new_tokens=12, trajectories=M, latent_noise="gaussian", noise_std=std, seed=0)
    clean_cfg = GenerationConfig(max_new_tokens=12, return_latents=True)
    extract = lambda t: t[:3]  # noqa: E731  (every trajectory votes, an empty answer too)
    rep = [p for p in ps for _ in range(M)]
    rep_pixels = pixels.repeat_interleave(M, dim=0)  # one image per prompt
    # text after a block: no marker tokens, so the answers are words rather than empty strings
    with steered(tiny_model, [ids.latent_start, ids.latent_end], -1e4):
        voted = generate_voted(tiny_model, ps, pixels, cfg, extract=extract)
        again = generate_voted(tiny_model, ps, pixels, cfg, extract=extract)
        noisy = generate_from_prompts(tiny_model, rep, rep_pixels, replace(cfg, return_latents=True))
        clean = generate_from_prompts(tiny_model, rep, rep_pixels, clean_cfg)
    assert [g.token_ids for g in voted] == [g.token_ids for g in again]  # seeded
    for i, g in enumerate(voted):
        group = noisy[i * M : (i + 1) * M]  # the same batch generate_voted decodes
        assert g.votes == Counter(extract(t.text) for t in group) and sum(g.votes.values()) == M
        assert g.text[:3] == max(g.votes, key=g.votes.get)
        assert g.positions == sum(t.positions for t in group) and g.latent_steps == sum(t.latent_steps for t in group)
    for i in (0, 2):  # the prompts that open a block: every slot's input carries its own noise
        group, base = noisy[i * M : (i + 1) * M], clean[i * M : (i + 1) * M]
        assert all(t.entered_latent for t in group)
        assert all(b.token_ids == base[0].token_ids for b in base)
        assert all(torch.equal(r.vector, s.vector) for b in base for r, s in zip(b.latents, base[0].latents))
        first = torch.stack([t.latents[0].vector for t in group])  # slot 0: same hidden state, then noise
        shift = first - base[0].latents[0].vector
        assert abs(float(shift.std()) - std) < 0.2 and len({tuple(x.tolist()) for x in first}) == M


def test_latent_noise_kinds():
    from mmlatent.model.generation import perturb

    v = torch.ones(200, 64)
    g = torch.Generator().manual_seed(0)
    gauss = perturb(v, GenerationConfig(latent_noise="gaussian", noise_std=0.5), g)
    assert abs(float((gauss - v).std()) - 0.5) < 0.05
    drop = perturb(v, GenerationConfig(latent_noise="dropout", noise_std=0.25), g)
    assert abs(float((drop == 0).float().mean()) - 0.25) < 0.03 and torch.allclose(drop[drop != 0], torch.tensor(1 / 0.75))
    assert torch.equal(perturb(v, GenerationConfig(), g), v)
