"""Native transformers VLMs (Qwen2.5-VL, LLaVA) behind the backbone interface.

Each family's tiny random model is saved the way a Hub repo holds it (model, image processor, tokenizer)
and loaded back through `from_pretrained(folder)`, the path a Hub id takes. Then: the image transform is
the model's own processor, Qwen2.5-VL's positions are `get_rope_index`'s, the KV-cached latent loop
equals a full recompute, cached generation equals greedy recompute, activation checkpointing keeps the
cached loop exact, and (slow) stages 1 → 2 → 3 train, export, load back identically and evaluate.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmlatent.model.config import ModelConfig
from mmlatent.model.generation import GenerationConfig, generate_from_prompts, left_pad
from mmlatent.model.latent_config import LatentConfig
from mmlatent.model.latent_loop import latent_forward
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.native_backbone import NativeBackboneConfig
from mmlatent.model.presets import preset
from mmlatent.model.tokenizer import TokenizerConfig
from tests.conftest import assert_cached_loop_matches_recompute, latent_block, right_pad

FAMILIES = {"qwen2_5_vl": "tiny-qwen2.5-vl", "llava": "tiny-llava"}


@pytest.fixture(scope="module")
def hub_folders(tmp_path_factory):
    """Per family: a folder holding a tiny random VLM as a Hub repo does, and the model that wrote it."""
    out = {}
    for kind, name in FAMILIES.items():
        folder = tmp_path_factory.mktemp(kind)
        torch.manual_seed(0)
        model = LatentVLM(preset(name)).eval()
        model.backbone.vlm.save_pretrained(str(folder))
        model.backbone.image_processor.save_pretrained(str(folder))
        model.tokenizer.save_pretrained(str(folder))
        out[kind] = (folder, model)
    return out


def hub_config(kind: str, folder, mode: str = "sketch", **native) -> ModelConfig:
    """A config loading `folder` exactly as it would load a Hub id (64-px images: 16 tokens)."""
    return ModelConfig(
        backbone=kind,
        native=NativeBackboneConfig(name_or_path=str(folder), image_size=64 if kind == "qwen2_5_vl" else None,
                                    **{"freeze_vision": False, **native}),
        tokenizer=TokenizerConfig(name_or_path=str(folder)),
        latent=LatentConfig(mode=mode),
    )


def load(hub_folders, kind: str, mode: str = "sketch", **native) -> LatentVLM:
    torch.manual_seed(1)  # the latent heads are fresh; the VLM comes from the folder
    return LatentVLM(hub_config(kind, hub_folders[kind][0], mode, **native))


def make_batch(model):
    """Right-padded rows with one or two images and latent blocks at different places and of different lengths."""
    g = torch.Generator().manual_seed(0)
    img = [model.ids.image] * model.tokens_per_image

    def text(n):
        return torch.randint(10, 300, (n,), generator=g).tolist()

    rows = [
        text(3) + img + text(4) + img + text(2) + latent_block(model, 3) + text(6),
        text(2) + img + text(9) + latent_block(model, 2) + text(3) + latent_block(model, 4) + text(3),
        text(5) + img + text(10),
    ]
    ids, mask, pos = right_pad(rows, model.ids.pad)
    pixels = torch.randn(4, 3, 64, 64, generator=g)
    return ids, mask, pos, pixels


def random_image(seed: int, size=(50, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("kind", FAMILIES)
def test_loads_from_a_saved_folder_like_a_hub_id(hub_folders, kind):
    folder, original = hub_folders[kind]
    model = load(hub_folders, kind).eval()
    assert type(model.backbone.vlm) is type(original.backbone.vlm)
    assert model.tokens_per_image == 16 and model.backbone.token_grid == (4, 4)
    assert model.backbone.num_layers == 2 and model.backbone.hidden_size == 128
    a, b = original.backbone.vlm.state_dict(), model.backbone.vlm.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids, mask, pos, pixels = make_batch(model)
    with torch.no_grad():
        assert torch.equal(original(ids, mask, pos, pixels).logits, model(ids, mask, pos, pixels).logits)

    frozen = load(hub_folders, kind, freeze_vision=True, freeze_projector=True)
    still = {n for n, p in frozen.backbone.vlm.named_parameters() if not p.requires_grad}
    assert still and all(".visual." in f".{n}" or "vision_tower" in n or "multi_modal_projector" in n for n in still)


def test_wrong_family_or_image_size_is_a_clear_error(hub_folders):
    with pytest.raises(ValueError, match="holds a 'llava' model; backbone='qwen2_5_vl'"):
        LatentVLM(hub_config("qwen2_5_vl", hub_folders["llava"][0]))
    cfg = hub_config("qwen2_5_vl", hub_folders["qwen2_5_vl"][0])
    cfg.native.image_size = 60
    with pytest.raises(ValueError, match="native.image_size=60 must be a multiple of 16"):
        LatentVLM(cfg)


# ------------------------------------------------------------------------------------------------- images


def test_qwen_transform_is_the_model_processor_at_a_fixed_size(hub_folders):
    from mmlatent.model.qwen2_5_vl import patchify, unpatchify

    model = hub_folders["qwen2_5_vl"][1]
    b = model.backbone
    transform = b.image_transform(train=True)
    for seed, size in ((0, (50, 70)), (1, (200, 31))):  # any aspect ratio -> the same 64-px square
        image = random_image(seed, size)
        pixels = transform(image)
        assert pixels.shape == (3, 64, 64)
        resized = image.resize((64, 64), resample=Image.Resampling.BICUBIC)
        want = b.image_processor(images=resized, do_resize=False, return_tensors="pt")["pixel_values"]  # (64, 384)
        got = patchify(pixels[None], b.patch, b.merge, b.temporal)[0]
        assert torch.equal(got, want)
        assert torch.equal(unpatchify(got, 64, 64, b.patch, b.merge, b.temporal), pixels)


def test_llava_transform_is_the_model_processor(hub_folders):
    b = hub_folders["llava"][1].backbone
    image = random_image(2, (40, 90))
    want = b.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(b.image_transform()(image), want) and want.shape == (3, 64, 64)


def test_qwen_positions_equal_get_rope_index(hub_folders):
    """Right-padded training rows and left-padded prompts: the 3D positions are Qwen's own."""
    model = hub_folders["qwen2_5_vl"][1]
    ids, mask, pos, pixels = make_batch(model)
    prompts = [row[: int(m.sum())] for row, m in zip(ids, mask)]
    grid_thw = torch.tensor([[1, 8, 8]] * 4)  # 64 px / 8-px patches, before the 2×2 merge
    for ids_, mask_, pos_ in ((ids, mask, pos), left_pad(prompts, model.ids.pad)):
        image = ids_ == model.ids.image
        model.embed_inputs(ids_, pixels)  # binds the image layout
        ours = model.backbone.lm_positions(pos_, 0)  # (3, B, L)
        want, _ = model.backbone.vlm.model.get_rope_index(ids_, image.int(), image_grid_thw=grid_thw, attention_mask=mask_)
        real = mask_.bool()
        assert torch.equal(ours[:, real], want[:, real])
        assert (ours[1, image] != ours[2, image]).any()  # images really get 2D positions
        # a segment of the cached loop (columns 30..) gets the same positions as the full sequence there
        assert torch.equal(model.backbone.lm_positions(pos_[:, 30:], 30), ours[:, :, 30:])


