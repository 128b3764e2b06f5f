"""Two-process DDP on CPU over gloo, launched through `mmlatent fit` as a user would: every sample is
trained on exactly once per epoch across ranks and workers, every rank takes the same number of steps
(also when the ranks' shards hold different numbers of usable samples), and the resampled mode serves
equal endless streams."""

from __future__ import annotations

import io
import os
import socket
import sys
import tarfile

import pytest

from tests.fit_helpers import REPO, recorded_steps, run_fit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]


@pytest.fixture(scope="module")
def synth_ddp(tmp_path_factory):
    """27 training samples (not a multiple of 2 ranks × batch 4) in 6 shards, one image made undecodable."""
    from mmlatent.data.synthetic import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("synth-ddp")
    synthesize(out, SynthConfig(), train=27, val=8, seed=3, samples_per_shard=5, progress=False)
    shard = sorted((out / "train").glob("*.tar"))[1]
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    bad = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(shard, "w") as tf:
        for m, payload in members:
            payload = b"\x89PNG\r\n\x1a\n not an image" if m.name == bad else payload
            m.size = len(payload)
            tf.addfile(m, io.BytesIO(payload))
    return out, bad.split(".")[0]


def recorder(folder) -> dict:
    return {"class_path": "tests.fit_helpers.KeyRecorder", "init_args": {"out": str(folder / "keys")}}


def test_ddp_trains_every_sample_once_per_epoch_with_equal_steps(tmp_path, synth_ddp):
    data, bad_key = synth_ddp
    out = run_fit(tmp_path, data, *DDP, "--data.num_workers=2", "--trainer.max_epochs=2",
                  callbacks=[recorder(tmp_path)], timeout=420)
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [recorded_steps(tmp_path, rank) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2 * 4  # ⌈27 / (2 × 4)⌉ = 4 steps per epoch on both ranks
    expected = {f"synth-train-{i:08d}" for i in range(27)} - {bad_key}
    for epoch in (0, 1):
        keys = [k for r in ranks for s in r if s["epoch"] == epoch and not s["filler"] for k in s["keys"]]
        assert len(keys) == len(set(keys)), "a sample was trained twice in one epoch"
        assert set(keys) == expected, "a sample was left out of an epoch"
    assert "bad image" in out.stderr  # the undecodable image is counted and logged, not lost silently


def test_ddp_resampled_mode_gives_every_rank_the_same_steps(tmp_path, synth_ddp):
    data, _ = synth_ddp
    out = run_fit(tmp_path, data, *DDP, "--data.num_workers=1", "--data.resampled=true", "--trainer.max_epochs=1",
                  callbacks=[recorder(tmp_path)], timeout=420)
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [recorded_steps(tmp_path, rank) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 27 // (2 * 4)  # full batches of the manifest's 27 samples
    assert all(3 <= len(s["keys"]) <= 4 for r in ranks for s in r)  # 4 drawn; the bad image may be one of them
    assert [s["keys"] for s in ranks[0]] != [s["keys"] for s in ranks[1]]  # each rank draws its own stream


def test_torchrun_launch_script_starts_two_ranks(tmp_path, synth_ddp):
    """`train/launch/torchrun.sh` as documented (here 2 CPU processes on one node): Lightning picks up the
    ranks torchrun sets, and the two ranks read disjoint samples."""
    data, _ = synth_ddp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"GPUS": "2", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}  # torchrun of this environment
    out = run_fit(tmp_path, data, "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--data.num_workers=1",
                  "--trainer.max_steps=2", launcher=["bash", str(REPO / "train" / "launch" / "torchrun.sh")],
                  env=env, callbacks=[recorder(tmp_path)], timeout=420)
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [recorded_steps(tmp_path, rank) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    keys = [set(k for s in r for k in s["keys"]) for r in ranks]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
