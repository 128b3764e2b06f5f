"""The data module renders the layout its configuration names, and refuses one that is not the model stage's."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from mmlatent.config_io import ConfigError
from mmlatent.data.synthetic import SynthConfig, synthesize
from mmlatent.training.datamodule import ShardDataModule, SplitConfig
from mmlatent.training.module import LatentVLMModule
from mmlatent.training.stages import StageConfig, data_layout, data_teacher_layout


def trainer() -> L.Trainer:
    return L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("dm-synth")
    synthesize(out, SynthConfig(hops=(1, 1)), train=4, val=0, seed=0, samples_per_shard=4, progress=False)
    return str(out / "train")


def module_and_data(shards: str, stage: str, layout_of: str):
    module = LatentVLMModule(stage=StageConfig(name=stage))
    slots = module.vlm_cfg.latent.slots
    given = StageConfig(name=layout_of)
    data = ShardDataModule(train=SplitConfig(shards=shards), val=SplitConfig(shards=""), batch_size=2, num_workers=0,
                           shuffle_buffer=0, layout=data_layout(given, slots), teacher_layout=data_teacher_layout(given, slots))
    return module, data


def test_the_configured_layout_is_what_the_batches_hold(shards):
    module, data = module_and_data(shards, "direct", "direct")
    trainer().fit(module, data)
    assert data.layout.reasoning == "answer_only" and data._processor.layout == data.layout
    batch = next(iter(data.train_dataloader()))
    text = module.model.tokenizer.decode(batch.input_ids[0])
    assert "The answer is" in text and "<observation>" not in text  # the direct layout, not stage 1's chain


def test_a_layout_that_is_not_the_model_stage_s_fails_at_setup_naming_both(shards):
    module, data = module_and_data(shards, "direct", "stage1")
    with pytest.raises(ConfigError, match=r"data.layout.*stage 'direct'.*answer_only"):
        trainer().fit(module, data)


def test_the_default_layout_is_stage_one_s(shards):
    module = LatentVLMModule()
    data = ShardDataModule(train=SplitConfig(shards=shards), val=SplitConfig(shards=""), batch_size=2, num_workers=0)
    assert (data.layout, data.teacher_layout) == module.data_layouts()


def test_validation_renders_without_training_time_augmentation(tiny_model, synth_dir):
    """aux_dropout and the Coconut curriculum's growth shape training's batches only: validation renders every
    sample the same way in every epoch, with its aux images (the Qwen stage-1 recipe sets aux_dropout: 0.1)."""
    from mmlatent.data.processor import SequenceLayout

    image = tiny_model.ids.image
    layout = SequenceLayout(aux_dropout=1.0, coconut_growth=1)  # every sample without aux images in training
    data = ShardDataModule(train=SplitConfig(shards=str(synth_dir / "val")), val=SplitConfig(shards=str(synth_dir / "val")),
                           batch_size=32, num_workers=0, shuffle_buffer=0, layout=layout)
    data.attach_model(tiny_model)
    train, val = next(iter(data.train_dataloader())), next(iter(data.val_dataloader()))
    per_image = tiny_model.tokens_per_image
    assert int((train.input_ids == image).sum()) == 32 * per_image  # the question images only
    assert int((val.input_ids == image).sum()) > 32 * per_image  # the aux images are there
    loader = data.val_dataloader()
    loader.set_epoch(3)  # the curriculum would have replaced three steps by now
    assert torch.equal(next(iter(loader)).input_ids, val.input_ids)
