"""Fault injection and exact resume: damaged shards, bad images, missing members and overlong samples are
counted and nothing else is lost; a NaN loss skips the step or stops naming the batch; a failed checkpoint
write leaves the last good checkpoint; a run killed with SIGKILL and resumed ends bit for bit where an
uninterrupted run ends."""

from __future__ import annotations

import json
import os
import tarfile

import pytest
import torch
from PIL import Image

from mmlatent.data.pipeline import EpochLoader, ShardStream
from mmlatent.data.processor import Processor, ProcessorConfig, SequenceLayout
from mmlatent.data.shard_writer import RawSample, write_shards
from mmlatent.data.shards import shard_sizes
from mmlatent.data.skips import TAR_EVENTS
from mmlatent.model.tokenizer import TokenizerConfig, load_tokenizer
from mmlatent.training.checkpointing import AtomicCheckpointIO
from tests.fit_helpers import final_state, logged, recorded_steps, run_fit
from tests.io_helpers import fill_the_disk, rewrite

pytestmark = pytest.mark.reliability


def raw(i: int, text: str = "A") -> RawSample:
    meta = {
        "id": f"s{i}", "source": "test", "answer": "A",
        "messages": [
            {"role": "user", "content": [{"type": "image", "ref": "img0"}, {"type": "text", "text": f"Question {i}?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": text}]},
        ],
    }
    return RawSample(key=f"s{i:04d}", meta=meta, images={"img0": Image.new("RGB", (8, 8), (i, 0, 0))})


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TokenizerConfig())


def processor(tok, cfg: ProcessorConfig = ProcessorConfig()) -> Processor:
    return Processor(tok, lambda img: torch.zeros(3, 1, 1), 2, SequenceLayout(), cfg)


def epoch_on_ranks(urls, proc, world: int, batch_size: int, workers: int = 2, epoch: int = 0):
    """Every rank's batches of one epoch (the ranks as separate loaders, as DDP builds them)."""
    out = []
    for rank in range(world):
        stream = ShardStream(urls, proc, proc.collate, batch_size, shuffle_buffer=4, seed=7)
        loader = EpochLoader(stream, workers, rank=rank, world_size=world)
        loader.set_epoch(epoch)
        out.append(list(loader))
    return out


def tally(batches) -> tuple[list[str], dict[str, int]]:
    keys = [k for b in batches if not b.filler for k in b.keys]
    counts: dict[str, int] = {}
    for b in batches:
        for reason, n in b.skipped.items():
            counts[reason] = counts.get(reason, 0) + n
    return keys, counts


def test_damaged_shards_lose_only_what_is_damaged_and_every_rank_takes_equal_steps(tmp_path, tok):
    """Truncated tar, corrupt header, undecodable image, missing image: each counted, every other sample
    trained exactly once, and both ranks run the same number of steps (an all-bad batch becomes a filler)."""
    stats = write_shards((raw(i) for i in range(30)), tmp_path, samples_per_shard=5, progress=False)
    shards = stats.shards  # s0000-s0004 | s0005-s0009 | ... | s0025-s0029
    rewrite(shards[0], lambda n, p: b"\x89PNG\r\n\x1a\n garbage" if n == "s0001.img0.png" else p)
    rewrite(shards[1], lambda n, p: None if n == "s0007.img0.png" else p)
    with tarfile.open(shards[2]) as tf:
        offset = tf.getmember("s0013.img0.png").offset  # a corrupt header: s0013 and after are gone
    data = bytearray(open(shards[2], "rb").read())
    data[offset: offset + 100] = b"\xff" * 100
    open(shards[2], "wb").write(bytes(data))
    with tarfile.open(shards[3]) as tf:
        offset = tf.getmember("s0017.json").offset_data + 10
    data = open(shards[3], "rb").read()
    open(shards[3], "wb").write(data[:offset])  # cut inside s0017: it and what follows are gone

    ranks = epoch_on_ranks(shards, processor(tok), world=2, batch_size=1)
    assert len(ranks[0]) == len(ranks[1])  # equal steps although rank 1's damaged samples differ from rank 0's
    keys, counts = tally([b for r in ranks for b in r])
    assert len(keys) == len(set(keys))  # nothing twice
    lost = {"s0001", "s0007", "s0013", "s0014", "s0017", "s0018", "s0019"}
    assert set(keys) == {f"s{i:04d}" for i in range(30)} - lost
    assert counts["bad_image"] == 1 and counts["missing_image"] >= 1 and counts["corrupt_tar"] == 1
    assert counts["truncated_tar"] == 1
    planned = sum(shard_sizes(shards))  # s0013, s0014, s0018, s0019 have no header left to count
    assert planned == 26  # (the data module reports the gap to the manifest's 30 at start)
    samples_skipped = sum(n for r, n in counts.items() if r not in TAR_EVENTS)
    assert len(keys) + samples_skipped == planned  # every planned sample is trained on or counted
    assert any(b.filler for r in ranks for b in r)  # steps whose one sample was bad


