"""`make demo`: the whole pipeline on the tiny default, on CPU, with no network, and a fair test of what it shows.

1. synthetic shards per seed: a training split of distinct samples (no run repeats one), a validation split
   for the curves, a held-out test split (walks of the trained lengths) and a longer-walk split (walks longer
   than any trained), both used for the final numbers only;
2. stage 1 (SFT teacher) -> stage 2 (latent distillation) -> stage 3 (latent only), each from the previous
   checkpoint, through `mmlatent fit` with the tiny recipes shipped in the package (`mmlatent/recipes/tiny`);
3. two baselines, each with as many optimiser steps as stages 1-3 together: direct answers, and a chain of
   thought in text trained without aux images (what it must write at test time);
4. every mode trained on the same information: with the region labels (the cell each step is about) the
   latent blocks get the selection loss and the baselines the attention loss at the tokens that read a cell
   (`DemoConfig.regions`); `--ablation regions` also trains every mode without them;
5. evaluation through `mmlatent eval`'s runner on both splits: accuracy with a Wilson 95% interval and per
   hop count, positions, trigger rate (`demo_eval.py`); beside them the majority-colour heuristic and chance;
   the latent model's interventions (zeroed, noise, swapped latents), its thoughts' selection (strict and
   lenient) and its blocks ended by the model against ended at the trained length; the CoT baseline's
   intervention (the colour word it read replaced);
6. `curves.png`, `latent_block.png`, the stage-3 model exported and loaded back, `results.json`.
`--seeds N` repeats it all for N seeds (data and initialisation) and reports the mean and range per mode. A
run whose checkpoint holds all its steps is skipped (one stopped part-way resumes from it), and so is the evaluation of a variant none of whose runs retrained
(its `results.json`), so a re-run continues where it stopped (delete OUT to start afresh).
Every setting is in `DemoConfig`; nothing is decided on a test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch
import yaml

from mmlatent.atomic import write_text
from mmlatent.data.shard_writer import write_shards
from mmlatent.data.synthetic import SynthConfig, TaskMix, generate_split, synthesize
from mmlatent.data.synthetic_tokenizer import build_synthetic_tokenizer
from mmlatent.demo_eval import checkpoint

STAGES = ("stage1", "stage2", "stage3", "direct", "cot")
BASELINES = ("direct", "cot")
LATENT_STAGES = ("stage1", "stage2", "stage3")
VARIANTS = {"regions": True, "no_regions": False}
"""Variant folder -> whether its runs learn from the region labels."""


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
    longer_hops: tuple[int, int] = (3, 4)
    """Moves of the longer-walk split: longer than any trained walk."""
    steps: dict[str, int] = field(default_factory=lambda: {"stage1": 300, "stage2": 100, "stage3": 300})
    """Optimiser steps of stages 1-3; each baseline (direct, CoT) gets their sum."""
    batch_size: int = 32
    """Samples per step in every stage."""
    val: int = 128
    """Validation samples (learning curves; `val_every` steps)."""
    test: int = 500
    """Held-out test questions of the trained walk lengths (the final numbers)."""
    longer: int = 300
    """Held-out questions of the longer walks (`longer_hops`)."""
    val_every: int = 100
    """Steps between validation passes."""
    seed: int = 1
    """Data and training seed of the first run (`--seeds N` runs seed .. seed + N - 1). No decision was made
    on a test split of these seeds."""
    regions: bool = True
    """The headline runs learn from the region labels: the latent blocks' selection loss, the baselines'
    attention loss. `--ablation regions` also runs every mode without them."""

    @property
    def train(self) -> int:
        """Distinct training samples: enough that no run repeats one (the baselines run the longest)."""
        return sum(self.steps.values()) * self.batch_size

    @property
    def longer_synth(self) -> SynthConfig:
        return replace(self.synth, hops=tuple(self.longer_hops))


def run_steps(name: str, demo: DemoConfig) -> int:
    """Optimiser steps of run `name`: a stage's own, a baseline the sum of the stages'."""
    return sum(demo.steps.values()) if name in BASELINES else demo.steps[name]


def stage_config(name: str, out: Path, data: Path, demo: DemoConfig, regions: bool = True) -> Path:
    """The tiny recipe of a run with every path pointed into `out`, the demo's steps and seed, and its
    grounding weights off when it must learn without the region labels (written beside the run, as a record
    of what ran)."""
    cfg = yaml.safe_load(recipe(name).read_text())
    run_dir = out / name
    steps = run_steps(name, demo)
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
    if not regions:
        grounding = model["stage"].setdefault("grounding", {})
        for weight in ("selection_weight", "attention_weight"):
            if weight in grounding:
                grounding[weight] = 0.0
    cfg["seed_everything"] = demo.seed
    cfg["data"].update(batch_size=demo.batch_size, seed=demo.seed)
    cfg["data"]["train"]["shards"] = str(data / "train")
    cfg["data"]["val"]["shards"] = str(data / "val")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{name}.yaml"  # the name it is stored under in the export
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def trained_steps(out: Path, name: str) -> int:
    return int(torch.load(checkpoint(out, name), map_location="cpu", weights_only=True)["global_step"])


def train(name: str, out: Path, data: Path, demo: DemoConfig, regions: bool, step: str) -> float:
    """Train one run unless its checkpoint exists; returns the minutes it took (0 when skipped)."""
    from mmlatent.cli import main as cli_main

    ckpt = checkpoint(out, name)
    resume = []
    if ckpt.exists():
        done = trained_steps(out, name)
        if done >= run_steps(name, demo):
            print(f"{step} {name}: {ckpt} exists, skipped")
            return 0.0
        print(f"{step} {name}: {ckpt} stopped at step {done}, resumed")  # a run killed part-way
        resume = ["--ckpt_path", str(ckpt)]
    print(f"{step} {name} -> {ckpt}")
    t0 = time.perf_counter()
    code = cli_main(["fit", "-c", str(stage_config(name, out, data, demo, regions)), *resume])
    if code:
        raise SystemExit(f"mmlatent fit {name} failed (exit {code})")
    return (time.perf_counter() - t0) / 60


def metrics_csv(out: Path, name: str) -> Path:
    """The CSV log of a stage's latest run."""
    versions = sorted((out / name / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no metrics.csv under {out / name / 'logs'}")
    return versions[-1]


def write_data(data: Path, demo: DemoConfig) -> None:
    """The seed's shards: train, val and test of the trained walks (`synthesize`), and `longer/` of the longer
    walks (its own split name, so its grids are not the test split's)."""
    file = data / "manifest.json"
    if not file.exists():
        synthesize(data, demo.synth, train=demo.train, val=demo.val, test=demo.test, seed=demo.seed, samples_per_shard=1000)
    manifest = json.loads(file.read_text())
    if "longer" in manifest["splits"]:
        return
    for stale in (data / "longer").glob("shard-*.tar"):  # an unfinished earlier write
        stale.unlink()
    stats = write_shards(generate_split(demo.longer_synth, demo.seed, "longer", demo.longer), data / "longer",
                         samples_per_shard=1000, desc="synth longer", total=demo.longer)
    # listed in the set's manifest like the other splits, so loaders trust the folder as whole
    manifest["splits"]["longer"] = {"written": stats.written, "skipped": dict(sorted(stats.skipped.items())),
                                    "shards": [Path(s).relative_to(data).as_posix() for s in stats.shards],
                                    "generator": dataclasses.asdict(demo.longer_synth)}
    write_text(file, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def run_seed(out: Path, demo: DemoConfig, variants: list[str]) -> dict:
    """Data, training and evaluation of one seed, for each variant; the results of each."""
    from mmlatent.demo_eval import evaluate_variant

    data = out / "data"
    print(f"[seed {demo.seed}] synthetic shards in {data}")
    write_data(data, demo)
    build_synthetic_tokenizer()
    results: dict = {}
    for variant in variants:
        runs = out / variant
        minutes = {}
        for i, name in enumerate(STAGES):
            minutes[name] = round(train(name, runs, data, demo, VARIANTS[variant], f"[seed {demo.seed}, {variant}, {i + 1}/5]"), 2)
        done = runs / "results.json"  # a re-run (e.g. the seeds gathered after parallel runs) reads it
        if done.exists() and not any(minutes.values()):
            print(f"[seed {demo.seed}, {variant}] {done} exists, evaluation skipped")
            results[variant] = json.loads(done.read_text())
            continue
        print(f"[seed {demo.seed}, {variant}] evaluation on the held-out splits")
        t0 = time.perf_counter()
        results[variant] = evaluate_variant(runs, data, demo)
        minutes["evaluation"] = round((time.perf_counter() - t0) / 60, 2)
        results[variant]["minutes"] = minutes
        results[variant]["steps"] = {s: trained_steps(runs, s) for s in STAGES}
        done.write_text(json.dumps(results[variant], indent=2))
    return results


def main(argv: list[str] | None = None, demo: DemoConfig | None = None) -> None:
    """The command line; `demo` replaces the default `DemoConfig` (the tests run it at a tiny size)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="folder for shards, checkpoints and results")
    ap.add_argument("--seeds", type=int, default=1, help="seeds to run (data and initialisation), from the first seed")
    ap.add_argument("--seed", type=int, default=None,
                    help="first seed (default: DemoConfig.seed; seed 0 is the development seed decisions were made on)")
    ap.add_argument("--ablation", choices=["regions"], default=None,
                    help="regions: also train and evaluate every mode without the region labels")
    ap.add_argument("--stage1-steps", type=int, default=None, help="optimiser steps of stage 1 (default: DemoConfig)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    demo = demo or DemoConfig()
    if args.stage1_steps is not None:
        demo.steps["stage1"] = args.stage1_steps
    if args.seed is not None:
        demo.seed = args.seed
    headline = "regions" if demo.regions else "no_regions"
    variants = [headline] + ([v for v in VARIANTS if v != headline] if args.ablation == "regions" else [])
    out = Path(args.out)
    start = time.perf_counter()
    seeds = {}
    for k in range(args.seeds):
        seed_demo = replace(demo, seed=demo.seed + k, steps=dict(demo.steps))
        seeds[seed_demo.seed] = run_seed(out / f"seed{seed_demo.seed}", seed_demo, variants)
    finish(out, demo, seeds, variants, start)


def finish(out: Path, demo: DemoConfig, seeds: dict, variants: list[str], start: float) -> None:
    """Curves, picture and export from the first seed's headline runs; results.json; the printed tables."""
    from mmlatent.demo_eval import across_seeds, print_tables
    from mmlatent.evaluation.curves import plot_curves
    from mmlatent.hub.export import export_checkpoint
    from mmlatent.model.latent_vlm import LatentVLM

    first = out / f"seed{demo.seed}" / variants[0]
    plot_curves({name: metrics_csv(first, name) for name in STAGES}, out / "curves.png", chance=1 / demo.synth.num_choices)
    folder = export_checkpoint(checkpoint(first, "stage3"), out / "export",
                               stage_configs=[first / s / f"{s}.yaml" for s in LATENT_STAGES], overwrite=True)
    LatentVLM.from_pretrained(folder)
    picture = first / "latent_block.png"
    if picture.exists():
        picture.replace(out / "latent_block.png")
    results = {
        "seeds": {str(s): r for s, r in seeds.items()},
        "summary": across_seeds(seeds, variants),
        "config": {
            "synthetic": {**dataclasses.asdict(demo.synth), "train": demo.train, "val": demo.val, "test": demo.test,
                          "longer": demo.longer, "longer_hops": list(demo.longer_hops)},
            "demo": {k: v for k, v in dataclasses.asdict(demo).items() if k != "synth"},
            "variants": variants,
            "export": str(folder),
            "minutes": round((time.perf_counter() - start) / 60, 1),
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_tables(results)
    print(f"results: {out / 'results.json'}   curves: {out / 'curves.png'}   picture: {out / 'latent_block.png'}   "
          f"export: {folder}   ({results['config']['minutes']} min)")


if __name__ == "__main__":
    main()
