"""Weighted mixtures of shard sets: proportions follow the weights (or the set sizes), the stream is
reproducible, the data module uses it for training, bad settings fail naming the field, and the Monet
recipe's mixture config parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmlatent.data.mixture import MixtureConfig, MixtureComponent, MixtureStream, ResolvedSource
from mmlatent.data.processor import Processor, SequenceLayout
from mmlatent.data.shard_writer import RawSample, write_shards
from mmlatent.data.shards import expand_shards
from mmlatent.model.tokenizer import TokenizerConfig, load_tokenizer
from mmlatent.training.datamodule import ShardDataModule
from tests.conftest import REPO


def raw(prefix: str, i: int) -> RawSample:
    meta = {
        "id": f"{prefix}{i}", "source": prefix, "answer": "A",
        "messages": [
            {"role": "user", "content": [{"type": "image", "ref": "img0"}, {"type": "text", "text": f"Q {i}?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
        ],
    }
    return RawSample(key=f"{prefix}{i:04d}", meta=meta, images={"img0": Image.new("RGB", (4, 4), (i % 256, 0, 0))})


def shard_set(folder: Path, prefix: str, n: int, per_shard: int = 10) -> str:
    stats = write_shards((raw(prefix, i) for i in range(n)), folder, samples_per_shard=per_shard, progress=False)
    (folder / "manifest.json").write_text(json.dumps({"written": stats.written}))
    return str(folder)


@pytest.fixture(scope="module")
def processor():
    to_tensor = lambda img: torch.zeros(3, 1, 1)  # noqa: E731
    return Processor(load_tokenizer(TokenizerConfig()), to_tensor, 2, SequenceLayout())


def keys_of(sources: list[ResolvedSource], processor, n_batches: int, seed: int = 0, batch: int = 8) -> list[str]:
    stream = MixtureStream(sources, processor, processor.collate, batch, shuffle_buffer=0,
                           seed=seed)
    it = iter(stream)
    return [k for _ in range(n_batches) for k in next(it).keys]


def resolved(name: str, spec: str, weight: float) -> ResolvedSource:
    return ResolvedSource(name, expand_shards(spec, name, allow_partial=True), weight, None)


def test_samples_follow_the_weights_and_the_stream_is_reproducible(tmp_path, processor):
    a = shard_set(tmp_path / "a", "a", 40)
    b = shard_set(tmp_path / "b", "b", 40)
    sources = [resolved("a", a, 3.0), resolved("b", b, 1.0)]
    keys = keys_of(sources, processor, 50)
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(share_a - 0.75) < 0.07, share_a  # 400 draws: standard error ≈ 0.02
    assert keys == keys_of(sources, processor, 50)  # same seed, same stream
    assert keys != keys_of(sources, processor, 50, seed=1)
    only_b = keys_of([resolved("a", a, 0.0), resolved("b", b, 1.0)], processor, 5)
    assert all(k.startswith("b") for k in only_b)


def test_data_module_trains_on_a_mixture_weighted_by_size(tmp_path, processor):
    a = shard_set(tmp_path / "a", "a", 60, per_shard=60)  # one shard, fewer than the workers: fine here
    b = shard_set(tmp_path / "b", "b", 20)
    dm = ShardDataModule(mixture=MixtureConfig(sources=[MixtureComponent(shards=a), MixtureComponent(shards=b)]),
                         batch_size=4, num_workers=2, shuffle_buffer=16)
    dm.attach_processors(processor, processor)
    loader = dm.train_dataloader()
    assert len(loader) == (60 + 20) // 4
    keys = [k for batch in loader for k in batch.keys]
    assert len(keys) == 80 and {k[0] for k in keys} == {"a", "b"}
    one = MixtureConfig(sources=[MixtureComponent(shards=a, weight=1.0, samples=8)], samples_per_epoch=12)
    dm = ShardDataModule(mixture=one, batch_size=4, num_workers=0)
    dm.attach_processors(processor, processor)
    assert len(dm.train_dataloader()) == 3


def test_bad_mixture_settings_name_the_field(tmp_path, processor):
    a = shard_set(tmp_path / "a", "a", 10)
    bare = tmp_path / "bare"
    write_shards((raw("c", i) for i in range(4)), bare, samples_per_shard=4, progress=False)  # no manifest

    def loader(*sources, **kw):
        dm = ShardDataModule(mixture=MixtureConfig(sources=list(sources), **kw), batch_size=2, num_workers=0)
        dm.attach_processors(processor, processor)
        return dm.train_dataloader()

    with pytest.raises(ValueError, match=r"data.mixture.sources\[1\].shards"):
        loader(MixtureComponent(shards=a), MixtureComponent(shards=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"data.mixture.sources\[1\].shards=.*no manifest.json.*allow_partial"):
        loader(MixtureComponent(shards=a), MixtureComponent(shards=str(bare)))
    with pytest.raises(ValueError, match=r"data.mixture.sources\[1\].weight is None"):
        loader(MixtureComponent(shards=a), MixtureComponent(shards=str(bare), allow_partial=True))
    with pytest.raises(ValueError, match="data.mixture.samples_per_epoch is not set"):
        loader(MixtureComponent(shards=a), MixtureComponent(shards=str(bare), weight=1.0, allow_partial=True))
    with pytest.raises(ValueError, match="data.mixture.sources is empty"):
        loader()


def test_an_unreadable_source_is_a_clear_error(tmp_path, processor):
    a = shard_set(tmp_path / "a", "a", 10)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.tar").write_bytes(b"no tar here" * 100)
    with pytest.raises(RuntimeError, match="mixture source 'bad'"):
        keys_of([resolved("a", a, 1.0), resolved("bad", str(bad), 1.0)], processor, 20)


def test_monet_recipe_mixture_config_parses():
    from jsonargparse import ArgumentParser

    import yaml

    from mmlatent.data.convert import MonetConfig

    recipe = yaml.safe_load((REPO / "datasets" / "monet" / "mixture.yaml").read_text())
    # the model keeps the system turn the converter writes into every sample, for its prompts at inference
    assert recipe.pop("model") == {"vlm": {"system_prompt": MonetConfig(source="").system_prompt}}
    parser = ArgumentParser()
    parser.add_class_arguments(ShardDataModule, "data")
    cfg = parser.parse_object(recipe)
    mixture = parser.instantiate_classes(cfg).data.mixture
    assert isinstance(mixture, MixtureConfig) and len(mixture.sources) == 6
    assert [Path(s.shards).name for s in mixture.sources] == [
        "Visual_CoT", "CogCoM", "ReFocus", "Zebra_CoT_count", "Zebra_CoT_visual_search", "Zebra_CoT_geometry"]
    assert all(isinstance(s, MixtureComponent) and s.weight is None for s in mixture.sources)
