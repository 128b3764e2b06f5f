"""A planned batch whose samples are all unusable becomes a filler (`Batch.filler`), and every consumer handles
it: the teacher pass caches the rest and counts the loss, validation keeps the filler's skip counts per split."""

from __future__ import annotations

import json

import torch

from mmlatent.data.pipeline import ShardStream
from mmlatent.data.processor import Processor
from mmlatent.training.module import LatentVLMModule
from mmlatent.training.stages import StageConfig, build_stage
from mmlatent.training.teacher import TeacherCache, write_teacher_cache
from tests.io_helpers import copy_with_broken_images


def test_the_teacher_pass_caches_past_a_batch_of_corrupt_samples(tiny_model, synth_dir, tmp_path):
    """16 consecutive samples with corrupt images at batch size 16 (the issue's reproduction): the pass writes a
    complete cache of the other samples and counts the 16."""
    urls = copy_with_broken_images(synth_dir / "train", tmp_path / "shards", broken_shards=1)  # 16 per shard
    layout = build_stage(StageConfig(name="stage2", align_weight=0.0)).teacher_layout(tiny_model.cfg.latent.slots)
    proc = Processor.for_model(tiny_model, layout)
    stream = ShardStream(urls[:2], proc, proc.collate, 16, shuffle_buffer=0, loop=False)
    n, skipped = write_teacher_cache(tiny_model, stream, tmp_path / "cache", "observation", torch.float32)
    assert n == 16 and skipped == {"bad_image": 16}
    cache = TeacherCache(tmp_path / "cache")
    assert sorted(cache.keys) == [f"synth-train-{i:08d}" for i in range(16, 32)]  # the second shard's
    assert len(json.loads((tmp_path / "cache" / "index.json").read_text())["keys"]) == 16


def test_validation_keeps_a_filler_s_skip_counts_apart_from_training_s(synth_dir, tmp_path):
    """Validation's first batch is all bad (a filler carrying 16 skips): they are counted as validation's and
    logged as `data/val_skipped`; training's `data/skipped` holds only training's own (none)."""
    urls = copy_with_broken_images(synth_dir / "val", tmp_path / "val", broken_shards=1)  # 16 bad, 16 good
    module = LatentVLMModule()
    proc = Processor.for_model(module.model, module.data_layouts()[0])
    batches = list(ShardStream(urls, proc, proc.collate, 16, shuffle_buffer=0, loop=False))
    assert [b.filler for b in batches] == [True, False]
    module.on_validation_epoch_start()
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)  # what Lightning would record
    with torch.no_grad():
        outputs = [module.validation_step(b, i) for i, b in enumerate(batches)]
    module.on_validation_epoch_end()
    assert outputs[0] is None and outputs[1] is not None  # nothing learnt or scored from the filler
    assert logged["data/val_skipped"] == 16
    module.on_train_epoch_end()
    assert logged["data/skipped"] == 0
