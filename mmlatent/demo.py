"""`make demo`: the whole pipeline on the tiny default, on CPU, with no network.

1. synthetic shards (pointer chasing on a grid; held-out split never used for training decisions);
2. stage 1 (SFT teacher), stage 2 (latent distillation), stage 3 (latent only), each from the previous;
3. a direct-answer baseline with the same number of optimiser steps as stages 1-3 together;
4. evaluation on the held-out split in three modes: direct, CoT (stage 1 writing its reasoning in text)
   and latent (stage 3), with accuracy, generated positions per answer and seconds per question;
5. export of the stage-3 model to `OUT/export` (a Hub-ready folder, loaded back to check it), and a
   picture of one latent block (`OUT/latent_block.png`).
It prints a table and writes `OUT/results.json`. Each training step is skipped when its checkpoint exists,
so a re-run continues where it stopped (delete OUT to start afresh).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import torch
import yaml

from mmlatent.cli import main as cli_main
from mmlatent.data.synthetic import SynthConfig, TaskMix, synthesize

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train" / "configs" / "tiny"
STAGES = ("stage1", "stage2", "stage3", "direct")


def demo_synth_config() -> SynthConfig:
    """The demo's task: 2-3 hop pointer chasing from a named cell on a 3x3 grid of 16-px cells.

    Named starts and 9 cells keep the visual lookups learnable in a few CPU minutes (DESIGN §2: content
    addressing, as in "start at the framed cell", is the slow phase transition)."""
    return SynthConfig(image_size=48, grid_size=3, task_mix=TaskMix(chase=0.0, walk=1.0), hops=(2, 3))


def stage_config(name: str, out: Path, data: Path, max_epochs: int | None = None, max_steps: int = -1) -> Path:
    """A tiny stage config with every path pointed into `out` (written beside the run, as a record)."""
    cfg = yaml.safe_load((TINY / f"{name}.yaml").read_text())
    run_dir = out / name
    trainer = cfg["trainer"]
    trainer["default_root_dir"] = str(run_dir)
    if max_epochs is not None:
        trainer["max_epochs"] = max_epochs
    trainer["max_steps"] = max_steps
    trainer["logger"]["init_args"]["save_dir"] = str(run_dir)
    for cb in trainer.get("callbacks", []):
        if cb["class_path"].endswith(("ModelCheckpoint", "LatestCheckpoint")):
            cb["init_args"]["dirpath"] = str(run_dir / "checkpoints")
        if cb["class_path"].endswith("JsonlPredictionWriter"):
            cb["init_args"]["output_dir"] = str(run_dir / "predictions")
    model = cfg["model"]
    model["vlm"]["vision"]["image_size"] = demo_synth_config().image_size  # one ViT patch per cell
    previous = {"stage2": "stage1", "stage3": "stage2"}.get(name)
    if previous:
        ckpt = str(checkpoint(out, previous))
        model["init_from"] = ckpt
        model["stage"]["teacher"] = {"checkpoint": ckpt, "cache": None}
    cfg["data"]["train"]["shards"] = str(data / "train")
    cfg["data"]["val"]["shards"] = str(data / "val")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "demo-config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def checkpoint(out: Path, name: str) -> Path:
    return out / name / "checkpoints" / "last.ckpt"


def trained_steps(out: Path, name: str) -> int:
    return int(torch.load(checkpoint(out, name), map_location="cpu", weights_only=True)["global_step"])


def train(name: str, out: Path, data: Path, step: str, **limits) -> None:
    ckpt = checkpoint(out, name)
    if ckpt.exists():
        print(f"{step} {name}: {ckpt} exists, skipped")
        return
    print(f"{step} {name} -> {ckpt}")
    cli_main(["fit", "-c", str(stage_config(name, out, data, **limits))])


@torch.no_grad()
def evaluate(ckpt: Path, data: Path, stage: str, latent: bool, max_new_tokens: int, batch_size: int = 50) -> dict:
    """Accuracy, generated positions per answer and seconds per question of a checkpoint on the held-out split."""
    from tqdm.auto import tqdm

    from mmlatent.data.batch import collate
    from mmlatent.data.pipeline import ShardStream
    from mmlatent.data.processor import Processor
    from mmlatent.evaluation.parsing import choice_letters, parse_multi_choice_response
    from mmlatent.model.generation import GenerationConfig, generate
    from mmlatent.training.checkpoint_io import load_model
    from mmlatent.data.shards import expand_shards, manifest_count
    from mmlatent.training.stages import StageConfig, build_stage

    model = load_model(ckpt)
    layout = build_stage(StageConfig(name=stage, align_weight=0.0)).layout(model.cfg.latent.slots)
    proc = Processor.for_model(model, layout)
    stream = ShardStream(
        expand_shards(str(data / "val"), "val"), proc, partial(collate, pad_id=proc.ids.pad, latent_start_id=proc.ids.latent_start),
        batch_size, shuffle_buffer=0, loop=False, partial_batches=True,
    )
    gen = GenerationConfig(max_new_tokens=max_new_tokens, latent=latent)
    letters = choice_letters(demo_synth_config().num_choices)
    n = correct = positions = unparsed = 0
    seconds = 0.0
    with tqdm(total=manifest_count(str(data / "val")), desc=f"eval {stage}", unit="question") as bar:
        for batch in stream:
            t0 = time.perf_counter()
            outs = generate(model, batch.input_ids, batch.prompt_lengths, batch.pixel_values, gen)
            seconds += time.perf_counter() - t0
            for g, answer in zip(outs, batch.answers):
                letter = parse_multi_choice_response(g.text, letters, {})  # MMMU's official parsing
                unparsed += letter is None
                correct += letter == answer
                positions += g.positions
                n += 1
            bar.update(len(batch))
    return {
        "accuracy": correct / n,
        "tokens_per_answer": positions / n,
        "seconds_per_question": seconds / n,
        "questions": n,
        "unparsed": unparsed,
        "checkpoint": str(ckpt),
    }


def visualize(ckpt: Path, data: Path, path: Path) -> None:
    """The stage-3 model's first held-out latent block as a PNG."""
    from mmlatent.data.batch import collate
    from mmlatent.data.pipeline import ShardStream
    from mmlatent.data.processor import Processor
    from mmlatent.training.checkpoint_io import load_model
    from mmlatent.data.shards import expand_shards
    from mmlatent.training.stages import StageConfig, build_stage
    from mmlatent.visualize import visualize_sample

    model = load_model(ckpt)
    layout = build_stage(StageConfig(name="stage3", align_weight=0.0)).layout(model.cfg.latent.slots)
    proc = Processor.for_model(model, layout)
    stream = ShardStream(expand_shards(str(data / "val"), "val"), proc,
                         partial(collate, pad_id=proc.ids.pad, latent_start_id=proc.ids.latent_start), 1,
                         shuffle_buffer=0, loop=False)
    visualize_sample(model, next(iter(stream)), path)


