"""FSDP2 on two CPU processes (gloo), through Lightning's `ModelParallelStrategy` (`FSDP2Strategy`): stages 1,
2 (online teacher, latent-only alignment: a second LM forward and `autograd.grad` inside the step) and 3 of
the tiny-demo model, against a single process on the same global batches (`fsdp_run.py`):
- the losses of every micro-batch agree to float tolerance, and so do the weights after four steps;
- a sharded checkpoint resumes bit-identically (stage 2);
- a sharded stage-3 checkpoint exports to the same folder the single-process run writes;
- each rank generates answers for its own samples (decoding different numbers of steps).
Plus the strategy's own behaviour: `--trainer.strategy=fsdp2` through `mmlatent fit`, and its one-line
refusal of Lightning's tensor-parallel mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fit_helpers import REPO

pytestmark = [pytest.mark.distributed, pytest.mark.fsdp2, pytest.mark.slow]

WEIGHT_ATOL = 1e-4
"""Weights after four AdamW steps at lr 1e-3 (each step moves a weight by up to ~1e-3): a tenth of a step."""


def train(out: Path, stage: str, devices: int, data: Path, *extra: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "tests.training.fsdp_run", "--stage", stage, "--devices", str(devices),
           "--data", str(data), "--out", str(out), *extra]
    done = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def losses(out: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (out / f"losses.rank{rank}.jsonl").read_text().splitlines()]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from mmlatent.training.checkpoint_reader import model_state, read_checkpoint

    return model_state(read_checkpoint(ckpt))


def assert_same_training(fsdp: Path, single: Path) -> None:
    """Rank r's micro-batch i of an epoch is the single process's micro-batch 2i + r (whose recorded loss
    Lightning has divided by the 2 accumulated batches); the final weights agree."""
    ref = losses(single, 0)
    for rank in (0, 1):
        for line in losses(fsdp, rank):
            twin = next(x for x in ref if x["epoch"] == line["epoch"] and x["batch"] == 2 * line["batch"] + rank)
            assert twin["keys"] == line["keys"]
            assert line["loss"] == pytest.approx(2 * twin["loss"], rel=1e-5, abs=1e-6), (rank, line)
    a, b = weights(fsdp / "ckpt" / "epoch=1.ckpt"), weights(single / "ckpt" / "epoch=1.ckpt")
    assert a.keys() == b.keys()
    for name in a:  # AdamW divides each gradient by its own scale: float noise of ~0 gradients moves a weight
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=WEIGHT_ATOL, msg=name)  # by a bit of the lr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both ways of training stages 1 -> 2 -> 3; each later stage starts from (and is taught by) the single
    process's previous stage, so both ways of a stage start from the same weights."""
    from mmlatent.data.synthetic import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("fsdp2")
    data = root / "synth"
    synthesize(data, SynthConfig(), train=16, val=4, seed=5, samples_per_shard=8, progress=False)
    out: dict[str, Path] = {}
    previous: list[str] = []
    for stage, sharded in (("stage1", []), ("stage2", ["--sharded"]), ("stage3", ["--sharded", "--predict"])):
        out[f"{stage}-single"] = train(root / f"{stage}-single", stage, 1, data, *previous)
        out[stage] = train(root / stage, stage, 2, data, *previous, *sharded)
        ckpt = str(out[f"{stage}-single"] / "ckpt" / "epoch=1.ckpt")
        previous = ["--init-from", ckpt, "--teacher", ckpt]
    out["data"] = data
    return out


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_fsdp2_trains_like_one_process_on_the_same_global_batches(runs, stage):
    assert_same_training(runs[stage], runs[f"{stage}-single"])
    sharded = stage != "stage1"
    assert (runs[stage] / "ckpt" / "epoch=1.ckpt").is_dir() == sharded  # stage 1 consolidated, later ones sharded


def test_each_rank_generates_its_own_answers_under_fsdp2(runs):
    """Generation decodes a different number of steps on each rank; with every unit gathered it needs no
    collective per step, so both ranks finish (after stage 3's training, in the same processes)."""
    for rank in (0, 1):
        answers = json.loads((runs["stage3"] / f"predictions.rank{rank}.json").read_text())
        keys = [k for line in losses(runs["stage3"], rank) if line["epoch"] == 0 for k in line["keys"]]
        assert [a["key"] for a in answers] == keys and all(a["positions"] > 0 for a in answers)


def test_sharded_checkpoint_resumes_bit_identically(runs, tmp_path):
    """Stage 2 resumed from its epoch-0 sharded checkpoint ends with the uninterrupted run's weights, bit for
    bit, after the same losses."""
    stage1 = str(runs["stage1-single"] / "ckpt" / "epoch=1.ckpt")
    resumed = train(tmp_path / "resumed", "stage2", 2, runs["data"], "--init-from", stage1, "--teacher", stage1,
                    "--sharded", "--resume", str(runs["stage2"] / "ckpt" / "epoch=0.ckpt"))
    for rank in (0, 1):
        again = [(x["keys"], x["loss"]) for x in losses(resumed, rank)]
        first = [(x["keys"], x["loss"]) for x in losses(runs["stage2"], rank) if x["epoch"] == 1]
        assert again == first
    a, b = weights(resumed / "ckpt" / "epoch=1.ckpt"), weights(runs["stage2"] / "ckpt" / "epoch=1.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_exports_the_folder_a_single_process_writes(runs, tmp_path):
    """The same files; every file but the weights byte-identical; the weights equal to float tolerance."""
    from mmlatent.hub.export import export_checkpoint
    from safetensors.torch import load_file

    folders = [export_checkpoint(runs[name] / "ckpt" / "epoch=1.ckpt", tmp_path / name / "export")  # one model name
               for name in ("stage3", "stage3-single")]
    files = [sorted(p.relative_to(f).as_posix() for p in f.rglob("*") if p.is_file()) for f in folders]
    assert files[0] == files[1]
    for name in files[0]:
        a, b = (f / name for f in folders)
        if name.endswith(".safetensors"):
            x, y = load_file(a), load_file(b)
            assert x.keys() == y.keys()
            for key in x:
                torch.testing.assert_close(x[key], y[key], rtol=1e-4, atol=WEIGHT_ATOL, msg=f"{name}: {key}")
        else:
            assert a.read_bytes() == b.read_bytes(), name


def test_mmlatent_fit_takes_fsdp2_by_name(tmp_path, runs):
    """`--trainer.strategy=fsdp2` on the command line: two ranks, a sharded `last.ckpt` folder that resumes."""
    from tests.fit_helpers import run_fit

    out = run_fit(tmp_path, runs["data"], "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=fsdp2",
                  "--data.num_workers=0", "--trainer.max_steps=2", timeout=420)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "ckpt" / "last.ckpt" / "meta.pt").is_file()
    assert weights(tmp_path / "ckpt" / "last.ckpt")


def test_lightnings_tensor_parallel_mesh_is_refused_in_one_line():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from mmlatent.model.presets import preset
    from mmlatent.training.module import LatentVLMModule

    module = LatentVLMModule(vlm=preset("tiny"))
    module._trainer = SimpleNamespace(strategy=ModelParallelStrategy())
    with pytest.raises(ValueError, match="use mmlatent.training.fsdp.FSDP2Strategy"):
        module.configure_model()
