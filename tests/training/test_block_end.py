"""Blocks end when the model decides: the slot labels teach it where a block ends and whether another follows.

A tiny sketch-mode model is trained (stage 3's latent-only layout, through the processor's labels) on two
prompts: "one" is answered by one block of N slots, "two" by two. Generating with `block_end: model`, each
block must then close after exactly N slots (the LM's own `<|latent_end|>`-against-`<|latent|>` decision) and
the model must open a second block only for "two".
"""

from __future__ import annotations

import torch
from PIL import Image

from mmlatent.data.processor import Processor, SequenceLayout
from mmlatent.model.generation import GenerationConfig, generate_from_prompts
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.presets import preset
from mmlatent.training.stages import StageConfig, build_stage
from tests.conftest import one_thread

N = 3


def _sample(word: str, blocks: int) -> dict:
    aux = [{"type": "aux_image", "ref": f"aux{i}"} for i in range(blocks)]
    meta = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": f"Count {word}."}]},
            {"role": "assistant", "content": [*aux, {"type": "text", "text": f"Done {word}."}]},
        ],
        "answer": word,
    }
    images = {f"aux{i}": Image.new("RGB", (16, 16), (60 * i, 90, 30)) for i in range(blocks)}
    return {"key": word, "meta": meta, "images": images}


def _blocks(token_ids: list[int], ids) -> list[int]:
    """Slots of each block in a generated answer, in order."""
    out, inside = [], False
    for t in token_ids:
        if t == ids.latent_start:
            out.append(0)
            inside = True
        elif t == ids.latent_end:
            inside = False
        elif inside and t == ids.latent:
            out[-1] += 1
    return out


def test_model_closes_blocks_after_trained_slots_and_opens_another_only_when_trained_to():
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.latent.slots = N
    cfg.latent.block_end = "model"  # a budget of 2N: the model, not the budget, must end each block
    lm = cfg.lm.random_init
    lm.num_hidden_layers, lm.hidden_size, lm.intermediate_size, cfg.vision.depth = 1, 64, 128, 1  # small: quick
    model = LatentVLM(cfg)
    stage = build_stage(StageConfig(name="stage3", align_weight=0.0, reasoning="latent_only"))
    processor = Processor.for_model(model, stage.layout(N))
    batch = processor.collate([processor(_sample("one", 1)), processor(_sample("two", 2))])
    slot_labels = batch.labels[batch.input_ids == model.ids.latent]
    assert bool((slot_labels == model.ids.latent).all())  # the slots are labelled: "the block goes on"
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    with one_thread():
        for _ in range(40):
            loss = stage.losses(model, batch, stage.forward(model, batch))["ce_loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    prompts = [batch.input_ids[b, batch.starts[b] : batch.prompt_end[b]] for b in range(2)]
    out = generate_from_prompts(model, prompts, batch.pixel_values[:0], GenerationConfig(max_new_tokens=24))
    assert [_blocks(g.token_ids, model.ids) for g in out] == [[N], [N, N]]
    assert [g.text for g in out] == ["Done one.", "Done two."]
