"""Skip counts keep lost samples apart from damage events: a truncated tar that cost one sample reads as one
lost sample and one damaged shard read, in the log message and in the metrics (issue 14, item 10)."""

from __future__ import annotations

import tarfile

import torch
from PIL import Image

from mmlatent.data.pipeline import EpochLoader, ShardStream
from mmlatent.data.processor import Processor, SequenceLayout
from mmlatent.data.shard_writer import RawSample, write_shards
from mmlatent.data.skips import SkipSummary
from mmlatent.model.tokenizer import TokenizerConfig, load_tokenizer


def raw(i: int) -> RawSample:
    meta = {
        "id": f"s{i}", "source": "test", "answer": "A",
        "messages": [
            {"role": "user", "content": [{"type": "image", "ref": "img0"}, {"type": "text", "text": f"Question {i}?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
        ],
    }
    return RawSample(key=f"s{i:04d}", meta=meta, images={"img0": Image.new("RGB", (8, 8), (i, 0, 0))})


def test_a_truncated_tar_counts_one_lost_sample_and_one_damage_event(tmp_path):
    stats = write_shards((raw(i) for i in range(10)), tmp_path, samples_per_shard=5, progress=False)
    with tarfile.open(stats.shards[1]) as tf:
        cut = tf.getmember("s0009.json").offset_data + 5
    data = open(stats.shards[1], "rb").read()
    open(stats.shards[1], "wb").write(data[:cut])  # the last sample of the shard is cut short

    tok = load_tokenizer(TokenizerConfig())
    proc = Processor(tok, lambda img: torch.zeros(3, 1, 1), 2, SequenceLayout())
    stream = ShardStream(stats.shards, proc, proc.collate, 2, shuffle_buffer=0, seed=0)
    loader = EpochLoader(stream, 0, rank=0, world_size=1)
    loader.set_epoch(0)
    counts: dict[str, int] = {}
    keys = []
    for batch in loader:
        keys += [] if batch.filler else batch.keys
        for reason, n in batch.skipped.items():
            counts[reason] = counts.get(reason, 0) + n
    assert len(keys) == 9 and "s0009" not in keys  # one sample was lost
    assert counts["truncated_tar"] == 1  # the damage event, mixed into the same counter

    summary = SkipSummary.of(counts)
    assert summary.lost == 1 and summary.damage_events == 1
    assert summary.events == {"truncated_tar": 1} and "truncated_tar" not in summary.samples
    assert summary.metrics() == {"data/skipped": 1.0, "data/damage_events": 1.0, "data/truncated": 0.0}
    assert summary.message().startswith("lost 1 sample by reason {")
    assert "1 damaged shard read {'truncated_tar': 1}" in summary.message()


def test_summary_splits_samples_events_and_kept():
    summary = SkipSummary.of({"bad_image": 2, "unread_after_damage": 3, "corrupt_tar": 1, "read_error": 1,
                              "truncated": 4, "too_long": 0})
    assert summary.samples == {"bad_image": 2, "unread_after_damage": 3}
    assert summary.events == {"corrupt_tar": 1, "read_error": 1} and summary.kept == {"truncated": 4}
    assert summary.metrics() == {"data/skipped": 5.0, "data/damage_events": 2.0, "data/truncated": 4.0}
    assert summary.message() == ("lost 5 samples by reason {'bad_image': 2, 'unread_after_damage': 3}; "
                                 "2 damaged shard reads {'corrupt_tar': 1, 'read_error': 1}")
    assert SkipSummary.of({"truncated": 1}).message() == ""
