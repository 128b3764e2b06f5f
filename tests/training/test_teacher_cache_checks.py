"""A teacher cache that cannot serve the run is known before step 1 and reported in one line naming the file:
one for the other stage, one of another model, a damaged part, one that lacks samples of the splits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mmlatent.config_io import ConfigError
from mmlatent.data.pipeline import ShardStream
from mmlatent.data.processor import Processor
from mmlatent.training.stages import StageConfig, TeacherConfig, build_stage
from tests.conftest import REPO


@pytest.fixture(scope="module")
def stage2_cache(tiny_model, synth_dir, tmp_path_factory):
    """A stage-2 (observation) cache of the tiny model over the synthetic val split's first shard (16 samples,
    2 parts); returns (folder, its keys)."""
    from mmlatent.training.teacher import write_teacher_cache

    layout = build_stage(StageConfig(name="stage2", align_weight=0.0)).teacher_layout(tiny_model.cfg.latent.slots)
    proc = Processor.for_model(tiny_model, layout)
    urls = sorted(str(p) for p in (synth_dir / "val").glob("*.tar"))[:1]
    out = tmp_path_factory.mktemp("cache") / "stage2"
    batches = list(ShardStream(urls, proc, proc.collate, 8, shuffle_buffer=0, loop=False))
    write_teacher_cache(tiny_model, batches, out, "observation", torch.float32)
    return out, [k for b in batches for k in b.keys]


def stage(name: str, cache) -> object:
    return build_stage(StageConfig(name=name, teacher=TeacherConfig(cache=str(cache))))


def test_a_cache_of_the_other_stage_is_refused_naming_it(tiny_model, stage2_cache):
    cache, keys = stage2_cache
    with pytest.raises(ConfigError, match=r"stage2/index.json holds observation states.*--stage stage3"):
        stage("stage3", cache).check_sample_keys(tiny_model, {"val": keys})


def test_a_cache_that_lacks_samples_of_a_split_is_refused_before_step_1(tiny_model, stage2_cache):
    cache, keys = stage2_cache
    stage("stage2", cache).check_sample_keys(tiny_model, {"val": keys})  # complete for val
    with pytest.raises(ConfigError, match=r"no states for 2 of the 18 samples of data.train \(e.g. 'x0'\)"):
        stage("stage2", cache).check_sample_keys(tiny_model, {"val": keys, "train": ["x0", *keys, "x1"]})


def test_a_cache_of_another_model_or_with_a_damaged_part_is_refused(tiny_model, stage2_cache, tmp_path):
    import shutil

    cache, keys = stage2_cache
    other = SimpleNamespace(backbone=SimpleNamespace(num_layers=tiny_model.backbone.num_layers, hidden_size=7))
    with pytest.raises(ConfigError, match=r"model with \d+ layers of width \d+, this model has \d+ of width 7"):
        stage("stage2", cache).check_sample_keys(other, {"val": keys})
    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    part = damaged / "part-000001.safetensors"
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=r"part-000001.safetensors cannot be read"):
        stage("stage2", damaged).check_sample_keys(tiny_model, {"val": keys})


def test_fit_with_a_cache_lacking_the_training_samples_stops_in_one_line(stage2_cache, synth_dir, tmp_path, monkeypatch,
                                                                           capsys):
    from mmlatent.cli import main

    cache, _ = stage2_cache
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "-c", str(REPO / "train/configs/tiny/stage2.yaml"),
                 "--model.init_from=null", "--model.stage.teacher.checkpoint=null", f"--model.stage.teacher.cache={cache}",
                 f"--data.train.shards={synth_dir / 'train'}", f"--data.val.shards={synth_dir / 'val'}",
                 "--data.num_workers=0", "--trainer.enable_progress_bar=false"])
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if "error" in x.lower()]  # besides Lightning's INFO lines
    assert code == 2 and "Traceback" not in err
    assert "no states for 64 of the 64 samples of data.train" in line and str(cache) in line
