"""The memory model behind `mmlatent plan`: exact parameter counts of the released architectures (offline), the
bytes it assigns under each setting, and the command's output. Its predictions against measured peaks are
`benchmarks/rehearsal.py`'s."""

from __future__ import annotations

import json

import pytest

from mmlatent.training.memory_plan import (
    GiB, ActivationBytes, Device, count_parameters, largest_micro_batch, plan_memory, read_recipe, settings_of,
)
from tests.conftest import REPO

QWEN = str(REPO / "train" / "configs" / "qwen2_5_vl_3b")
PROBE = ActivationBytes(per_layer=100_000.0, per_layer_checkpointed=4096.0, outside=8192.0)
"""Stand-in activation bytes (the probe itself runs real layers; the arithmetic is tested here)."""


@pytest.fixture(scope="module")
def qwen_counts():
    return count_parameters(settings_of(read_recipe([f"{QWEN}/stage1.yaml"])).vlm)


def test_counts_are_the_released_models_plus_mmlatents_heads(qwen_counts):
    c = qwen_counts
    assert c.total - (2048 * 2048 + 2048) == 3_754_622_976  # Qwen2.5-VL-3B-Instruct + the linear sketch head
    assert (c.layers, c.hidden, c.kv_dim, c.vocab, c.tokens_per_image) == (36, 2048, 256, 151936, 256)
    import torch
    from transformers import AutoModelForImageTextToText

    from mmlatent.model.architectures import transformers_config

    with torch.device("meta"):
        visual = AutoModelForImageTextToText.from_config(transformers_config("Qwen/Qwen2.5-VL-3B-Instruct")).model.visual
    frozen = sum(p.numel() for p in visual.parameters()) - sum(p.numel() for p in visual.merger.parameters())
    assert c.total - c.trainable == frozen  # the recipe freezes the ViT; its merger (the projector) trains
    lora = count_parameters(settings_of(read_recipe([f"{QWEN}/stage1.yaml"], ["--model.vlm.lora.enabled=true"])).vlm)
    assert lora.total > c.total and lora.layer_trainable == lora.layer - c.layer  # adapters only train in a layer
    llava = read_recipe([f"{QWEN}/stage1.yaml"], ["--model.vlm.backbone=llava",
                                                  "--model.vlm.native.name_or_path=llava-hf/llava-1.5-7b-hf",
                                                  "--model.vlm.native.image_size=null"])
    counts = count_parameters(settings_of(llava).vlm)
    assert counts.total - (4096 * 4096 + 4096) == 7_063_427_072 and counts.tokens_per_image == 576


def test_what_each_setting_moves(qwen_counts):
    device = Device(memory_gib=80, count=8)
    s = settings_of(read_recipe([f"{QWEN}/stage1.yaml"]))
    sharded = plan_memory(s, qwen_counts, PROBE, device, seq_len=1024)
    assert sharded.weights == pytest.approx(qwen_counts.total * 4 / 8)  # fp32 master weights over 8 GPUs
    assert sharded.optimizer == pytest.approx(2 * qwen_counts.trainable * 4 / 8)
    one = plan_memory(s, qwen_counts, PROBE, Device(memory_gib=80, count=1), seq_len=1024)
    assert one.weights == pytest.approx(8 * sharded.weights)
    s_plain = settings_of(read_recipe([f"{QWEN}/stage1.yaml"], ["--model.acceleration.gradient_checkpointing=false"]))
    plain = plan_memory(s_plain, qwen_counts, PROBE, device, seq_len=1024)
    assert plain.activations > 10 * sharded.activations  # checkpointing keeps the layer inputs only
    online = plan_memory(settings_of(read_recipe([f"{QWEN}/stage2.yaml"])), qwen_counts, PROBE, device, seq_len=1024)
    cached = plan_memory(settings_of(read_recipe([f"{QWEN}/stage2.yaml"], ["--model.stage.teacher.checkpoint=null",
                                                                          "--model.stage.teacher.cache=x"])),
                         qwen_counts, PROBE, device, seq_len=1024)
    assert online.teacher > qwen_counts.total * 4 and cached.teacher == 0  # an unsharded copy per GPU, or none
    assert plan_memory(s, qwen_counts, PROBE, device, seq_len=1024, batch_size=4).logits == pytest.approx(4 * sharded.logits / 2)
    fits = largest_micro_batch(s, qwen_counts, PROBE, device, seq_len=1024)
    assert plan_memory(s, qwen_counts, PROBE, device, 1024, fits).total <= 80 * GiB
    assert plan_memory(s, qwen_counts, PROBE, device, 1024, fits + 1).total > 80 * GiB


def test_plan_command_prints_the_table_and_a_json_line(capsys, monkeypatch):
    from mmlatent.cli import main
    from mmlatent.training import plan_command

    monkeypatch.setattr(plan_command, "activation_probe", lambda vlm, dtype: PROBE)  # the real probe: the rehearsal's
    assert main(["plan", "-c", f"{QWEN}/stage1.yaml", "--gpu-memory", "80", "--gpus", "8", "--data.batch_size=1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["device"] == "8x80GiB gpu" and out["strategy"] == "fsdp2" and out["plan"]["batch_size"] == 1
    assert out["fits"] and out["largest_micro_batch"] >= 1
    assert any(line.strip().startswith("weights:") for line in lines)