def export(ckpt: Path, out: Path) -> Path:
    """The stage-3 model as a Hub-ready folder, loaded back through `LatentVLM.from_pretrained`."""
    from mmlatent.hub.export import export_checkpoint
    from mmlatent.model.latent_vlm import LatentVLM

    folder = export_checkpoint(ckpt, out, stage_configs=[TINY / f"{s}.yaml" for s in ("stage1", "stage2", "stage3")], overwrite=True)
    LatentVLM.from_pretrained(str(folder))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="folder for shards, checkpoints and results")
    ap.add_argument("--train", type=int, default=4000, help="synthetic training samples")
    ap.add_argument("--val", type=int, default=400, help="synthetic held-out samples")
    ap.add_argument("--epochs", type=int, nargs=3, default=(3, 1, 2), metavar=("S1", "S2", "S3"), help="epochs of stages 1-3")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    data = out / "data"
    start = time.perf_counter()
    if not (data / "manifest.json").exists():
        print(f"[1/6] writing synthetic shards to {data}")
        synthesize(data, demo_synth_config(), train=args.train, val=args.val, seed=0, samples_per_shard=250)
    for i, (name, epochs) in enumerate(zip(("stage1", "stage2", "stage3"), args.epochs)):
        train(name, out, data, f"[{2 + i}/6]", max_epochs=epochs)
    budget = sum(trained_steps(out, s) for s in ("stage1", "stage2", "stage3"))
    train("direct", out, data, "[5/6]", max_epochs=10_000, max_steps=budget)

    print("[6/6] evaluation on the held-out split, export, visualisation")
    results = {
        "direct": evaluate(checkpoint(out, "direct"), data, "direct", latent=False, max_new_tokens=16),
        "cot": evaluate(checkpoint(out, "stage1"), data, "stage1", latent=False, max_new_tokens=160),
        "latent": evaluate(checkpoint(out, "stage3"), data, "stage3", latent=True, max_new_tokens=160),
    }
    results["config"] = {
        "synthetic": {**json.loads((data / "manifest.json").read_text())["generator"], "train": args.train, "val": args.val},
        "epochs": {"stage1": args.epochs[0], "stage2": args.epochs[1], "stage3": args.epochs[2]},
        "steps": {s: trained_steps(out, s) for s in STAGES},
        "configs": {s: str(out / s / "demo-config.yaml") for s in STAGES},
    }
    folder = export(checkpoint(out, "stage3"), out / "export")
    visualize(checkpoint(out, "stage3"), data, out / "latent_block.png")
    results["config"]["export"] = str(folder)
    results["config"]["minutes"] = round((time.perf_counter() - start) / 60, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'mode':8} {'accuracy':>9} {'positions/answer':>17} {'s/question':>11}")
    for mode in ("direct", "cot", "latent"):
        r = results[mode]
        print(f"{mode:8} {r['accuracy']:9.3f} {r['tokens_per_answer']:17.1f} {r['seconds_per_question']:11.4f}")
    print(f"\nresults: {out / 'results.json'}   export: {folder}   picture: {out / 'latent_block.png'}")


if __name__ == "__main__":
    main()
