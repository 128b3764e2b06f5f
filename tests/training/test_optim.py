"""The optimiser groups and the learning-rate schedule (`training/optim.py`)."""

from __future__ import annotations

import math

import pytest
import torch

from mmlatent.training.optim import ModuleLR, OptimConfig, build_optimizer, decayed_parameters, lr_factor, param_groups


def test_only_linear_and_conv_weights_decay(tiny_model):
    decayed = decayed_parameters(tiny_model)
    names = {n for n, p in tiny_model.named_parameters() if id(p) in decayed}
    kept = {n for n, p in tiny_model.named_parameters() if id(p) not in decayed}
    assert "backbone.lm.model.layers.0.self_attn.q_proj.weight" in names
    assert "backbone.lm.model.layers.0.mlp.up_proj.weight" in names
    assert "backbone.vision.model.patch_embed.proj.weight" in names  # a convolution
    assert "backbone.projector.net.0.weight" in names
    # token embeddings (tied to the output head), positions, the class token, biases and norm gains do not
    for name in ("backbone.lm.model.embed_tokens.weight", "backbone.vision.model.pos_embed",
                 "backbone.vision.model.cls_token", "backbone.lm.model.layers.0.self_attn.q_proj.bias",
                 "backbone.lm.model.norm.weight", "backbone.vision.model.blocks.0.norm1.weight"):
        assert name in kept, name
    assert tiny_model.backbone.lm.lm_head.weight is tiny_model.backbone.lm.model.embed_tokens.weight


def test_groups_split_by_scale_and_decay_and_freeze_scale_zero():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, lr_scale=[ModuleLR("1.", 0.5), ModuleLR("2.", 0.0)])
    groups = param_groups(model, cfg)
    by = {(g["lr_scale"], g["weight_decay"]): {id(p) for p in g["params"]} for g in groups}
    assert by == {(1.0, 0.0): {id(model[0].weight)}, (0.5, 0.1): {id(model[1].weight)}, (0.5, 0.0): {id(model[1].bias)}}
    assert {g["lr"] for g in groups} == {1e-3, 5e-4}
    assert not model[2].weight.requires_grad and not model[2].bias.requires_grad  # scale 0 froze the norm


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, 110, cfg) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, 110, cfg) == pytest.approx(0.1) and lr_factor(500, 110, cfg) == pytest.approx(0.1)
    constant = OptimConfig(warmup_steps=10, schedule="constant")
    assert lr_factor(9, 100, constant) == 1.0 and lr_factor(99, 100, constant) == 1.0


def test_scheduler_steps_every_group_by_the_factor():
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=4, lr_scale=[ModuleLR("bias", 0.5)]), 20)
    seen = []
    for _ in range(4):
        seen.append(sorted(g["lr"] for g in opt.param_groups))
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx([0.25 * 5e-3, 0.25 * 1e-2]) and seen[3] == pytest.approx([5e-3, 1e-2])
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig(lr_scale=[ModuleLR("", 0.0)]), 10)
