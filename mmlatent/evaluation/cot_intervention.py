"""The causal check of a text chain of thought: replace a word it read off the image, and let it go on.

Latent interventions ask whether an answer depends on the latent vectors; this asks the same of a written
chain. In each generated answer the word inside one `<observation>…</observation>` span (what the model
read off the image: the synthetic task's colour) is replaced by another of the question's options, the
reasoning is cut right after that span, and the model continues from there with the same prompt and images.
A model whose answer rests on what it wrote changes its answer; one that answers from elsewhere keeps it.
`first` replaces the first word read (in a walk, the start cell's colour, which decides the first move);
`last` the last one (the colour the answer names).

The trade-off: the replacement is one of the question's options (the next one after the word read, so the
answer it leads to exists), which keeps the edited chain in the task's vocabulary; an answer with no
observation span cannot be edited and keeps its answer (counted in `edited`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from mmlatent.benchmark_prompts import choice_letters
from mmlatent.evaluation.question import Question
from mmlatent.evaluation.runner import EvalConfig, PromptRenderer
from mmlatent.evaluation.tasks import EvalData
from mmlatent.model.generation import Generated, GenerationConfig, generate_from_prompts
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.scoring.protocols import judge

WordChoice = Literal["first", "last"]


@dataclass
class WordEdit:
    """Where one answer's observed word is replaced, and by what."""

    keep: list[int]
    """The generated ids kept before the edit, the replacement word and `</observation>` included."""
    read: str
    """The word the model had read."""
    written: str
    """The word put in its place."""


def replacement(read: str, choices: list[str]) -> str:
    """The option after `read` among `choices` (cyclic); the first option that is not `read` otherwise."""
    if read in choices:
        return choices[(choices.index(read) + 1) % len(choices)]
    return next(c for c in choices if c != read)


def edit_answer(model: LatentVLM, token_ids: list[int], choices: list[str], which: WordChoice) -> WordEdit | None:
    """The edit of one generated answer (None when it has no closed observation span or no options)."""
    ids = model.ids
    opens = [i for i, t in enumerate(token_ids) if t == ids.observation_open]
    spans = [(i, token_ids.index(ids.observation_close, i)) for i in opens if ids.observation_close in token_ids[i:]]
    if not spans or len(choices) < 2:
        return None
    start, end = spans[0] if which == "first" else spans[-1]
    read = model.tokenizer.decode(token_ids[start + 1 : end]).strip()
    written = replacement(read, choices)
    word = model.tokenizer(written, add_special_tokens=False)["input_ids"]
    return WordEdit(keep=[*token_ids[: start + 1], *word, ids.observation_close], read=read, written=written)


def intervene(
    model: LatentVLM, data: EvalData, questions: list[Question], generated: list[Generated], cfg: EvalConfig,
    which: WordChoice = "last",
) -> dict:
    """Edit every answer's observed word (`which`), continue each edited chain, and score the new answers
    against the gold ones and the untouched ones. Returns `{"accuracy", "changed", "follows", "edited",
    "questions", "which"}`: `changed` is the share of edited answers whose letter changed; `follows`, for
    `last`, the share whose letter is now the replacement word's option."""
    renderer = PromptRenderer(model, open_latent=False)
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, latent=cfg.latent)
    device = next(model.parameters()).device
    edits = [edit_answer(model, g.token_ids, q.choices, which) for q, g in zip(questions, generated)]
    texts = [g.text for g in generated]
    todo = [i for i, e in enumerate(edits) if e is not None]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start : start + cfg.batch_size]
            prompts: list[Tensor] = []
            pixels: list[Tensor] = []
            for i in chunk:
                ids, px = renderer.render(questions[i], data.images(questions[i]))
                prompts.append(torch.cat([ids, torch.tensor(edits[i].keep, dtype=ids.dtype)]).to(device))
                if px.shape[0]:
                    pixels.append(px)
            pixel_values = torch.cat(pixels).to(device) if pixels else torch.zeros(0, 3, 1, 1, device=device)
            budget = max(1, cfg.max_new_tokens - max(len(edits[i].keep) for i in chunk))
            outs = generate_from_prompts(model, prompts, pixel_values, replace(gen_cfg, max_new_tokens=budget))
            for i, g in zip(chunk, outs):
                texts[i] = model.tokenizer.decode([*edits[i].keep, *g.token_ids], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    correct = changed = follows = 0
    for i, q in enumerate(questions):
        new = judge(q.question_type, q.choices, q.gold, texts[i])
        correct += bool(new.correct)
        if edits[i] is None:
            continue
        old = judge(q.question_type, q.choices, q.gold, generated[i].text)
        changed += new.prediction != old.prediction
        if which == "last" and edits[i].written in q.choices:
            follows += new.prediction == choice_letters(len(q.choices))[q.choices.index(edits[i].written)]
    n = max(len(todo), 1)
    return {
        "which": which, "accuracy": correct / max(len(questions), 1), "changed": changed / n,
        "follows": follows / n if which == "last" else None, "edited": len(todo), "questions": len(questions),
    }
