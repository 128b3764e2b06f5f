"""`make demo`: the whole pipeline on the tiny default, on CPU, with no network.

Today it runs: synthetic shards -> stage 1 (SFT teacher) -> validation of the trained checkpoint.
Stages 2 and 3, the direct baseline, evaluation and export join as their issues land.
Each step is skipped when its output already exists, so a re-run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from mmlatent.cli import main as cli_main
from mmlatent.data.synthetic import SynthConfig, synthesize

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train" / "configs" / "tiny"


def stage_config(template: Path, run_dir: Path, data: Path, max_epochs: int) -> Path:
    """Copy a tiny stage config with its paths pointed into `run_dir` (written beside the run, as a record)."""
    cfg = yaml.safe_load(template.read_text())
    cfg["trainer"]["default_root_dir"] = str(run_dir)
    cfg["trainer"]["max_epochs"] = max_epochs
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(run_dir)
    for cb in cfg["trainer"].get("callbacks", []):
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(run_dir / "checkpoints")
    cfg["data"]["train"]["shards"] = str(data / "train")
    cfg["data"]["val"]["shards"] = str(data / "val")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "demo-config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/demo", help="folder for shards, checkpoints and results")
    ap.add_argument("--train", type=int, default=4000, help="synthetic training samples")
    ap.add_argument("--val", type=int, default=400, help="synthetic held-out samples")
    ap.add_argument("--epochs", type=int, default=3, help="stage-1 epochs")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").exists():
        print(f"[1/2] writing synthetic shards to {data}")
        synthesize(data, SynthConfig(), train=args.train, val=args.val, seed=0, samples_per_shard=250)
    stage1 = out / "stage1"
    ckpt = stage1 / "checkpoints" / "last.ckpt"
    print(f"[2/2] stage 1 (SFT teacher) -> {ckpt}")
    config = stage_config(TINY / "stage1.yaml", stage1, data, args.epochs)
    cli_main(["fit", "-c", str(config), *([f"--ckpt_path={ckpt}"] if ckpt.exists() else [])])
    metrics = sorted((stage1 / "logs").glob("version_*/metrics.csv"))[-1]
    print(json.dumps({"stage1_checkpoint": str(ckpt), "metrics": str(metrics)}))


if __name__ == "__main__":
    main()
