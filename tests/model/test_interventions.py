"""Latent interventions change a latent model's answers; `none` changes nothing; the trigger is counted.

The prompts end in `<|latent_start|>` and blocks run their trained length (`block_end: slots`), so every
answer runs a latent block of the full step budget and the interventions have slots to act on (on a random
model nothing else makes a block likely, and its own end-of-block decision is a coin toss).
"""

from __future__ import annotations

import pytest
import torch

from mmlatent.evaluation.question import Question
from mmlatent.evaluation.runner import score, summarize
from mmlatent.evaluation.shards import ShardsTask
from mmlatent.evaluation.tasks import EvalData
from mmlatent.model.generation import GenerationConfig, generate_from_prompts
from mmlatent.model.interventions import NoiseLatents, ReplayLatents, swap_donors
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.presets import preset


@pytest.fixture(scope="module", params=["sketch", "thought"])
def model(request):
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.latent.mode = request.param
    cfg.latent.block_end, cfg.latent.slots = "slots", 8  # every block runs 8 steps
    return LatentVLM(cfg).eval()


def forced_prompts(model, force=(True, True, True, True)):
    g = torch.Generator().manual_seed(0)
    prompts = []
    for n, f in zip((9, 23, 14, 5), force):
        p = torch.randint(10, 300, (n + 16,), generator=g)
        p[3:19] = model.ids.image
        prompts.append(torch.cat([p, torch.tensor([model.ids.latent_start])]) if f else p)
    return prompts, torch.randn(len(prompts), 3, 64, 64, generator=g)


def run(model, intervention, **kw):
    """Sampled decoding with a fixed seed: the same draws wherever the distributions are the same, so any change
    in what the model computes after the block shows in the tokens (a random model's argmax hardly moves)."""
    prompts, pixels = forced_prompts(model)
    cfg = GenerationConfig(max_new_tokens=16, latent_intervention=intervention, return_latents=True, seed=0,
                           do_sample=True, **kw)
    return generate_from_prompts(model, prompts, pixels, cfg)


def test_none_leaves_answers_and_latents_bit_identical(model):
    plain = generate_from_prompts(model, *forced_prompts(model), GenerationConfig(max_new_tokens=16, return_latents=True, seed=0, do_sample=True))
    none = run(model, "none")
    assert [g.token_ids for g in none] == [g.token_ids for g in plain]
    for a, b in zip(none, plain):
        assert a.latent_steps == model.cfg.latent.budget and len(a.latents) == a.latent_steps
        assert all(torch.equal(x.vector, y.vector) and (x.block, x.slot) == (y.block, y.slot) for x, y in zip(a.latents, b.latents))
        assert [(r.block, r.slot) for r in a.latents] == [(0, s) for s in range(a.latent_steps)]


@pytest.mark.parametrize("intervention", ["zero", "noise", "swap"])
def test_each_intervention_changes_the_answers(model, intervention):
    none, changed = run(model, "none"), run(model, intervention)
    assert [g.token_ids for g in changed] != [g.token_ids for g in none]
    fed = [r.vector for g in changed for r in g.latents]
    if intervention == "zero":
        assert all(not v.any() for v in fed)
    elif intervention == "swap":  # row i read row i + 1's untouched latents, slot by slot
        for i, g in enumerate(changed):
            donor = {(r.block, r.slot): r.vector for r in none[(i + 1) % len(none)].latents}
            assert all(torch.equal(r.vector, donor[(r.block, r.slot)]) for r in g.latents if (r.block, r.slot) in donor)
    else:
        assert not any(torch.equal(a.vector, b.vector) for a, b in zip(changed[0].latents, none[0].latents))


def test_noise_keeps_each_norm_and_swap_needs_two_questions():
    v = torch.randn(5, 16) * torch.arange(1, 6)[:, None]
    out = NoiseLatents(torch.Generator().manual_seed(0))(torch.arange(5), torch.zeros(5), torch.arange(5), v)
    torch.testing.assert_close(out.norm(dim=-1), v.norm(dim=-1))
    assert (torch.nn.functional.cosine_similarity(out, v) < 0.9).all()
    assert swap_donors([0, 1, 2]) == [1, 2, 0]
    with pytest.raises(ValueError, match="at least two different questions in a batch, got 1"):
        swap_donors([0])
    replay = ReplayLatents([{(0, 0): torch.ones(2), (0, 1): 2 * torch.ones(2)}, {}], donors=[1, 0])
    got = replay(torch.tensor([1, 1, 0]), torch.tensor([0, 0, 0]), torch.tensor([1, 5, 0]), torch.zeros(3, 2))
    assert got.tolist() == [[2.0, 2.0], [2.0, 2.0], [0.0, 0.0]]  # the donor's slot; past its end its last; none: zeros


def test_trigger_rate_counts_answers_that_entered_a_block(model):
    prompts, pixels = forced_prompts(model, force=(True, False, True, False))
    generated = generate_from_prompts(model, prompts, pixels, GenerationConfig(max_new_tokens=12, latent=False))
    assert [g.entered_latent for g in generated] == [True, False, True, False]
    questions = [Question(id=f"q{i}", row=i, content=["?"], question_type="multiple-choice", choices=["a", "b"], gold="A")
                 for i in range(4)]
    records = score(questions, [g.text for g in generated], generated)
    data = EvalData(task=ShardsTask(), data="x", split="shards", image_source=None, questions=questions)
    results = summarize(data, records)
    assert results["trigger_rate"] == 0.5
    assert results["positions_per_answer"] == sum(g.positions for g in generated) / 4


def test_swap_donors_are_always_other_questions():
    """Trajectories of one question sit in a row (test-time scaling): each row's donor is the row of the same
    trajectory of the next question, never a trajectory of its own question; one question has no donor."""
    assert swap_donors([0, 0, 0, 1, 1, 1, 2, 2, 2]) == [3, 4, 5, 6, 7, 8, 0, 1, 2]
    assert swap_donors([0, 0, 1, 1]) == [2, 3, 0, 1]
    with pytest.raises(ValueError, match="at least two different questions in a batch, got 1"):
        swap_donors([0, 0, 0])


def test_swap_with_trajectories_feeds_another_questions_latents(tiny_model):
    """Each prompt twice in a row (M = 2, as `generate_voted` lays them out): every slot a row is fed is the
    untouched latent of a row of another question."""
    model = tiny_model
    prompts, pixels = forced_prompts(model)
    prompts, pixels, M = prompts[:3], pixels[:3], 2
    rows = [p for p in prompts for _ in range(M)]
    rows_pixels = pixels.repeat_interleave(M, dim=0)
    questions = [i for i in range(len(prompts)) for _ in range(M)]
    cfg = GenerationConfig(max_new_tokens=5, return_latents=True)
    untouched = generate_from_prompts(model, rows, rows_pixels, cfg, questions=questions)
    swapped = generate_from_prompts(model, rows, rows_pixels, GenerationConfig(
        max_new_tokens=5, return_latents=True, latent_intervention="swap"), questions=questions)
    for r, g in enumerate(swapped):
        donor = swap_donors(questions)[r]
        assert questions[donor] != questions[r]
        theirs = {(x.block, x.slot): x.vector for x in untouched[donor].latents}
        assert g.latents and all(torch.equal(x.vector, theirs[(x.block, x.slot)]) for x in g.latents)
