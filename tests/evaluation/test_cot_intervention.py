"""The CoT intervention: replacing the word a chain of thought read changes the answer of a model that reads it.

A tiny model is trained on chains "It is <observation>colour</observation> (letter)." whose letter is the
colour's option and whose colour the prompt never gives, so the answer can only come from the word it wrote
(the letter weighs 20 times the other tokens: the random colour's gradient would drown that lookup in a
short run).
Replacing that word (the last observation) must then change every answer to the new word's option; the first
observation is the same span here, so `first` changes them too.
"""

from __future__ import annotations

import random

import torch

from mmlatent.data.processor import Processor
from mmlatent.evaluation.cot_intervention import edit_answer, intervene, replacement
from mmlatent.evaluation.runner import EvalConfig, generate_responses
from mmlatent.evaluation.shards import ShardImages, question_of
from mmlatent.evaluation.tasks import EvalData, get_task
from mmlatent.losses.cross_entropy import weighted_cross_entropy
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.presets import preset
from mmlatent.training.stages import StageConfig, build_stage
from tests.conftest import one_thread

COLOURS = ["red", "green", "blue", "yellow"]


def _sample(i: int, colour: str) -> dict:
    letter = "ABCD"[COLOURS.index(colour)]
    options = "\n".join(f"{l}. {c}" for l, c in zip("ABCD", COLOURS))
    meta = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": f"Pick a colour.\n{options}"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is <observation>{colour}</observation> ({letter})."}]},
        ],
        "answer": letter, "choices": COLOURS,
    }
    return {"key": f"q{i}", "meta": meta, "images": {}}


def test_replacement_is_the_next_option():
    assert replacement("green", COLOURS) == "blue" and replacement("yellow", COLOURS) == "red"
    assert replacement("purple", COLOURS) == "red"


def test_replacing_the_word_read_changes_the_answer_of_a_model_that_reads_it():
    torch.manual_seed(0)
    cfg = preset("tiny")
    lm = cfg.lm.random_init
    lm.num_hidden_layers, lm.hidden_size, lm.intermediate_size, cfg.vision.depth = 1, 64, 128, 1  # small: quick
    model = LatentVLM(cfg)
    stage = build_stage(StageConfig(name="stage1"))
    proc = Processor.for_model(model, stage.layout(cfg.latent.slots))
    rng = random.Random(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    with one_thread():
        letters = torch.tensor([model.tokenizer.convert_tokens_to_ids(c) for c in "ABCD"])
        for step in range(60):
            batch = proc.collate([proc(_sample(i, rng.choice(COLOURS))) for i in range(16)])
            on_letter = torch.isin(batch.labels, letters)  # (B, L)
            weights = batch.loss_weights * torch.where(on_letter, 1.0, 0.05)  # (B, L): the letter weighs most
            loss = weighted_cross_entropy(stage.forward(model, batch).logits, batch.labels, weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    questions = [question_of(_sample(i, COLOURS[i % 4]))[0] for i in range(8)]
    data = EvalData(task=get_task("shards"), data="", split="", image_source=ShardImages({q.id: {} for q in questions}),
                    questions=questions)
    ecfg = EvalConfig(batch_size=4, latent=False, max_new_tokens=24, progress=False)
    generated = generate_responses(model, data, questions, ecfg)
    for g in generated:  # the control: the model writes a word and names that word's option
        edit = edit_answer(model, g.token_ids, COLOURS, "last")
        assert edit is not None and edit.read in COLOURS
        assert g.text.endswith(f"({'ABCD'[COLOURS.index(edit.read)]}).")
    last = intervene(model, data, questions, generated, ecfg, "last")
    assert last["edited"] == 8 and last["changed"] == 1.0 and last["follows"] == 1.0
    assert intervene(model, data, questions, generated, ecfg, "first")["changed"] == 1.0
