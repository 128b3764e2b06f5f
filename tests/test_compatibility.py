"""Checkpoints and exported folders written before the layer refactor (commit 6f8dd9f) load and compute
exactly what they computed then.

`tests/fixtures/pre_refactor/` was written by that commit's code (a micro thought-mode model, 0.2 M
parameters): a stage-3 Lightning checkpoint, the model's export folder, the tokenizer it used, and the old
code's logits on a fixed input (plain forward and KV-cached latent loop). The checkpoint's tokenizer is a
saved folder: a checkpoint of the synthetic tokenizer (`name_or_path: null`) names no folder and is rebuilt
from the synthetic corpus of the running version, which changed with the colour-move task, so such
checkpoints need the tokenizer of their own version (exported folders always carry theirs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmlatent.model.latent_loop import latent_forward
from mmlatent.model.latent_vlm import LatentVLM

FIXTURE = Path(__file__).parent / "fixtures" / "pre_refactor"


@pytest.fixture()
def old_checkpoint(tmp_path) -> Path:
    """The old checkpoint with its tokenizer placeholder pointed at the fixture's tokenizer folder."""
    ckpt = torch.load(FIXTURE / "stage3.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["vlm"]["tokenizer"]["name_or_path"] == "TOKENIZER_DIR"
    ckpt["hyper_parameters"]["vlm"]["tokenizer"]["name_or_path"] = str(FIXTURE / "tokenizer")
    path = tmp_path / "stage3.ckpt"
    torch.save(ckpt, path)
    return path


def check_outputs(model: LatentVLM) -> None:
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    ids, px = ref["input_ids"], ref["pixel_values"]
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    # the reference was computed on the machine that wrote the fixture: another CPU family's kernels may round
    # differently, so the comparison allows float noise (the weights themselves are compared exactly below)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, pos, px).logits, ref["logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(latent_forward(model, ids, mask, pos, px).logits, ref["latent_logits"], rtol=0, atol=1e-5)


def test_an_old_lightning_checkpoint_loads_and_computes_the_same(old_checkpoint):
    from mmlatent.training.checkpoint_reader import load_model
    from mmlatent.training.module import LatentVLMModule

    check_outputs(load_model(old_checkpoint))
    module = LatentVLMModule.load_from_checkpoint(str(old_checkpoint), map_location="cpu", weights_only=True)
    assert module.stage_cfg.name == "stage3" and module.val_answers is False  # an option the old code lacked
    check_outputs(module.model.eval())


def test_an_old_export_folder_loads_and_computes_the_same(tmp_path, old_checkpoint):
    from mmlatent.training.checkpoint_reader import load_model

    folder = tmp_path / "export"
    shutil.copytree(FIXTURE / "export", folder)
    loaded = LatentVLM.from_pretrained(folder)
    check_outputs(loaded)
    a, b = load_model(old_checkpoint).state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same weights, bit for bit
