"""Batched KV-cached decoding: batched equals one by one, greedy equals a no-cache reference."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import pytest
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
    extract = lambda i, t: t[:3]  # noqa: E731  (every trajectory votes, an empty answer too)
    rep = [p for p in ps for _ in range(M)]
    rep_pixels = pixels.repeat_interleave(M, dim=0)  # one image per prompt
    # text after a block: no marker tokens, so the answers are words rather than empty strings
    with steered(tiny_model, [ids.latent_start, ids.latent_end], -1e4):
        voted = generate_voted(tiny_model, ps, pixels, cfg, extract=extract)
        again = generate_voted(tiny_model, ps, pixels, cfg, extract=extract)
        questions = [i for i in range(len(ps)) for _ in range(M)]  # as generate_voted lays the trajectories out
        noisy = generate_from_prompts(tiny_model, rep, rep_pixels, replace(cfg, return_latents=True), questions=questions)
        clean = generate_from_prompts(tiny_model, rep, rep_pixels, clean_cfg)
    assert [g.token_ids for g in voted] == [g.token_ids for g in again]  # seeded
    for i, g in enumerate(voted):
        group = noisy[i * M : (i + 1) * M]  # the same batch generate_voted decodes
        assert g.votes == Counter(extract(i, t.text) for t in group) and sum(g.votes.values()) == M
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
    g = [torch.Generator().manual_seed(i) for i in range(200)]  # one per row (trajectory)
    gauss = perturb(v, GenerationConfig(latent_noise="gaussian", noise_std=0.5), g)
    assert abs(float((gauss - v).std()) - 0.5) < 0.05
    drop = perturb(v, GenerationConfig(latent_noise="dropout", noise_std=0.25), g)
    assert abs(float((drop == 0).float().mean()) - 0.25) < 0.03 and torch.allclose(drop[drop != 0], torch.tensor(1 / 0.75))
    assert torch.equal(perturb(v, GenerationConfig(), g), v)


def latent_model(mode: str, schedule: str):
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    cfg = preset("tiny")
    cfg.latent.mode, cfg.latent.schedule = mode, schedule
    torch.manual_seed(0)
    return LatentVLM(cfg).eval()


@pytest.mark.parametrize("mode,schedule", [("sketch", "sequential"), ("thought", "sequential"),
                                           ("sketch", "jacobi"), ("thought", "jacobi")])
def test_generated_latents_equal_latent_forward_on_the_same_sequence(mode, schedule):
    """Generation and training compute the same thing: each answer's prompt plus its generated tokens, run
    through `latent_forward` (the training loop, with the model's schedule) on the same model, gives the
    latent vectors generation fed and predicts the text tokens it chose. Batched rows open their blocks at
    different steps (two prompts open one at once). With Jacobi the block's vectors are the refined ones,
    not the sequential chain's (3 passes for 4 slots), and training's Jacobi refines all of a sequence's
    blocks together, so the sequence is cut before a second block."""
    from mmlatent.model.latent_loop import latent_forward

    model = latent_model(mode, schedule)
    ids = model.ids
    ps, pixels = latent_prompts(model)
    cfg = GenerationConfig(max_new_tokens=model.cfg.latent.slots + 4, return_latents=True)
    out = generate_from_prompts(model, ps, pixels, cfg)
    assert all(g.positions <= cfg.max_new_tokens for g in out)  # a Jacobi block adds its slots in one step
    checked = 0
    for i, (p, g) in enumerate(zip(ps, out)):
        if not g.entered_latent:
            continue
        new = g.token_ids
        if schedule == "jacobi" and ids.latent_start in new[1:]:
            new = new[: new.index(ids.latent_start, 1)]
        seq = torch.tensor(p.tolist() + new)[None]  # (1, L)
        with torch.no_grad():
            fwd = latent_forward(model, seq, torch.ones_like(seq), torch.arange(seq.shape[1])[None], pixels[i : i + 1],
                                 schedule=schedule, prompt_end=torch.tensor([p.numel()]))
        fed = torch.stack([r.vector for r in g.latents[: fwd.latent_vectors.shape[0]]])
        torch.testing.assert_close(fwd.latent_vectors, fed, atol=1e-5, rtol=1e-5)
        if mode == "thought":
            assert fwd.selected.tolist() == [r.selected.tolist() for r in g.latents[: len(fed)]]
        logits = fwd.logits[0].clone()
        logits[:, [ids.latent, ids.latent_end]] = float("-inf")  # never chosen as text (generation masks them too)
        for k in range(p.numel(), seq.shape[1]):
            if int(seq[0, k]) not in (ids.latent, ids.latent_end):  # the text tokens greedy decoding chose
                assert int(logits[k - 1].argmax()) == int(seq[0, k]), (i, k)
        checked += 1
    assert checked >= 2
    if schedule == "jacobi":  # the refined block is not the sequential chain: the two modes really differ
        model.cfg.latent.schedule = "sequential"
        seq_out = generate_from_prompts(model, ps, pixels, cfg)
        assert not torch.allclose(seq_out[0].latents[-1].vector, out[0].latents[model.cfg.latent.slots - 1].vector)


def test_jacobi_needs_two_passes():
    from mmlatent.model.latent_config import LatentConfig

    with pytest.raises(ValueError, match="jacobi_iterations=1 must be at least 2"):
        LatentConfig(schedule="jacobi", jacobi_iterations=1)


def test_mc_dropout_trajectories_differ_by_their_own_seeds_and_the_vote_counts_them():
    """`latent_noise: mc_dropout`: the LQ-Former's dropout is active (the model stays in eval mode), each
    trajectory drawing from its own seeded stream: trajectories of a question think different thoughts, a
    trajectory's thoughts do not depend on what else shares the batch, and the vote counts every trajectory.
    A sketch model has no dropout to activate and says so."""
    from mmlatent.model.generation import generate_voted

    model = latent_model("thought", "sequential")
    ps, pixels = latent_prompts(model)
    ps, pixels, M = [ps[0], ps[2]], pixels[[0, 2]], 3  # two prompts that open a block at once
    cfg = GenerationConfig(max_new_tokens=6, trajectories=M, latent_noise="mc_dropout", noise_std=0.3, seed=0,
                           return_latents=True)
    rows = [p for p in ps for _ in range(M)]
    noisy = generate_from_prompts(model, rows, pixels.repeat_interleave(M, dim=0), cfg, questions=[0] * M + [1] * M)
    assert not any(m.training for m in model.modules())
    for i in range(2):  # slot 0 reads the same state in every trajectory of a question: only dropout moves it
        first = [noisy[i * M + m].latents[0].vector for m in range(M)]
        assert all(not torch.equal(first[0], x) for x in first[1:])
    alone = generate_from_prompts(model, rows[:M], pixels[:1].repeat_interleave(M, dim=0), cfg, questions=[0] * M)
    for a, b in zip(alone, noisy[:M]):  # the same trajectory with or without another question in the batch
        assert all(torch.allclose(x.vector, y.vector, atol=1e-6) for x, y in zip(a.latents, b.latents))
    extract = lambda i, t: t[:2]  # noqa: E731
    for i, g in enumerate(generate_voted(model, ps, pixels, cfg, extract=extract)):
        assert g.votes == Counter(extract(i, t.text) for t in noisy[i * M : (i + 1) * M]) and sum(g.votes.values()) == M
    with pytest.raises(ValueError, match="thought mode only"):
        generate_from_prompts(latent_model("sketch", "sequential"), ps, pixels, cfg)