def test_overlong_samples_are_dropped_or_truncated_by_policy_and_counted(tmp_path, tok):
    long_text = " ".join(["word"] * 200)
    stats = write_shards((raw(i, long_text if i % 3 == 0 else "A") for i in range(9)), tmp_path, samples_per_shard=9,
                         progress=False)
    short = processor(tok)(  # the length of a short sample: the limit sits between short and long ones
        {"key": "x", "meta": raw(1).meta, "images": {"img0": Image.new("RGB", (8, 8))}}).input_ids.numel()
    for policy, kept, reason in (("drop", 6, "too_long"), ("truncate", 9, "truncated")):
        proc = processor(tok, ProcessorConfig(max_length=short + 20, overlong=policy))
        (batches,) = epoch_on_ranks(stats.shards, proc, world=1, batch_size=4, workers=0)
        keys, counts = tally(batches)
        assert len(keys) == kept and counts == {reason: 3}, (policy, counts)
        assert max(b.input_ids.shape[1] for b in batches) <= short + 24  # padded to a multiple of 8


def test_a_checkpoint_write_that_fails_partway_leaves_the_last_good_one(tmp_path, monkeypatch):
    from mmlatent import atomic

    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"step": 1, "w": torch.arange(1000.0)}, path)
    fill_the_disk(monkeypatch)
    with pytest.raises(OSError, match=r"no space left on the device writing .*last.ckpt"):
        io_.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed between the write and the rename
        io_.save_checkpoint({"step": 3, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    back = io_.load_checkpoint(path)
    assert back["step"] == 1 and torch.equal(back["w"], torch.arange(1000.0))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind


@pytest.fixture(scope="module")
def synth_small(tmp_path_factory):
    """23 training samples (not a multiple of any batch) in 5 shards, 8 held out."""
    from mmlatent.data.synthetic import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("synth-small")
    synthesize(out, SynthConfig(), train=23, val=8, seed=5, samples_per_shard=5, progress=False)
    return out


def test_a_nan_loss_skips_the_step_on_policy_skip(tmp_path, synth_small):
    nan = {"class_path": "tests.fit_helpers.NanAt", "init_args": {"step": 2, "out": str(tmp_path / "nan")}}
    out = run_fit(tmp_path, synth_small, "--data.num_workers=0", "--trainer.max_steps=4", callbacks=[nan])
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads((tmp_path / "nan" / "nan_step.json").read_text())
    assert seen["after"] == seen["before"]  # no optimiser step, no AdamW drift
    assert "non-finite loss at step 2" in out.stderr and seen["keys"][0] in out.stderr
    assert logged(tmp_path, "train/skipped_steps")
    weights = final_state(tmp_path)["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values())  # training went on from clean weights
    assert final_state(tmp_path)["global_step"] == 4


def test_a_nan_loss_stops_naming_step_and_keys_on_policy_stop(tmp_path, synth_small):
    nan = {"class_path": "tests.fit_helpers.NanAt", "init_args": {"step": 1, "out": str(tmp_path / "nan")}}
    out = run_fit(tmp_path, synth_small, "--data.num_workers=0", "--trainer.max_steps=4",
                  "--model.fault.nonfinite_loss=stop", callbacks=[nan])
    assert out.returncode != 0
    assert "FloatingPointError: non-finite loss at step 1 (epoch 0, batch 1)" in out.stderr, out.stderr[-3000:]
    assert "batch keys: rank 0: ['" in out.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_then_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path, synth_small, workers):
    """Two epochs of 6 steps (23 samples, batch 4, shuffled, 1 or 2 data-loader workers): killed with SIGKILL at
    step 9 (last checkpoint: step 8, mid-epoch), resumed with --ckpt_path=last. Same samples per step, same
    losses, the same final weights and optimiser state, bit for bit."""
    rec = lambda d: {"class_path": "tests.fit_helpers.KeyRecorder", "init_args": {"out": str(d / "keys")}}  # noqa: E731
    common = [f"--data.num_workers={workers}", "--trainer.max_epochs=2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    out = run_fit(whole, synth_small, *common, callbacks=[rec(whole)])
    assert out.returncode == 0, out.stderr[-3000:]
    kill = {"class_path": "tests.fit_helpers.FailAt", "init_args": {"step": 9, "how": "kill"}}
    out = run_fit(cut, synth_small, *common, callbacks=[rec(cut), kill])
    assert out.returncode == -9, out.stderr[-3000:]
    out = run_fit(cut, synth_small, *common, "--ckpt_path=last", callbacks=[rec(cut)])
    assert out.returncode == 0, out.stderr[-3000:]

    steps_whole, steps_cut = recorded_steps(whole), recorded_steps(cut)
    assert [s["keys"] for s in steps_cut] == [s["keys"] for s in steps_whole] and len(steps_whole) == 12
    for epoch in (0, 1):  # every sample once per epoch
        keys = [k for s in steps_whole if s["epoch"] == epoch for k in s["keys"]]
        assert len(keys) == len(set(keys)) == 23
    losses = logged(whole, "train/loss")
    assert sorted(losses) == list(range(12))
    resumed = logged(cut, "train/loss", last_version=True)  # the killed run may not have flushed its log
    assert sorted(resumed) == list(range(8, 12)) and resumed == {s: losses[s] for s in resumed}
    a, b = final_state(whole), final_state(cut)
    assert a["global_step"] == b["global_step"] == 12
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(a["optimizer"][i][n], b["optimizer"][i][n]) for i in a["optimizer"] for n in a["optimizer"][i])


def test_last_checkpoint_is_the_latest_state_when_the_monitored_metric_stops_improving(tmp_path, synth_small):
    """Lightning 2.6 alone would leave last.ckpt at the first epoch here (mode=max on a falling loss: no
    later top-k save); `LatestCheckpoint` keeps it at the run's last step, which resume and init_from read.
    The cross-entropy is monitored: the recipe's selection loss can rise in the first steps, the CE falls."""
    best = {"class_path": "mmlatent.training.checkpointing.LatestCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "best"), "monitor": "val/ce_loss", "mode": "max", "save_top_k": 1,
                          "save_last": True, "filename": "{epoch}-{step}"}}
    out = run_fit(tmp_path, synth_small, "--data.num_workers=0", "--trainer.max_epochs=3",
                  "--trainer.limit_train_batches=2", callbacks=[best], limit_val_batches=1)
    assert out.returncode == 0, out.stderr[-3000:]
    last = torch.load(tmp_path / "best" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6
    assert [p.name for p in (tmp_path / "best").glob("epoch=*")] == ["epoch=0-step=2.ckpt"]  # top-k unchanged
