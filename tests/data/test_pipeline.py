"""The shard stream: round trip, bad data skipped and counted, exact epochs, clear errors."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mmlatent.data.pipeline import EpochLoader, ShardStream
from mmlatent.data.processor import Processor, SequenceLayout
from mmlatent.data.shard_writer import RawSample, write_shards
from mmlatent.model.tokenizer import TokenizerConfig, load_tokenizer
from mmlatent.training.datamodule import ShardDataModule, SplitConfig

T = 4


def raw(i: int) -> RawSample:
    meta = {
        "id": f"s{i}",
        "source": "test",
        "answer": "A",
        "messages": [
            {"role": "user", "content": [{"type": "image", "ref": "img0"}, {"type": "text", "text": f"Question {i}?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<observation>red</observation> A"}]},
        ],
    }
    return RawSample(key=f"s{i:04d}", meta=meta, images={"img0": Image.new("RGB", (8, 8), (i, 0, 0))})


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.tensor(img.getpixel((0, 0)), dtype=torch.float32).view(3, 1, 1)


@pytest.fixture(scope="module")
def processor():
    return Processor(load_tokenizer(TokenizerConfig()), to_tensor, T, SequenceLayout())


def stream(urls, processor, batch_size=4, **kw) -> ShardStream:
    return ShardStream(urls, processor, processor.collate, batch_size, shuffle_buffer=0, loop=False, **kw)


def read_all(s: ShardStream):
    batches = list(s)
    keys = [k for b in batches if not b.filler for k in b.keys]
    skipped: dict[str, int] = {}
    for b in batches:
        for r, n in b.skipped.items():
            skipped[r] = skipped.get(r, 0) + n
    return batches, keys, skipped


def test_round_trip_every_sample_once(tmp_path, processor):
    stats = write_shards((raw(i) for i in range(12)), tmp_path, samples_per_shard=5, progress=False)
    assert stats.written == 12 and len(stats.shards) == 3
    batches, keys, skipped = read_all(stream(stats.shards, processor, batch_size=3))
    assert sorted(keys) == [f"s{i:04d}" for i in range(12)] and skipped == {}
    b = batches[0]
    assert b.pixel_values.shape == (3, 3, 1, 1)
    assert b.pixel_values[:, 0, 0, 0].tolist() == [float(int(k[1:])) for k in b.keys]  # image i belongs to sample i


def _replace_member(tar_path, member: str, data: bytes) -> None:
    """Rewrite one member of a tar with other bytes (same name): a corrupt image inside a good tar."""
    import tarfile

    members = []
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            members.append((m, tf.extractfile(m).read()))
    with tarfile.open(tar_path, "w") as tf:
        for m, payload in members:
            payload = data if m.name == member else payload
            m.size = len(payload)
            tf.addfile(m, io.BytesIO(payload))


def test_undecodable_image_and_corrupt_tar_are_skipped_and_counted(tmp_path, processor):
    stats = write_shards((raw(i) for i in range(8)), tmp_path, samples_per_shard=4, progress=False)
    _replace_member(stats.shards[0], "s0001.img0.png", b"\x89PNG\r\n\x1a\n not really a png")
    # second shard: cut in the middle of a member, a truncated tar
    data = open(stats.shards[1], "rb").read()
    open(stats.shards[1], "wb").write(data[: len(data) // 2 + 100])
    batches, keys, skipped = read_all(stream(stats.shards, processor, batch_size=1))
    assert skipped.get("bad_image") == 1
    assert skipped.get("truncated_tar") == 1
    assert "s0001" not in keys and {"s0000", "s0002", "s0003", "s0004"} <= set(keys)


def test_corrupt_header_mid_tar_is_counted_not_silent(tmp_path, processor):
    import tarfile

    stats = write_shards((raw(i) for i in range(4)), tmp_path, samples_per_shard=4, progress=False)
    with tarfile.open(stats.shards[0]) as tf:
        offset = tf.getmembers()[4].offset  # header of s0002's first member
    data = bytearray(open(stats.shards[0], "rb").read())
    data[offset : offset + 100] = b"\xff" * 100
    open(stats.shards[0], "wb").write(bytes(data))
    _, keys, skipped = read_all(stream(stats.shards, processor, batch_size=1))
    assert keys == ["s0000", "s0001"] and skipped == {"corrupt_tar": 1}


def test_missing_image_member_is_skipped_and_counted(tmp_path, processor):
    import tarfile

    stats = write_shards((raw(i) for i in range(4)), tmp_path, samples_per_shard=4, progress=False)
    path = stats.shards[0]
    with tarfile.open(path) as tf:
        kept = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.name != "s0002.img0.png"]
    with tarfile.open(path, "w") as tf:
        for m, payload in kept:
            tf.addfile(m, io.BytesIO(payload))
    _, keys, skipped = read_all(stream([path], processor, batch_size=1))
    assert skipped == {"missing_image": 1} and "s0002" not in keys and len(keys) == 3


def test_epoch_loader_gives_every_sample_once_per_epoch(tmp_path, processor):
    stats = write_shards((raw(i) for i in range(7)), tmp_path, samples_per_shard=3, progress=False)
    s = ShardStream(stats.shards, processor, processor.collate, 4, shuffle_buffer=2)
    loader = EpochLoader(s, num_workers=2)  # 7 samples in batches of 4: 2 steps of 4 and 3 samples
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert [len(b) for b in batches] == [4, 3]
        epochs.append([k for b in batches for k in b.keys])
    assert sorted(epochs[0]) == sorted(epochs[1]) == [f"s{i:04d}" for i in range(7)]
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_an_epoch_ends_with_its_workers_and_their_queue_threads_gone(tmp_path, processor):
    """The next epoch forks its workers only once the last epoch's are gone, queue feeder threads
    included (a fork while one is still ending can hang the child: see `_shut_down`)."""
    import threading

    stats = write_shards((raw(i) for i in range(7)), tmp_path, samples_per_shard=3, progress=False)
    loader = EpochLoader(ShardStream(stats.shards, processor, processor.collate, 4, shuffle_buffer=2), num_workers=2)
    before = set(threading.enumerate())
    it = iter(loader)
    next(it)
    assert any(t.name == "QueueFeederThread" for t in set(threading.enumerate()) - before)  # the workers' queues
    rest = list(it)  # the epoch's last batch, then the shut-down
    assert len(rest) == 1
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]
    it = iter(loader)
    next(it)
    it.close()  # an epoch stopped early (a crash, max_steps) shuts its workers down the same way
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]


def test_all_shards_unreadable_is_a_clear_error(tmp_path, processor):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is no tar" * 100)
    with pytest.raises(ValueError, match="every shard is empty or unreadable"):
        EpochLoader(stream([str(bad)], processor), num_workers=0)


def test_fewer_shards_than_workers_still_reads_every_sample_once(tmp_path, processor):
    write_shards((raw(i) for i in range(8)), tmp_path / "train", samples_per_shard=8, progress=False)
    dm = ShardDataModule(train=SplitConfig(shards=str(tmp_path / "train"), samples=8, allow_partial=True), batch_size=2,
                         num_workers=2)
    dm.attach_processors(processor, processor)
    keys = [k for b in dm.train_dataloader() for k in b.keys]  # the workers split one shard by sample
    assert sorted(keys) == [f"s{i:04d}" for i in range(8)]
    dm = ShardDataModule(train=SplitConfig(shards=str(tmp_path / "nothing")), batch_size=2)
    dm.attach_processors(processor, processor)
    with pytest.raises(ValueError, match="data.train.shards"):
        dm.train_dataloader()
