"""One chat template: a converted Monet sample's training prompt, its evaluation prompt (`--task shards`) and
`LatentVLM.generate`'s prompt for the same question are the same ids, system turn included."""

from __future__ import annotations

import json

import torch

from mmlatent.data.convert import ConvertOptions, MonetConfig, convert
from mmlatent.data.pipeline import SkipCounter, decode_samples
from mmlatent.data.processor import Processor, SequenceLayout
from mmlatent.data.tar_reader import shard_samples
from mmlatent.evaluation.runner import PromptRenderer
from mmlatent.evaluation.shards import ShardsTask
from tests.data.test_convert_monet import GOOD, record, save_png

MONET_SYSTEM = "You are a helpful assistant."  # what the converter writes (Monet's preprocessing)


def test_a_converted_monet_sample_is_asked_as_it_was_trained(tiny_model, tmp_path, monkeypatch):
    root = tmp_path / "Monet-SFT-125K"
    for i, name in enumerate(["q", "a0"]):
        save_png(root / "Visual_CoT" / "images" / f"{name}.png", i)
    (root / "Visual_CoT" / "train.json").write_text(json.dumps([record(0, GOOD)]))
    out = tmp_path / "shards"
    convert("monet", MonetConfig(source=str(root)), str(out),
            ConvertOptions(image_format="png", samples_per_shard=8, workers=0, progress=False))
    [sample] = decode_samples((s for p in sorted(out.glob("*.tar")) for s in shard_samples(str(p))), SkipCounter())
    assert sample["meta"]["messages"][0] == {"role": "system", "content": [{"type": "text", "text": MONET_SYSTEM}]}

    trained = Processor.for_model(tiny_model, SequenceLayout())(sample)  # pixels: the question image, then the aux image
    prompt = trained.input_ids[: trained.prompt_length]
    assert tiny_model.tokenizer.decode(prompt.tolist()).startswith(f"<|im_start|>system\n{MONET_SYSTEM}<|im_end|>")

    # mmlatent eval --task shards: the sample's own system turn, not folded into the question
    [question], images = ShardsTask().read(str(out))
    assert question.system == MONET_SYSTEM and question.prompt_text().startswith("<image 1>Question 0")
    asked, pixels = PromptRenderer(tiny_model, open_latent=False).render(question, images.images(question))
    assert asked.tolist() == prompt.tolist() and torch.equal(pixels, trained.pixel_values[:1])

    # LatentVLM.generate (and MMMU/ScienceQA questions, which carry no system turn): the model's system prompt
    monkeypatch.setattr(tiny_model.cfg, "system_prompt", MONET_SYSTEM)
    text = sample["meta"]["messages"][1]["content"][1]["text"]
    ids, px = tiny_model.prompt(sample["images"]["img0"], text)
    assert ids.tolist() == prompt.tolist() and torch.equal(px, trained.pixel_values[:1])
    bare = question.__class__(**{**vars(question), "system": None})
    assert PromptRenderer(tiny_model, open_latent=False).render(bare, images.images(question))[0].tolist() == prompt.tolist()


def test_the_models_system_prompt_starts_samples_without_one(tiny_model, monkeypatch):
    meta = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Which colour?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}], "answer": "red"}
    plain = Processor.for_model(tiny_model, SequenceLayout()).render(meta, {})
    monkeypatch.setattr(tiny_model.cfg, "system_prompt", "Be brief.")
    sample = Processor.for_model(tiny_model, SequenceLayout()).render(meta, {})
    text = tiny_model.tokenizer.decode(sample.input_ids.tolist())
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhich colour?")
    system_turn = sample.input_ids.numel() - plain.input_ids.numel()
    assert sample.input_ids[system_turn:].tolist() == plain.input_ids.tolist()
    assert sample.prompt_length == plain.prompt_length + system_turn and sample.labels[:system_turn].eq(-100).all()
    assert tiny_model.prompt([], "Which colour?")[0].tolist() == sample.input_ids[: sample.prompt_length].tolist()
