"""Shard writing: round trip through webdataset, skip counting, determinism, atomic shards."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmlatent.data.shard_writer import TAR_MTIME, RawSample, encode_image, write_shards


def make_image(i: int, size: int = 8) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")


def make_meta(key: str, refs=("img0",), aux=("aux0",)) -> dict:
    return {
        "id": key,
        "source": "test",
        "messages": [
            {"role": "user", "content": [*({"type": "image", "ref": r} for r in refs), {"type": "text", "text": "Q?"}]},
            {
                "role": "assistant",
                "content": [
                    *({"type": "aux_image", "ref": r} for r in aux),
                    {"type": "text", "text": "<observation>seen</observation> A"},
                ],
            },
        ],
        "answer": "A",
        "choices": ["x", "y"],
        "meta": {"n": 1, "z": [1, 2]},
    }


def make_sample(i: int) -> RawSample:
    key = f"s-{i:04d}"
    return RawSample(key, make_meta(key), {"img0": make_image(i), "aux0": make_image(1000 + i)})


def read_shards(urls: list[str]) -> list[dict]:
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    return list(pipeline)


def test_round_trip_json_and_image_bytes(tmp_path):
    samples = [make_sample(i) for i in range(7)]
    stats = write_shards(samples, tmp_path, samples_per_shard=3, progress=False)
    assert stats.written == 7 and not stats.skipped
    assert [p.rsplit("/", 1)[-1] for p in stats.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]

    read = read_shards(stats.shards)
    assert [r["__key__"] for r in read] == [s.key for s in samples]
    for raw, sample in zip(read, samples):
        assert set(raw) - {"__key__", "__url__", "__local_path__"} == {"json", "img0.png", "aux0.png"}
        assert json.loads(raw["json"]) == sample.meta
        assert raw["json"] == json.dumps(sample.meta, sort_keys=True).encode()
        for ref in ("img0", "aux0"):
            assert raw[f"{ref}.png"] == encode_image(sample.images[ref], "png")
            decoded = np.asarray(Image.open(io.BytesIO(raw[f"{ref}.png"])))
            np.testing.assert_array_equal(decoded, np.asarray(sample.images[ref]))
    # webdataset's own dataset class reads the same thing.
    keys = [r["__key__"] for r in wds.WebDataset(stats.shards, shardshuffle=False)]
    assert keys == [s.key for s in samples]


def test_bytes_images_are_written_as_is_and_formats(tmp_path):
    raw_jpeg = encode_image(make_image(1), "jpeg")
    sample = RawSample("b-1", make_meta("b-1"), {"img0": raw_jpeg, "aux0": make_image(2)}, image_ext="jpg")
    stats = write_shards([sample], tmp_path / "a", image_format="webp", progress=False)
    (raw,) = read_shards(stats.shards)
    assert raw["img0.jpg"] == raw_jpeg
    webp = Image.open(io.BytesIO(raw["aux0.webp"]))
    assert webp.format == "WEBP"
    np.testing.assert_array_equal(np.asarray(webp.convert("RGB")), np.asarray(make_image(2)))  # lossless
    stats = write_shards([sample], tmp_path / "b", image_format="jpeg", progress=False)
    (raw,) = read_shards(stats.shards)
    assert Image.open(io.BytesIO(raw["aux0.jpeg"])).format == "JPEG"


def test_unreferenced_images_are_not_written(tmp_path):
    sample = make_sample(0)
    sample.images["extra"] = make_image(5)
    stats = write_shards([sample], tmp_path, progress=False)
    (raw,) = read_shards(stats.shards)
    assert "extra.png" not in raw and "img0.png" in raw


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    good = [make_sample(i) for i in range(4)]
    missing = make_sample(10)
    del missing.images["aux0"]
    bad_role = make_sample(11)
    bad_role.meta["messages"][0]["role"] = "robot"
    aux_in_user = make_sample(12)
    aux_in_user.meta["messages"][0]["content"][0]["type"] = "aux_image"
    dotted = make_sample(13)
    dotted.key = "a.b"
    dup = make_sample(0)
    wrong_type = make_sample(14)
    wrong_type.images["img0"] = np.zeros((4, 4, 3), np.uint8)  # type: ignore[assignment]
    stream = [good[0], missing, good[1], bad_role, dup, good[2], aux_in_user, dotted, wrong_type, good[3]]
    with caplog.at_level(logging.WARNING, logger="mmlatent.data.shard_writer"):
        stats = write_shards(stream, tmp_path, samples_per_shard=2, progress=False)
    assert stats.written == 4
    assert stats.skipped == {
        "missing_image": 1,
        "bad_role": 1,
        "duplicate_key": 1,
        "aux_outside_assistant": 1,
        "bad_key": 1,
        "bad_image": 1,
    }
    assert "s-0010" in caplog.text and "missing_image" in caplog.text
    read = read_shards(stats.shards)
    assert [r["__key__"] for r in read] == [s.key for s in good]
    assert len(stats.shards) == 2


def test_output_is_byte_deterministic_with_fixed_headers(tmp_path):
    for run in ("a", "b"):
        write_shards([make_sample(i) for i in range(5)], tmp_path / run, samples_per_shard=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) == 3
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / names[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"s-000{i}.{e}" for i in (0, 1) for e in ("aux0.png", "img0.png", "json")]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (TAR_MTIME, 0, 0, "mmlatent", "mmlatent")


def test_interrupted_write_leaves_only_complete_shards(tmp_path):
    def stream():
        for i in range(5):
            yield make_sample(i)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_shards(stream(), tmp_path, samples_per_shard=2, progress=False)
    # Two full shards were committed; the third (1 sample, unfinished) left neither a .tar nor a .tmp.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    assert len(read_shards([str(tmp_path / "shard-000001.tar")])) == 2


def test_no_good_sample_writes_no_shard_and_bad_args(tmp_path):
    stats = write_shards([], tmp_path, progress=False)
    assert stats.written == 0 and stats.shards == [] and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards([], tmp_path, samples_per_shard=0, progress=False)
    with pytest.raises(ValueError, match="image_format"):
        write_shards([], tmp_path, image_format="gif", progress=False)  # type: ignore[arg-type]


def test_prefix_and_progress_bar(tmp_path, capsys):
    stats = write_shards([make_sample(0)], tmp_path, prefix="part", progress=True, desc="demo", total=1)
    assert stats.shards == [str(tmp_path / "part-000000.tar")]
    assert "demo" in capsys.readouterr().err
