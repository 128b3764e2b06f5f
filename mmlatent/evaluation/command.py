"""`mmlatent eval`: run a model on MMMU, ScienceQA or mmlatent shards, or re-score saved responses without a model.

    mmlatent eval --task mmmu --data MMMU/MMMU --split validation --model CKPT_OR_EXPORT_DIR --output OUT \
        [--limit N] [--batch-size B] [--latent | --no-latent] [--open-latent] \
        [--latent-intervention {none,zero,noise,swap}] [--protocol P] [--stop S] \
        [--trajectories M --latent-noise {gaussian,dropout,mc_dropout}]
    mmlatent eval --task synthetic --data data/synth/val --model CKPT --output OUT --latent-intervention zero
    mmlatent eval --task scienceqa --data DIR --responses R.jsonl --output OUT --protocol scienceqa

`--model` takes a Lightning checkpoint (`.ckpt`, read by `training.checkpoint_reader` with `weights_only=True`)
or an exported folder or Hub id (`LatentVLM.from_pretrained`). `--protocol` names the official scorer whose
rules judge the answers (`protocols.py`). It prints the breakdown as the official scripts tabulate it; the
last line printed is a JSON summary. Plain argparse keeps this command independent of the Lightning CLI;
the trade-off is that its options are listed here rather than derived from the config dataclass
(`EvalConfig` still holds their meaning).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mmlatent.evaluation.metrics import breakdown_table
from mmlatent.evaluation.protocols import MMMU_PROTOCOLS, SCIENCEQA_PROTOCOLS
from mmlatent.evaluation.runner import EvalConfig, evaluate, rescore
from mmlatent.evaluation.tasks import TASKS, load_eval_data
from mmlatent.model.generation import LATENT_NOISE
from mmlatent.model.interventions import INTERVENTIONS
from mmlatent.model.latent_vlm import LatentVLM


def load_model(path: str, device: str = "cpu", revision: str | None = None) -> LatentVLM:
    """A `LatentVLM` from a Lightning `.ckpt` (read with `weights_only=True`) or from an exported folder or
    Hub id (`load_pretrained`), in eval mode on `device`."""
    p = Path(path)
    if p.suffix == ".ckpt":
        from mmlatent.training.checkpoint_reader import load_model as load_checkpoint_model

        model = load_checkpoint_model(p)
    elif p.is_dir() and not (p / "config.json").is_file():
        raise ValueError(f"--model {path!r}: a folder without config.json is not an exported model")
    else:
        model = LatentVLM.from_pretrained(path, revision=revision)
    return model.to(device).eval()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmlatent eval",
        description="Score a model on MMMU or ScienceQA with the official answer parsing, or re-score saved "
        "responses. Writes samples.jsonl, results.json, results.png and (MMMU) submission.json to --output.",
    )
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="Benchmark.")
    p.add_argument("--data", default=None, help="Hub dataset id or local folder laid out like the Hub repository "
                   "(default: MMMU/MMMU, derek-thomas/ScienceQA); for shards/synthetic a shard folder or pattern.")
    p.add_argument("--split", default=None, help="Split (MMMU: dev, validation, test; ScienceQA: test, ...). "
                   "Default: validation for MMMU, test for ScienceQA.")
    p.add_argument("--subset", default="full", choices=("full", "img"),
                   help="`img`: only questions with an image (ScienceQA's IMG set).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Lightning .ckpt, exported model folder, or Hub model id.")
    source.add_argument("--responses", help='Re-score without a model: JSON lines of {"id", "response"}.')
    p.add_argument("--output", required=True, help="Output folder.")
    p.add_argument("--limit", type=int, default=None, help="Evaluate the first N questions only.")
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size, help="Questions per generation batch.")
    p.add_argument("--latent", action=argparse.BooleanOptionalAction, default=EvalConfig.latent,
                   help="Allow latent blocks; the model opens them itself (--no-latent: text only).")
    p.add_argument("--open-latent", action="store_true",
                   help="End every prompt with <|latent_start|>: each answer starts in a latent block.")
    p.add_argument("--latent-intervention", choices=INTERVENTIONS, default=EvalConfig.latent_intervention,
                   help="Replace every latent input by zeros, noise of its norm, or another question's latents "
                        "(swap, within a batch) to measure how much the answers depend on them.")
    p.add_argument("--protocol", default=None, choices=sorted({*SCIENCEQA_PROTOCOLS, *MMMU_PROTOCOLS}),
                   help="Whose official rules read the answer: ScienceQA `llava` (default), `scienceqa` (the authors' "
                        "'The answer is X.'), `lmms-eval`; MMMU `mmmu` (default), `lmms-eval`.")
    p.add_argument("--stop", action="append", default=[], metavar="S",
                   help="Cut each answer before this string (repeatable; lmms-eval's `until`, e.g. --stop $'\\n\\n').")
    p.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens,
                   help="Most generated positions per question (text tokens and latent steps).")
    p.add_argument("--trajectories", type=int, default=EvalConfig.trajectories,
                   help="Test-time scaling: trajectories per question, each with its own latent noise; the answer "
                        "is their majority vote (recorded as `votes` in samples.jsonl).")
    p.add_argument("--latent-noise", choices=LATENT_NOISE, default=EvalConfig.latent_noise,
                   help="The trajectories' noise: gaussian or dropout on the latent vectors, or mc_dropout (the "
                        "LQ-Former's dropout active; thought mode).")
    p.add_argument("--noise-std", type=float, default=EvalConfig.noise_std,
                   help="Standard deviation of the Gaussian noise, or the drop probability of (mc_)dropout.")
    p.add_argument("--seed", type=int, default=EvalConfig.seed, help="Seed of the latent noise.")
    p.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    p.add_argument("--revision", default=None, help="Hub revision of --data.")
    p.add_argument("--model-revision", default=None, help="Hub revision of --model (a Hub model id).")
    p.add_argument("--cache-dir", default=None, help="datasets cache folder (default: the HF cache).")
    p.add_argument("--allow-partial", action="store_true", help="shards/synthetic: read a folder without a complete "
                   "manifest.json, or a brace pattern some of whose files are missing.")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return p


def headline(results: dict) -> dict:
    """The summary line printed last."""
    keys = ("task", "split", "subset", "protocol", "num", "correct", "acc", "acc_ci95", "acc_if_guessed", "unparsed",
            "missing", "trigger_rate")
    return {k: results[k] for k in keys if k in results}


def main(argv: list[str]) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 0:
        p.error("--limit must be >= 0")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.trajectories < 1:
        p.error("--trajectories must be >= 1")
    try:
        data = load_eval_data(
            args.task, args.data, args.split, args.subset, args.limit, args.revision, args.cache_dir,
            protocol=args.protocol, allow_partial=args.allow_partial,
        )
        if args.responses is not None:
            results = rescore(data, args.responses, args.output)
        else:
            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = load_model(args.model, device, args.model_revision)
            cfg = EvalConfig(
                batch_size=args.batch_size, latent=args.latent, max_new_tokens=args.max_new_tokens,
                open_latent=args.open_latent, latent_intervention=args.latent_intervention,
                progress=not args.no_progress, stop=tuple(args.stop),
                trajectories=args.trajectories, latent_noise=args.latent_noise, noise_std=args.noise_std,
                seed=args.seed,
            )
            results = evaluate(model, data, cfg, args.output, model_name=args.model)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    print(breakdown_table(results))
    print(f"wrote {args.output}/samples.jsonl, results.json, results.png"
          + (", submission.json" if args.task == "mmmu" else ""))
    print(json.dumps(headline(results)))
