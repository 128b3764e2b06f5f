"""A full disk ends a command with one line naming the file it was writing, wherever the write happens: shards,
checkpoints, teacher caches."""

from __future__ import annotations

import pytest
import torch

from mmlatent.atomic import DiskFull
from tests.io_helpers import fill_the_disk


def test_writing_shards_on_a_full_disk_prints_one_line_naming_the_shard(tmp_path, monkeypatch, capsys):
    from mmlatent.cli import main

    fill_the_disk(monkeypatch)
    code = main(["data", "synth", "--out", str(tmp_path / "synth"), "--train", "4", "--val", "2", "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert f"no space left on the device writing {tmp_path / 'synth' / 'train' / 'shard-000000.tar'}" in err[0]
    assert "MiB free there" in err[0]


def test_a_checkpoint_or_a_teacher_cache_on_a_full_disk_names_the_file(tiny_model, synth_dir, tmp_path, monkeypatch):
    from mmlatent.data.pipeline import ShardStream
    from mmlatent.data.processor import Processor, SequenceLayout
    from mmlatent.training.checkpointing import AtomicCheckpointIO
    from mmlatent.training.teacher import write_teacher_cache

    proc = Processor.for_model(tiny_model, SequenceLayout())
    urls = sorted(str(p) for p in (synth_dir / "val").glob("*.tar"))[:1]
    batch = next(iter(ShardStream(urls, proc, proc.collate, 2, shuffle_buffer=0, loop=False)))
    fill_the_disk(monkeypatch)
    with pytest.raises(DiskFull, match=r"writing .*ckpt/last.ckpt \("):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(100)}, tmp_path / "ckpt" / "last.ckpt")
    with pytest.raises(DiskFull, match=r"writing .*cache/part-000000.safetensors \("):
        write_teacher_cache(tiny_model, [batch], tmp_path / "cache", "observation")


def test_a_native_writer_s_out_of_space_message_names_the_export_folder(tmp_path):
    """safetensors (Rust) reports a full disk in its message only, not as an OSError."""
    from mmlatent.atomic import atomic_folder

    with pytest.raises(DiskFull, match=r"writing .*export \("):
        with atomic_folder(tmp_path / "export"):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, message: \"No space left on device\" })")
    assert not (tmp_path / "export").exists()
