"""One of each: state that is derived is derived from its one source, and each setting has one name. The loader's
state holds only what a resume reads; prompts are cut at `Batch.starts`; the mixture loader pins memory like the
others; one gradient-checkpointing switch; one name for the remainder policy."""

from __future__ import annotations

import inspect

import pytest
import torch
from PIL import Image

from mmlatent.config_io import ConfigError, from_dict
from mmlatent.data.mixture import MixtureComponent, MixtureConfig
from mmlatent.data.pipeline import EpochLoader, ShardStream
from mmlatent.data.processor import Processor, SequenceLayout
from mmlatent.data.shard_writer import RawSample, write_shards
from mmlatent.model.generation import split_prompts
from mmlatent.model.native_backbone import NativeBackboneConfig
from mmlatent.model.tokenizer import TokenizerConfig, load_tokenizer
from mmlatent.training.datamodule import ShardDataModule, SplitConfig


def raw(i: int) -> RawSample:
    meta = {"id": f"s{i}", "source": "test", "answer": "A", "messages": [
        {"role": "user", "content": [{"type": "image", "ref": "img0"}, {"type": "text", "text": f"Q {i}?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]}
    return RawSample(key=f"s{i:04d}", meta=meta, images={"img0": Image.new("RGB", (4, 4), (i, 0, 0))})


@pytest.fixture(scope="module")
def processor():
    return Processor(load_tokenizer(TokenizerConfig()), lambda img: torch.zeros(3, 1, 1), 2, SequenceLayout())


@pytest.fixture()
def urls(tmp_path):
    return write_shards((raw(i) for i in range(10)), tmp_path, samples_per_shard=5, progress=False).shards


def test_the_loader_state_is_the_epoch_the_steps_and_what_the_plan_depends_on(urls, processor):
    loader = EpochLoader(ShardStream(urls, processor, processor.collate, 2, shuffle_buffer=0), num_workers=2,
                         rank=1, world_size=2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert "ranks" not in state  # every rank's and worker's position follows from the epoch, the steps and the plan
    assert state["steps_done"] == 1 and state["epoch"] == 0
    resumed = EpochLoader(ShardStream(urls, processor, processor.collate, 2, shuffle_buffer=0), num_workers=2,
                          rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert [b.keys for b in resumed] == [b.keys for b in it]  # the rest of the epoch, exactly


def test_a_mid_epoch_resume_with_other_data_settings_names_the_checkpoint_and_what_changed(urls, processor, tmp_path):
    from types import SimpleNamespace

    loader = EpochLoader(ShardStream(urls, processor, processor.collate, 2, shuffle_buffer=0), num_workers=0)
    next(iter(loader))
    state = loader.state_dict()
    folder = str(tmp_path)
    (tmp_path / "manifest.json").write_text('{"written": 10}')
    data = ShardDataModule(train=SplitConfig(shards=folder), val=SplitConfig(shards=""), batch_size=4, num_workers=0,
                           shuffle_buffer=0)
    data.attach_processors(processor, processor)
    data.trainer = SimpleNamespace(ckpt_path="runs/x/last.ckpt", world_size=1, global_rank=0)
    data.load_state_dict({"train_loader": state})
    with pytest.raises(ConfigError, match=r"--ckpt_path=runs/x/last.ckpt: cannot resume .*batch_size: 2 -> 4"):
        data.train_dataloader()


def test_prompts_are_cut_at_the_batch_s_starts(processor):
    """A row whose first real token has the pad token's id is cut where it starts, not at its first non-pad."""
    pad, image = processor.ids.pad, processor.ids.image
    ids = torch.tensor([[pad, pad, 11, 12, 13], [pad, image, image, 21, 22]])  # row 1 starts with a real `pad` id
    starts, lengths = torch.tensor([2, 0]), torch.tensor([2, 4])
    pixels = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    prompts, kept = split_prompts(ids, starts, lengths, pixels, image, 2)
    assert prompts[0].tolist() == [11, 12] and prompts[1].tolist() == [pad, image, image, 21]
    assert kept.shape[0] == 1  # the one image (two tokens) inside row 1's prompt


def test_the_mixture_loader_pins_memory_like_the_others(tmp_path, processor, urls, monkeypatch):
    (tmp_path / "manifest.json").write_text('{"written": 10}')
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    mixture = MixtureConfig(sources=[MixtureComponent(shards=str(tmp_path), weight=1.0)], samples_per_epoch=8)
    for kw in ({"mixture": mixture}, {"train": SplitConfig(shards=str(tmp_path))}):
        data = ShardDataModule(batch_size=2, num_workers=0, pin_memory=True, val=SplitConfig(shards=""), **kw)
        data.attach_processors(processor, processor)
        assert data.train_dataloader().loader.pin_memory is True, kw


def test_one_gradient_checkpointing_switch():
    assert "gradient_checkpointing" not in {f for f in NativeBackboneConfig.__dataclass_fields__}
    old = from_dict(NativeBackboneConfig, {"gradient_checkpointing": False, "freeze_lm": True})  # an older export's
    assert old.freeze_lm is True


def test_one_name_for_the_remainder_policy(urls, processor):
    for callable_ in (ShardStream.__init__, ShardDataModule.__init__):
        params = inspect.signature(callable_).parameters
        assert "remainder" in params and not {"partial_batches", "epoch_remainder"} & set(params)
    stream = ShardStream(urls, processor, processor.collate, 4, shuffle_buffer=0, loop=False, remainder="drop")
    assert [len(b) for b in stream] == [4, 4]  # 10 samples: the last 2 left out
