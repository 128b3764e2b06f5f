"""The documented recipes, end to end, on corpora hand-made in the real on-disk layouts (issue 14):
- Monet-SFT-125K: every subset converted on its own, as `datasets/monet/convert.sh` does; stage 1 on
  `datasets/monet/mixture.yaml`; `mmlatent teacher` over all the subsets' shards; a few stage-2 steps with
  the cached teacher and the mixture. Alignment loss finite and non-zero.
- Zebra-CoT: two categories with different image columns, converted one at a time as
  `datasets/zebra_cot/convert.sh` shows; the same stages, stage 2 aligning at the observation spans the
  converter made.
The tiny model, a few samples, batch 2, a handful of steps: each run takes seconds.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.data.test_convert_monet import BOXED, image, save_png, text
from tests.data.test_convert_zebra_cot import R, P, TRACE, row, struct, write_zebra

CONFIGS = REPO / "train" / "configs" / "tiny"

pytestmark = pytest.mark.slow


def recipe_subsets(script: Path) -> list[str]:
    """The subsets `convert.sh` loops over, checking it converts each into a folder of its own."""
    source = script.read_text()
    assert '--files "[$subset/train.json]" --out "$OUT/$subset"' in source
    return re.search(r"for subset in ([^;]+); do", source).group(1).split()


def fit(config: str, *overrides: str) -> None:
    from mmlatent.cli import main

    main(["fit", "-c", str(CONFIGS / config), *overrides, "--data.batch_size=2", "--data.num_workers=0",
          "--data.shuffle_buffer=0", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])


def logged(stage: str, name: str) -> list[float]:
    rows = csv.DictReader(open(f"runs/tiny/{stage}/logs/version_0/metrics.csv"))
    return [float(r[name]) for r in rows if r.get(name)]


def teacher_then_stage2(shards: list[str], *data: str, capsys) -> list[float]:
    """Stage 1 → `mmlatent teacher` over `shards` → stage 2 on the cache; the stage-2 alignment losses."""
    from mmlatent.cli import main

    fit("stage1.yaml", *data)
    capsys.readouterr()
    main(["teacher", "--stage", "stage2", "--checkpoint", "runs/tiny/stage1/checkpoints/last.ckpt",
          "--shards", *shards, "--out", "runs/tiny/stage2/teacher", "--dtype", "float32", "--batch-size", "2",
          "--workers", "0"])
    cached = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cached["skipped"] == {} and cached["positions"] == "observation"
    fit("stage2.yaml", *data, "--model.stage.teacher.checkpoint=null",
        "--model.stage.teacher.cache=runs/tiny/stage2/teacher")
    return logged("stage2", "train/align_loss")


def monet_record(subset: str, sid: int, root: Path) -> dict:
    question = f"{subset}/images/q{sid}.png"
    aux = f"{subset}/images/aux{sid}.png"
    save_png(root / question, sid)
    save_png(root / aux, 10 + sid)
    return {
        "data": [
            {"role": "system", "content": [text("You are a helpful assistant.")]},
            {"role": "user", "content": [image(question), text(f"Which colour is cell {sid}?{BOXED}")]},
            {"role": "assistant", "content": [
                text("Zoom in on the cell.<abs_vis_token></abs_vis_token>"), image(aux),
                text(f"<observation>The cell is red.</observation> So the answer is \\boxed{{{'AB'[sid]}}}."),
            ]},
        ],
        "metadata": {"dataset_name": subset, "sample_id": sid},  # the same ids in every subset
    }


def test_monet_recipe_convert_each_subset_teacher_cache_and_stage2(tmp_path, monkeypatch, capsys):
    from mmlatent.cli import main

    root = tmp_path / "Monet-SFT-125K"
    subsets = recipe_subsets(REPO / "datasets" / "monet" / "convert.sh")
    assert len(subsets) == 6
    for subset in subsets:
        (root / subset).mkdir(parents=True)
        (root / subset / "train.json").write_text(json.dumps([monet_record(subset, i, root) for i in range(2)]))
    monkeypatch.chdir(tmp_path)
    for subset in subsets:  # as datasets/monet/convert.sh runs them, one conversion per subset
        assert main(["data", "convert", "monet", "--source", str(root), "--files", f"[{subset}/train.json]",
                     "--out", f"data/monet/{subset}", "--image_format", "jpeg", "--max_image_size", "64",
                     "--samples_per_shard", "1000", "--workers", "0", "--progress", "false"]) == 0
    mixture = str(REPO / "datasets" / "monet" / "mixture.yaml")
    data = ("-c", mixture, "--data.val.shards=data/monet/ReFocus", "--data.mixture.samples_per_epoch=6")
    align = teacher_then_stage2([f"data/monet/{s}" for s in subsets], *data, capsys=capsys)
    assert len(align) == 3 and all(math.isfinite(v) and v > 0 for v in align), align


def test_zebra_cot_recipe_convert_each_category_teacher_cache_and_stage2(tmp_path, monkeypatch, capsys):
    from mmlatent.cli import main

    root = tmp_path / "Zebra-CoT"
    write_zebra(root / "Visual Logic - Maze" / "train-00000-of-00001.parquet",
                [row(f"{P(1)} Maze {i}: which exit?", TRACE, "ABC"[i], problem_image_1=struct(i),
                     reasoning_image_1=struct(10 + i), reasoning_image_2=struct(20 + i)) for i in range(3)],
                ["problem_image_1", "reasoning_image_1", "reasoning_image_2"])
    write_zebra(root / "2D Visual Reasoning - Visual Jigsaw" / "train-00000-of-00001.parquet",
                [row(f"{P(1)} {P(2)} Piece {i}: which fits?", f"THOUGHT 0: Try the first. {R(1)} THOUGHT 1: "
                     f"The first piece leaves a gap. So the second.", "$\\boxed{2}$", problem_image_1=struct(30 + i),
                     problem_image_2=struct(40 + i), reasoning_image_1=struct(50 + i)) for i in range(3)],
                ["problem_image_1", "problem_image_2", "reasoning_image_1"])
    monkeypatch.chdir(tmp_path)
    outs = []
    for category, out in (("Visual Logic - Maze", "data/zebra_cot/maze"),
                          ("2D Visual Reasoning - Visual Jigsaw", "data/zebra_cot/jigsaw")):
        assert main(["data", "convert", "zebra_cot", "--source", str(root), "--files", f'["{category}/*.parquet"]',
                     "--out", out, "--max_image_size", "64", "--workers", "0", "--progress", "false"]) == 0
        outs.append(out)
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text("data:\n  mixture:\n    sources:\n" + "".join(f"      - shards: {o}\n" for o in outs))
    data = ("-c", str(mixture), "--data.val.shards=data/zebra_cot/jigsaw", "--data.mixture.samples_per_epoch=6")
    align = teacher_then_stage2(outs, *data, capsys=capsys)
    assert len(align) == 3 and all(math.isfinite(v) and v > 0 for v in align), align