# --------------------------------------------------------------------------------------------- the loops


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("mode", ["sketch", "thought"])
def test_kv_cached_latent_loop_equals_full_recompute(hub_folders, kind, mode):
    model = load(hub_folders, kind, mode).eval()
    assert_cached_loop_matches_recompute(model, *make_batch(model))


@pytest.mark.parametrize("kind", FAMILIES)
def test_cached_generation_equals_greedy_recompute(hub_folders, kind):
    """Left-padded batched decoding with a KV cache picks the tokens a full forward per step picks."""
    model = load(hub_folders, kind).eval()
    ids, mask, _, pixels = make_batch(model)
    prompts = [ids[0, :40], ids[2, :24]]  # two images and one, prompts of different lengths
    prompt_pixels = torch.cat([pixels[:2], pixels[3:4]])
    gen = generate_from_prompts(model, prompts, prompt_pixels, GenerationConfig(max_new_tokens=5, latent=False))
    first = 0
    for prompt, g in zip(prompts, gen):
        n_img = int((prompt == model.ids.image).sum()) // model.tokens_per_image
        seq = prompt.tolist()
        with torch.no_grad():
            for _ in range(len(g.token_ids)):
                x = torch.tensor([seq])
                logits = model(x, torch.ones_like(x), torch.arange(x.shape[1])[None], prompt_pixels[first : first + n_img]).logits
                logits[0, -1, model.ids.latent_start] = float("-inf")
                seq.append(int(logits[0, -1].argmax()))
        first += n_img
        assert seq[len(prompt):] == g.token_ids


