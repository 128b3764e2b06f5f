"""`make demo`: the whole pipeline on the tiny default, on CPU, with no network, and what it shows.

1. synthetic shards: a training split of distinct samples (every step sees new ones), a validation split for
   the learning curves, and a held-out test split used for the final numbers only;
2. stage 1 (SFT teacher), stage 2 (latent distillation), stage 3 (latent only), each from the previous
   checkpoint, through `mmlatent fit` with the tiny recipes shipped in the package (`mmlatent/recipes/tiny`);
3. two baselines, each with as many optimiser steps as stages 1-3 together: direct answers, and a
   chain of thought in text trained without aux images (what it must write at test time);
4. evaluation on the test split through `mmlatent eval`'s runner (`synthetic` task): direct, CoT
   and latent (stage 3, which opens its latent blocks itself), each accuracy with a Wilson
   95% interval; the latent model again under each intervention (latent inputs zeroed, replaced by noise of
   their norm, swapped with another question's), its trigger rate, and where its thoughts look
   (`selection_on_path`);
5. `curves.png` (loss and validation accuracies against step for every stage), `latent_block.png` (a test
   question the latent model answers correctly), and the stage-3 model exported and loaded back.
It prints a table and writes `OUT/results.json`. A stage whose checkpoint exists is skipped, so a re-run
continues where it stopped (delete OUT to start afresh). Every setting is in `DemoConfig`; nothing is tuned
on the test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import yaml

from mmlatent.data.synthetic import SynthConfig, TaskMix, synthesize
from mmlatent.data.synthetic_tokenizer import build_synthetic_tokenizer

STAGES = ("stage1", "stage2", "stage3", "direct", "cot")
BASELINES = ("direct", "cot")


def recipe(name: str) -> Path:
    """The tiny recipe `name` (`stage1`, `stage2`, `stage3`, `direct`, `cot`) shipped in the package."""
    path = Path(str(resources.files("mmlatent") / "recipes" / "tiny" / f"{name}.yaml"))
    if not path.is_file():
        raise FileNotFoundError(f"tiny recipe {name!r} not found at {path}")
    return path


@dataclass
class DemoConfig:
    """What the demo trains and evaluates."""

    synth: SynthConfig = field(default_factory=lambda: SynthConfig(
        image_size=48, grid_size=3, palette=("red", "green", "blue", "yellow"), num_choices=4,
        task_mix=TaskMix(chase=0.0, walk=1.0), hops=(1, 2), moves="colours", option_order="palette",
    ))
    """The task: colour-move walks from a named cell on a 3x3 grid (see `mmlatent.data.synthetic`)."""
    steps: dict[str, int] = field(default_factory=lambda: {"stage1": 400, "stage2": 100, "stage3": 450})
    """Optimiser steps of stages 1-3; each baseline (direct, CoT) gets their sum."""
    batch_size: int = 32
    """Samples per step in every stage."""
    val: int = 128
    """Validation samples (learning curves; `val_every` steps)."""
    test: int = 500
    """Held-out test questions (the final numbers)."""
    val_every: int = 100
    """Steps between validation passes."""
    seed: int = 0
    """Data and training seed."""

    @property
    def train(self) -> int:
        """Distinct training samples: enough that no run repeats one (the baselines run the longest)."""
        return sum(self.steps.values()) * self.batch_size


def stage_config(name: str, out: Path, data: Path, demo: DemoConfig) -> Path:
    """The tiny recipe of a stage with every path pointed into `out` and the demo's steps (written beside
    the run, as a record of what ran)."""
    cfg = yaml.safe_load(recipe(name).read_text())
    run_dir = out / name
    steps = sum(demo.steps.values()) if name in BASELINES else demo.steps[name]
    trainer = cfg["trainer"]
    trainer.update(default_root_dir=str(run_dir), max_steps=steps, max_epochs=None,
                   val_check_interval=demo.val_every, check_val_every_n_epoch=None)
    trainer["logger"]["init_args"]["save_dir"] = str(run_dir)
    for cb in trainer.get("callbacks", []):
        if cb["class_path"].endswith(("ModelCheckpoint", "LatestCheckpoint")):
            cb["init_args"]["dirpath"] = str(run_dir / "checkpoints")
        if cb["class_path"].endswith("JsonlPredictionWriter"):
            cb["init_args"]["output_dir"] = str(run_dir / "predictions")
    model = cfg["model"]
    previous = {"stage2": "stage1", "stage3": "stage2"}.get(name)
    if previous:
        ckpt = str(checkpoint(out, previous))
        model["init_from"] = ckpt
        if "teacher" in model["stage"]:  # a stage that aligns to its predecessor
            model["stage"]["teacher"] = {"checkpoint": ckpt, "cache": None}
    cfg["seed_everything"] = demo.seed
    cfg["data"].update(batch_size=demo.batch_size, seed=demo.seed)
    cfg["data"]["train"]["shards"] = str(data / "train")
    cfg["data"]["val"]["shards"] = str(data / "val")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{name}.yaml"  # the name it is stored under in the export
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def checkpoint(out: Path, name: str) -> Path:
    return out / name / "checkpoints" / "last.ckpt"


def trained_steps(out: Path, name: str) -> int:
    return int(torch.load(checkpoint(out, name), map_location="cpu", weights_only=True)["global_step"])


def train(name: str, out: Path, data: Path, demo: DemoConfig, step: str) -> None:
    from mmlatent.cli import main as cli_main

    ckpt = checkpoint(out, name)
    if ckpt.exists():
        print(f"{step} {name}: {ckpt} exists, skipped")
        return
    print(f"{step} {name} -> {ckpt}")
    code = cli_main(["fit", "-c", str(stage_config(name, out, data, demo))])
    if code:
        raise SystemExit(f"mmlatent fit {name} failed (exit {code})")


def metrics_csv(out: Path, name: str) -> Path:
    """The CSV log of a stage's latest run."""
    versions = sorted((out / name / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no metrics.csv under {out / name / 'logs'}")
    return versions[-1]


def evaluate_mode(ckpt: Path, data, latent: bool, max_new_tokens: int, intervention: str = "none",
                  return_latents: bool = False, batch_size: int = 50):
    """(summary, records, generated) of a checkpoint on the test questions."""
    from mmlatent.evaluation.runner import EvalConfig, generate_responses, score, summarize
    from mmlatent.training.checkpoint_reader import load_model

    model = load_model(ckpt)
    torch.manual_seed(0)  # the noise intervention draws from torch's generator
    cfg = EvalConfig(batch_size=batch_size, latent=latent, max_new_tokens=max_new_tokens,
                     latent_intervention=intervention, progress=False)
    t0 = time.perf_counter()
    generated = generate_responses(model, data, data.questions, cfg, return_latents=return_latents)
    seconds = time.perf_counter() - t0
    records = score(data.questions, [g.text for g in generated], generated)
    results = summarize(data, records)
    summary = {
        "accuracy": results["acc"], "accuracy_ci95": results["acc_ci95"],
        "tokens_per_answer": results["positions_per_answer"], "seconds_per_question": seconds / len(records),
        "questions": len(records), "unparsed": results["unparsed"], "trigger_rate": results["trigger_rate"],
        "checkpoint": str(ckpt),
    }
    return summary, records, generated, model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="folder for shards, checkpoints and results")
    ap.add_argument("--stage1-steps", type=int, default=None, help="optimiser steps of stage 1 (default: DemoConfig)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    demo = DemoConfig()
    if args.stage1_steps is not None:
        demo.steps["stage1"] = args.stage1_steps
    out = Path(args.out)
    data = out / "data"
    start = time.perf_counter()
    if not (data / "manifest.json").exists():
        print(f"[1/8] writing synthetic shards to {data}")
        synthesize(data, demo.synth, train=demo.train, val=demo.val, test=demo.test, seed=demo.seed,
                   samples_per_shard=1000)
    build_synthetic_tokenizer()
    for i, name in enumerate(STAGES):
        train(name, out, data, demo, f"[{2 + i}/8]")
    print("[7/8] evaluation on the held-out test split")
    results = evaluate_all(out, data, demo)
    print("[8/8] curves, picture, export")
    finish(out, data, demo, results, start)


def evaluate_all(out: Path, data: Path, demo: DemoConfig) -> dict:
    from mmlatent.evaluation.selection import selection_on_path
    from mmlatent.evaluation.tasks import load_eval_data

    test = load_eval_data("synthetic", str(data / "test"))
    results: dict = {}
    results["direct"], *_ = evaluate_mode(checkpoint(out, "direct"), test, latent=False, max_new_tokens=16)
    results["cot"], *_ = evaluate_mode(checkpoint(out, "cot"), test, latent=False, max_new_tokens=160)
    results["latent"], records, generated, model = evaluate_mode(
        checkpoint(out, "stage3"), test, latent=True, max_new_tokens=160, return_latents=True)
    results["interventions"] = {}
    for kind in ("zero", "noise", "swap"):
        summary, *_ = evaluate_mode(checkpoint(out, "stage3"), test, latent=True, max_new_tokens=160, intervention=kind)
        summary["delta"] = summary["accuracy"] - results["latent"]["accuracy"]
        results["interventions"][kind] = summary
    grid = demo.synth.grid_size
    answers = [([(r.block, r.relevance) for r in g.latents or []], q.fields.get("path", [])) for q, g in zip(test.questions, generated)]
    results["latent"].update(selection_on_path(answers, model.backbone.token_grid, grid))
    results["picture_question"] = draw_correct_answer(out, test, records, generated, model, demo)
    return results


def draw_correct_answer(out: Path, test, records, generated, model, demo: DemoConfig) -> str | None:
    """`latent_block.png`: the first test question the latent model answers correctly (with its thoughts)."""
    from mmlatent.visualize import visualize_answer

    for q, r, g in zip(test.questions, records, generated):
        if r["correct"] and g.latents and any(x.relevance is not None for x in g.latents):
            image = test.images(q)[0]
            visualize_answer(image, g.latents, model.backbone.token_grid, out / "latent_block.png",
                             title=f"{q.id}: answered {r['prediction']} (right)", path=[tuple(p) for p in q.fields["path"]],
                             cells=demo.synth.grid_size)
            return q.id
    return None


def finish(out: Path, data: Path, demo: DemoConfig, results: dict, start: float) -> None:
    from mmlatent.evaluation.curves import plot_curves
    from mmlatent.hub.export import export_checkpoint
    from mmlatent.model.latent_vlm import LatentVLM

    plot_curves({name: metrics_csv(out, name) for name in STAGES}, out / "curves.png", chance=1 / demo.synth.num_choices)
    folder = export_checkpoint(checkpoint(out, "stage3"), out / "export",
                               stage_configs=[out / s / f"{s}.yaml" for s in ("stage1", "stage2", "stage3")],
                               overwrite=True)
    LatentVLM.from_pretrained(folder)
    results["config"] = {
        "synthetic": {**json.loads((data / "manifest.json").read_text())["generator"],
                      "train": demo.train, "val": demo.val, "test": demo.test},
        "steps": {s: trained_steps(out, s) for s in STAGES},
        "demo": {k: v for k, v in dataclasses.asdict(demo).items() if k != "synth"},
        "configs": {s: str(out / s / f"{s}.yaml") for s in STAGES},
        "export": str(folder),
        "minutes": round((time.perf_counter() - start) / 60, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'mode':16} {'accuracy':>9} {'95% interval':>15} {'positions/answer':>17} {'s/question':>11}")
    rows = [(m, results[m]) for m in ("direct", "cot", "latent")]
    rows += [(f"latent, {k}", v) for k, v in results["interventions"].items()]
    for mode, r in rows:
        lo, hi = r["accuracy_ci95"]
        print(f"{mode:16} {r['accuracy']:9.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} {r['tokens_per_answer']:17.1f} "
              f"{r['seconds_per_question']:11.4f}")
    lat = results["latent"]
    print(f"\nlatent trigger rate {lat['trigger_rate']:.3f}; thoughts on the question's path "
          f"{lat['selection_on_path']} (chance {lat['chance']})")
    print(f"results: {out / 'results.json'}   curves: {out / 'curves.png'}   picture: {out / 'latent_block.png'}   "
          f"export: {folder}   ({results['config']['minutes']} min)")


if __name__ == "__main__":
    main()
