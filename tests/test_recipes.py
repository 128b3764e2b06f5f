"""Every recipe under `train/configs`, run as its header says, one training step per stage (marker `recipes`).

The real recipes (Qwen2.5-VL-3B native, SigLIP + Qwen2.5-0.5B composed) build their released
architectures with random weights from `mmlatent.model.architectures`, saved as a Hub repository holds
them and loaded through the recipe's own `name_or_path` fields: the real hidden sizes, heads, vision
tower, image processor and tokens per image, with one decoder layer and one vision block (the full-size
models are `benchmarks/rehearsal.py`'s; SigLIP's tower keeps its 12 blocks: open_clip's timm-based towers take
no depth override) and the small synthetic vocabulary. They train on Monet-layout
shards (two question and two aux images, up to 1024 px: `mmlatent.data.layout_samples`) at the recipe's
image size; stage 2 and 3 start from the previous stage's `last.ckpt` at the recipe's paths, with the
teacher the recipe names (online, or the cache `mmlatent teacher` writes as the header says). The Qwen
recipes keep their `FSDP2Strategy` (one process here). The only overrides are the machine's (CPU, one
device), the data paths, the model folders, one step and a batch of 2. On a machine without a GPU, a
GPU recipe run unchanged stops with a one-line error saying so. The tiny recipes run on synthetic shards.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO

pytestmark = [pytest.mark.recipes, pytest.mark.slow]

CONFIGS = REPO / "train" / "configs"
CHAINS = {
    "tiny": ["stage1.yaml", "stage2.yaml", "stage3.yaml", "direct.yaml", "cot.yaml"],
    "qwen2_5_vl_3b": ["stage1.yaml", "stage2.yaml", "stage3.yaml"],
    "siglip_qwen2_5_0_5b": ["stage1.yaml", "stage2.yaml", "stage3.yaml"],
}
"""Each recipe folder's files in the order they run (a later stage starts from an earlier one's checkpoint)."""
COMMON = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
          "--trainer.num_sanity_val_steps=0", "--trainer.accumulate_grad_batches=1", "--trainer.enable_progress_bar=false",
          "--trainer.log_every_n_steps=1", "--data.num_workers=0", "--data.batch_size=2", "--data.shuffle_buffer=0"]
FILES = sorted(p.relative_to(CONFIGS).as_posix() for p in [*CONFIGS.glob("*.yaml"), *CONFIGS.glob("*/*.yaml")])
"""Every recipe file (a glob that follows the `tiny` folder's symlink, which `rglob` does not)."""
LAYOUT_DATA = ["--data.train.shards=data/layout/train", "--data.val.shards=data/layout/val"]


def mmlatent(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "mmlatent", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def recipe_overrides(folder: str) -> list[str]:
    """What this machine changes in a recipe: the model folders written below, the data, CPU, one step."""
    if folder == "qwen2_5_vl_3b":
        return [*COMMON, *LAYOUT_DATA, "--model.vlm.native.name_or_path=models/qwen2_5_vl_3b",
                "--model.vlm.tokenizer.name_or_path=models/qwen2_5_vl_3b"]
    if folder == "siglip_qwen2_5_0_5b":
        return [*COMMON, *LAYOUT_DATA, "--model.vlm.lm.name_or_path=models/qwen2_5_0_5b",
                "--model.vlm.tokenizer.name_or_path=models/qwen2_5_0_5b", "--model.vlm.vision.pretrained=null"]
    return [*COMMON, "--data.batch_size=4"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A working folder like a user's: data/ (synthetic and layout shards), models/ (the random releases)."""
    from mmlatent.data.layout_samples import write_layout_shards
    from mmlatent.data.synthetic import SynthConfig, synthesize
    from mmlatent.model.architectures import write_random_model
    from mmlatent.model.tokenizer import TokenizerConfig, load_tokenizer
    from mmlatent.cache import synthetic_tokenizer_dir

    root = tmp_path_factory.mktemp("recipes")
    synthesize(root / "data" / "synth", SynthConfig(), train=8, val=4, seed=2, samples_per_shard=4, progress=False)
    write_layout_shards(root / "data" / "layout" / "train", 4, seed=0, name="layout-train")
    write_layout_shards(root / "data" / "layout" / "val", 2, seed=100, name="layout-val")
    tokenizer = synthetic_tokenizer_dir(TokenizerConfig().synthetic_vocab_size)
    vocab = len(load_tokenizer(TokenizerConfig()))
    for folder, name in (("qwen2_5_vl_3b", "Qwen/Qwen2.5-VL-3B-Instruct"), ("qwen2_5_0_5b", "Qwen/Qwen2.5-0.5B-Instruct")):
        write_random_model(name, root / "models" / folder, tokenizer, text_layers=1, vision_layers=1, vocab_size=vocab,
                           dtype="float32")
    return root


def test_the_chains_cover_every_recipe_file():
    assert set(FILES) == {f"{folder}/{name}" for folder, names in CHAINS.items() for name in names}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs GPU recipes")
@pytest.mark.parametrize("config", FILES)
def test_a_gpu_recipe_on_this_cpu_machine_says_so_in_one_line(config, tmp_path):
    if yaml.safe_load((CONFIGS / config).read_text())["trainer"]["accelerator"] != "gpu":
        pytest.skip("a CPU recipe")
    out = mmlatent(tmp_path, "fit", "-c", str(CONFIGS / config))
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["mmlatent fit: error: trainer.accelerator=gpu: this machine has no CUDA GPU; to run on its CPU: "
                      "--trainer.accelerator=cpu --trainer.devices=1 --trainer.strategy=auto"]
    assert not (tmp_path / "runs").exists()  # stopped before building anything


def logged_losses(run_dir: Path) -> list[float]:
    """`train/loss` of a run's CSV or TensorBoard log."""
    for metrics in run_dir.rglob("metrics.csv"):
        return [float(r["train/loss"]) for r in csv.DictReader(open(metrics)) if r.get("train/loss")]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run_dir.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def shape_of(ckpt: Path, suffix: str) -> tuple[int, ...]:
    from mmlatent.training.checkpoint_reader import read_checkpoint

    state = read_checkpoint(ckpt)["state_dict"]
    return tuple(next(v.shape for k, v in state.items() if k.endswith(suffix)))


@pytest.mark.parametrize("folder", sorted(CHAINS))
def test_every_stage_of_the_recipe_trains_one_step_at_its_real_shapes(workspace, folder):
    for name in CHAINS[folder]:
        recipe = CONFIGS / folder / name
        cfg = yaml.safe_load(recipe.read_text())
        teacher = cfg["model"].get("stage", {}).get("teacher", {})
        if teacher.get("cache"):  # the header's `mmlatent teacher` command, before the stage
            stage = cfg["model"]["stage"]["name"]
            previous = cfg["model"]["init_from"]
            done = mmlatent(workspace, "teacher", "--stage", stage, "--checkpoint", previous, "--shards",
                            "data/layout/train", "data/layout/val", "--out", teacher["cache"], "--batch-size", "2",
                            "--workers", "0")
            assert done.returncode == 0, done.stderr[-3000:]
        done = mmlatent(workspace, "fit", "-c", str(recipe), *recipe_overrides(folder))
        assert done.returncode == 0, f"{folder}/{name}:\n{done.stderr[-4000:]}"
        root = workspace / cfg["trainer"]["default_root_dir"]
        losses = logged_losses(root)
        assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0, (folder, name, losses)
        ckpt = root / "checkpoints" / "last.ckpt"
        assert ckpt.exists(), (folder, name)
    if folder == "qwen2_5_vl_3b":  # the released widths, the recipe's sharded checkpoint
        assert ckpt.is_dir() and shape_of(ckpt, "layers.0.self_attn.q_proj.weight") == (2048, 2048)
        assert shape_of(ckpt, "layers.0.self_attn.k_proj.weight") == (256, 2048)  # 2 KV heads of 128
        assert shape_of(ckpt, "visual.blocks.0.mlp.gate_proj.weight") == (3420, 1280)
    if folder == "siglip_qwen2_5_0_5b":
        assert shape_of(ckpt, "layers.0.self_attn.q_proj.weight") == (896, 896)
        assert shape_of(ckpt, "projector.net.0.weight")[1] == 768 * 4  # ViT-B width, 2x2 pixel shuffle
