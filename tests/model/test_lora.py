"""LoRA through peft: only adapters and special-token rows train, merging is exact, checkpoints resume,
and an exported LoRA model is a plain merged model that loads without peft."""

from __future__ import annotations

import json

import pytest
import torch

from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.lora import LoraConfig
from mmlatent.model.presets import preset
from tests.model.test_native_backbone import fit, make_batch, short_synth  # noqa: F401  (a fixture)

ADAPTER_MARKS = ("lora_A", "lora_B", "trainable_tokens_delta")


def lora_model(name: str, seed: int = 0) -> LatentVLM:
    cfg = preset(name)
    cfg.lora = LoraConfig(enabled=True, rank=4, alpha=8.0, dropout=0.0)
    torch.manual_seed(seed)
    return LatentVLM(cfg)


def perturb_adapters(model: LatentVLM) -> None:
    """LoRA's B starts at zero (the adapted model equals the base); move every adapter away from it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(mark in name for mark in ADAPTER_MARKS):
                p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2.5-vl"])
def test_adapters_train_and_the_base_lm_is_frozen(name):
    model = lora_model(name)
    lm = model.backbone.transformers_model.get_decoder()
    lm_names = {f"{n}" for n, _ in lm.named_parameters()}
    assert lm_names and all(
        p.requires_grad == any(mark in n for mark in ADAPTER_MARKS) for n, p in lm.named_parameters()
    )
    assert sum("lora_A" in n for n in lm_names) == 7 * (4 if name == "tiny" else 2)  # 7 target layers per decoder layer
    outside = [(n, p) for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert outside and all(p.requires_grad for _, p in outside)  # latent heads train
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "lora_" in n and ("visual" in n or "vision" in n)]  # the tower is never adapted
    vision = [p for n, p in model.named_parameters() if ".visual." in n or "backbone.vision." in n]
    assert vision and all(p.requires_grad for p in vision)  # the tiny presets train their random tower

    # the special-token rows get gradient; no other embedding row can change
    ids, mask, pos, pixels = make_batch(model)
    model(ids, mask, pos, pixels).logits.logsumexp(-1).mean().backward()
    delta = next(p for n, p in model.named_parameters() if "trainable_tokens_delta" in n)
    assert delta.shape[0] == len(set(vars(model.ids).values())) and delta.grad.abs().sum() > 0
    embedding = model.backbone.transformers_model.get_input_embeddings()
    assert all(not p.requires_grad for p in embedding.parameters() if p is not delta)


def test_adapters_and_token_rows_are_fp32_over_a_bf16_base():
    cfg = preset("tiny-qwen2.5-vl")
    cfg.native.dtype = "bfloat16"
    cfg.lora = LoraConfig(enabled=True, rank=4, alpha=8.0, dropout=0.0)
    model = LatentVLM(cfg)
    adapters = [p for n, p in model.named_parameters() if any(mark in n for mark in ADAPTER_MARKS)]
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters)
    assert model.backbone.transformers_model.get_decoder().layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    ids, mask, pos, pixels = make_batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, mask, pos, pixels).logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters)


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2.5-vl", "tiny-llava"])
def test_merge_is_exact_and_leaves_a_plain_model(name):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = lora_model(name).eval()
    perturb_adapters(model)
    ids, mask, pos, pixels = make_batch(model)
    with torch.no_grad():
        adapted = model(ids, mask, pos, pixels).logits
        model.merge_lora()
        merged = model(ids, mask, pos, pixels).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=2e-5)
    assert model.lora is None and not model.cfg.lora.enabled
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    plain = preset(name)
    assert model.state_dict().keys() == LatentVLM(plain).state_dict().keys()


@pytest.mark.slow
def test_train_save_resume_merge_export(short_synth, tmp_path):
    """Train with LoRA, checkpoint, resume from the checkpoint, export merged, load without peft."""
    import lightning as L
    from transformers import AutoModelForImageTextToText

    from mmlatent.hub.export import export_checkpoint
    from mmlatent.training.checkpoint_reader import load_model
    from mmlatent.training.module import LatentVLMModule

    cfg = lora_model("tiny-qwen2.5-vl").cfg
    torch.manual_seed(0)
    module = LatentVLMModule(vlm=cfg)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = fit(module, short_synth, steps=2)
    after = module.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("lora_B" in k for k in changed) and any("trainable_tokens_delta" in k for k in changed)
    lm_base = {k for k in before if k.startswith("backbone.vlm.model.language_model.") and not any(m in k for m in ADAPTER_MARKS)}
    assert lm_base and not (changed & lm_base)  # the base LM did not move
    ckpt = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(ckpt)

    # the checkpoint rebuilds the adapted model outside the Trainer (online teachers, stage hand-off)
    restored = load_model(ckpt)
    ids, mask, pos, pixels = make_batch(restored)
    trained = module.model.eval()
    with torch.no_grad():
        want = trained(ids, mask, pos, pixels).logits
        assert torch.equal(restored(ids, mask, pos, pixels).logits, want)

    # resume: the Trainer restores adapters and optimiser state, and goes on counting steps
    seen = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    torch.manual_seed(1)
    resumed = LatentVLMModule(vlm=cfg)
    trainer = fit(resumed, short_synth, steps=4, ckpt_path=str(ckpt), callbacks=[Snapshot()])
    assert trainer.global_step == 4
    assert seen.keys() == after.keys() and all(torch.equal(seen[k], after[k]) for k in after)
    ckpt2 = tmp_path / "resumed.ckpt"
    trainer.save_checkpoint(ckpt2)

    # export merges: plain weights, LoRA off in the config, same outputs
    out = export_checkpoint(ckpt2, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["lora"]["enabled"] is False
    keys = json.loads((out / "vlm" / "model.safetensors.index.json").read_text())["weight_map"] if (
        out / "vlm" / "model.safetensors.index.json").exists() else None
    from safetensors import safe_open

    if keys is None:
        with safe_open(str(out / "vlm" / "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "base_layer" in k or "token_adapter" in k]
    loaded = LatentVLM.from_pretrained(out)
    resumed.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, pos, pixels).logits, resumed.model(ids, mask, pos, pixels).logits,
                                   rtol=1e-5, atol=2e-5)
    assert loaded.lora is None
    assert type(AutoModelForImageTextToText.from_pretrained(str(out / "vlm"))).__name__ == "Qwen2_5_VLForConditionalGeneration"
