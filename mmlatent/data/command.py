"""`mmlatent data ...`: write shards. `synth` generates the embedded synthetic reasoning set.

`convert` (Monet-SFT, Zebra-CoT, ScienceQA, MMMU) is reserved for the converters of a later issue.
"""

from __future__ import annotations

import json
import sys

from jsonargparse import ArgumentParser

from mmlatent.data.synthetic import SynthConfig, synthesize


def synth_parser() -> ArgumentParser:
    p = ArgumentParser(prog="mmlatent data synth", description="Write synthetic pointer-chasing shards.")
    p.add_argument("--out", type=str, required=True, help="Output folder (train/, val/ and manifest.json).")
    p.add_argument("--train", type=int, required=True, help="Number of training samples.")
    p.add_argument("--val", type=int, required=True, help="Number of held-out samples.")
    p.add_argument("--seed", type=int, default=0, help="Seed; the same seed writes the same bytes.")
    p.add_argument("--samples_per_shard", type=int, default=1000, help="Samples per .tar shard.")
    p.add_argument("--progress", type=bool, default=True, help="Show a progress bar.")
    p.add_class_arguments(SynthConfig, "generator", help="Generator parameters (difficulty and size).")
    return p


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mmlatent data {synth,convert} [options]\n\n"
              "  synth    write the synthetic reasoning set: mmlatent data synth --out DIR --train N --val M\n"
              "  convert  convert Monet-SFT / Zebra-CoT / ScienceQA / MMMU (arrives with the converters issue)")
        return 0
    if argv[0] == "synth":
        args = synth_parser().parse_args(argv[1:])
        cfg = synth_parser().instantiate_classes(args).generator
        manifest = synthesize(
            args.out, cfg, train=args.train, val=args.val, seed=args.seed,
            samples_per_shard=args.samples_per_shard, progress=args.progress,
        )
        print(json.dumps({k: {"written": v["written"], "skipped": v["skipped"]} for k, v in manifest["splits"].items()}))
        return 0
    print(f"mmlatent data: unknown or unavailable subcommand {argv[0]!r}", file=sys.stderr)
    return 2