@pytest.mark.parametrize("kind", FAMILIES)
def test_gradient_checkpointing_keeps_the_cached_loop_exact(hub_folders, kind):
    """Recomputed layers read the cache as it was (ReplayCache): same loss and gradients as without. The one
    switch is `model.acceleration.gradient_checkpointing`."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from mmlatent.training.acceleration import AccelerationConfig, apply_acceleration

    results = []
    for checkpointing in (False, True):
        model = load(hub_folders, kind, "thought").train()
        apply_acceleration(model, AccelerationConfig(gradient_checkpointing=checkpointing), trains_with_kv_cache=True)
        layers = [m for m in model.backbone.vlm.get_decoder().modules() if isinstance(m, GradientCheckpointingLayer)]
        assert layers and all(m.gradient_checkpointing == checkpointing for m in layers)
        ids, mask, pos, pixels = make_batch(model)
        out = latent_forward(model, ids, mask, pos, pixels)
        loss = out.logits[mask.bool()].logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and len(grads_a) > 50
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("freeze_vision", [True, False])
def test_checkpointing_keeps_a_frozen_tower_out_of_the_backward(hub_folders, kind, freeze_vision):
    """transformers' checkpointing makes the output of every sub-model's input embedding require grad, the
    tower's patch embedding included; a frozen tower must stay out of the graph, or each of its blocks keeps
    its activations for a backward that changes nothing. A tower that trains stays in it."""
    from mmlatent.training.acceleration import AccelerationConfig, apply_acceleration

    model = load(hub_folders, kind, "thought", freeze_vision=freeze_vision).train()
    apply_acceleration(model, AccelerationConfig(gradient_checkpointing=True), trains_with_kv_cache=True)
    in_graph = []
    leaves = [m for tower in model.backbone.vision_modules() for m in tower.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, out: in_graph.append(getattr(out, "requires_grad", False)))
             for m in leaves]
    ids, mask, pos, pixels = make_batch(model)
    latent_forward(model, ids, mask, pos, pixels).logits.sum().backward()
    for h in hooks:
        h.remove()
    assert in_graph and any(in_graph) != freeze_vision
    assert any(p.grad is not None for p in model.backbone.vlm.get_decoder().parameters())  # the LM still learns


# ------------------------------------------------------------------------------------ stages, export, eval


@pytest.fixture(scope="module")
def short_synth(tmp_path_factory):
    """Eight one-hop pointer-chasing samples (two aux images each): short sequences, quick steps."""
    from mmlatent.data.synthetic import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("short-synth")
    synthesize(out, SynthConfig(hops=(1, 1)), train=8, val=4, seed=0, samples_per_shard=4, progress=False)
    return out


def fit(module, synth_dir, steps: int, ckpt_path=None, callbacks=(), batch_size: int = 2):
    """`steps` optimiser steps of a Lightning Trainer on the synthetic shards (no validation)."""
    import lightning as L

    from mmlatent.training.datamodule import ShardDataModule, SplitConfig
    from mmlatent.training.stages import data_layout, data_teacher_layout

    slots = module.vlm_cfg.latent.slots
    data = ShardDataModule(train=SplitConfig(shards=str(synth_dir / "train")), val=SplitConfig(shards=""),
                           batch_size=batch_size, num_workers=0, shuffle_buffer=0,
                           layout=data_layout(module.stage_cfg, slots), teacher_layout=data_teacher_layout(module.stage_cfg, slots))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=list(callbacks))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("kind,mode", [("qwen2_5_vl", "thought"), ("llava", "sketch")])
def test_three_stages_export_and_evaluate(hub_folders, short_synth, tmp_path, kind, mode):
    from mmlatent.evaluation.runner import EvalConfig, evaluate, generate_responses
    from mmlatent.evaluation.tasks import load_eval_data
    from mmlatent.hub.export import export_checkpoint
    from mmlatent.training.grounding import GroundingConfig
    from mmlatent.training.module import LatentVLMModule
    from mmlatent.training.stages import StageConfig
    from mmlatent.training.teacher import TeacherConfig
    from tests.evaluation.test_eval_data import write_scienceqa

    cfg = hub_config(kind, hub_folders[kind][0], mode)
    cfg.latent.slots = 2  # fewer slot columns: fewer forwards per step (the loop is the same)
    previous = None
    for name in ("stage1", "stage2", "stage3"):
        stage = StageConfig(name=name) if name == "stage1" else StageConfig(
            name=name, teacher=TeacherConfig(checkpoint=str(previous)), grounding=GroundingConfig(sketch_weight=0.1)
        )
        torch.manual_seed(0)
        module = LatentVLMModule(vlm=cfg, stage=stage, init_from=None if previous is None else str(previous))
        trainer = fit(module, short_synth, steps=2)
        assert trainer.global_step == 2
        losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        assert all(v == v and v >= 0 for v in losses.values()) and "train/ce_loss" in losses
        if name != "stage1":
            assert {"train/align_loss", "train/sketch_loss"} <= set(losses)
        previous = tmp_path / f"{name}.ckpt"
        trainer.save_checkpoint(previous)

    out = export_checkpoint(previous, tmp_path / "export")
    assert (out / "vlm" / "config.json").exists() and (out / "vlm" / "preprocessor_config.json").exists()
    trained = module.model.eval()
    loaded = LatentVLM.from_pretrained(out)
    assert isinstance(loaded.backbone, type(trained.backbone)) and loaded.tokens_per_image == 16
    ids, mask, pos, pixels = make_batch(trained)
    with torch.no_grad():
        assert torch.equal(trained(ids, mask, pos, pixels).logits, loaded(ids, mask, pos, pixels).logits)
        want = latent_forward(trained, ids, mask, pos, pixels)
        got = latent_forward(loaded, ids, mask, pos, pixels)
    assert torch.equal(want.logits, got.logits)
    prompts, prompt_pixels = [ids[0, :40], ids[2, :24]], torch.cat([pixels[:2], pixels[3:4]])
    gen_cfg = GenerationConfig(max_new_tokens=8)
    assert [g.token_ids for g in generate_from_prompts(loaded, prompts, prompt_pixels, gen_cfg)] == [
        g.token_ids for g in generate_from_prompts(trained, prompts, prompt_pixels, gen_cfg)
    ]

    data = load_eval_data("scienceqa", str(write_scienceqa(tmp_path / "sqa", "data")), "test",
                          cache_dir=str(tmp_path / "hf-cache"))
    eval_cfg = EvalConfig(batch_size=4, max_new_tokens=6, progress=False)
    batched = generate_responses(loaded, data, data.questions, eval_cfg)
    single = generate_responses(loaded, data, data.questions, EvalConfig(batch_size=1, max_new_tokens=6, progress=False))
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]  # left padding and 3D positions agree
    results = evaluate(loaded, data, eval_cfg, tmp_path / "eval", kind)
    assert results["num"] == 4 and (tmp_path / "eval" / "samples.jsonl").exists()
