"""`mmlatent data ...`: write shards. `synth` generates the embedded synthetic reasoning set; `convert NAME`
turns a public corpus (Monet-SFT, Zebra-CoT, ScienceQA, MMMU) into shards of the same format.

Each converter's options come from its typed config dataclass and the common `ConvertOptions`, flat on the
command line (`--source`, `--image_format`, …), with the field docstrings as help.
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import ArgumentParser

from mmlatent.data.synthetic import SynthConfig, synthesize
from mmlatent.data.synthetic_tokenizer import build_synthetic_tokenizer

CONVERT_HELP = """usage: mmlatent data convert NAME --source PATH_OR_HUB_ID --out DIR [options]

converters:
  monet      Monet-SFT-125K JSON chats with image files (aux images, observation spans)
  zebra_cot  Zebra-CoT parquet (interleaved reasoning images become aux images)
  scienceqa  ScienceQA parquet (question image + context; lecture and solution as the chain of thought)
  mmmu       MMMU parquet, dev split (interleaved question images; explanation as the chain of thought)

An interrupted conversion resumes where it stopped when run again with the same options.
Why each skipped record was skipped: one JSON line per record in DIR/skips.jsonl.
A conversion that writes no sample exits with status 2 and says why.
Run `mmlatent data convert NAME --help` for a converter's options."""


def synth_parser() -> ArgumentParser:
    p = ArgumentParser(prog="mmlatent data synth", description="Write synthetic pointer-chasing shards.")
    p.add_argument("--out", type=str, required=True, help="Output folder (train/, val/ and manifest.json).")
    p.add_argument("--train", type=int, required=True, help="Number of training samples.")
    p.add_argument("--val", type=int, required=True, help="Number of validation samples (curves, tuning).")
    p.add_argument("--test", type=int, default=0, help="Number of held-out test samples (final numbers only).")
    p.add_argument("--seed", type=int, default=0, help="Seed; the same seed writes the same bytes.")
    p.add_argument("--samples_per_shard", type=int, default=1000, help="Samples per .tar shard.")
    p.add_argument("--progress", type=bool, default=True, help="Show a progress bar.")
    p.add_class_arguments(SynthConfig, "generator", help="Generator parameters (difficulty and size).")
    return p


def convert_parser(name: str) -> ArgumentParser:
    from mmlatent.data.convert import CONVERTERS, ConvertOptions

    converter = CONVERTERS[name]
    doc = (sys.modules[converter.__module__].__doc__ or "").strip().split("\n\n")[0]
    # exit_on_error=False: a missing or bad option is reported by `convert_main` in two lines, not a usage page
    p = ArgumentParser(prog=f"mmlatent data convert {name}", description=doc or None, exit_on_error=False)
    p.add_argument("--out", type=str, required=True, help="Output folder (shard-*.tar and manifest.json).")
    p.add_class_arguments(converter.config_class, None)
    p.add_class_arguments(ConvertOptions, None)
    return p


def convert_main(argv: list[str]) -> int:
    from dataclasses import fields

    from mmlatent.data.convert import CONVERTERS, ConvertOptions, run_conversion
    from mmlatent.data.convert.skiplog import SKIPS_FILE

    if not argv or argv[0] in ("-h", "--help"):
        print(CONVERT_HELP)
        return 0
    name = argv[0]
    if name not in CONVERTERS:
        print(f"mmlatent data convert: unknown converter {name!r}; choose from {sorted(CONVERTERS)}", file=sys.stderr)
        return 2
    try:
        args = convert_parser(name).parse_args(argv[1:])
    except ArgumentError as err:
        print(f"usage: mmlatent data convert {name} --source PATH_OR_HUB_ID --out DIR [options]\n"
              f"mmlatent data convert {name}: {err}\n"
              f"Run `mmlatent data convert {name} --help` for every option.", file=sys.stderr)
        return 2
    converter = CONVERTERS[name]
    cfg = converter.config_class(**{f.name: args[f.name] for f in fields(converter.config_class)})
    try:
        options = ConvertOptions(**{f.name: args[f.name] for f in fields(ConvertOptions)})
    except ValueError as err:
        print(f"mmlatent data convert {name}: {err}", file=sys.stderr)
        return 2
    try:
        manifest = run_conversion(converter(cfg), args.out, options)
    except (ValueError, FileNotFoundError) as err:  # a bad source or option, or nothing written: say why
        print(f"mmlatent data convert {name}: {err}", file=sys.stderr)
        return 2
    summary = {"out": args.out, "written": manifest["written"], "skipped": manifest["skipped"],
               "shards": len(manifest["shards"]), "records": manifest["records"]}
    if manifest["skipped"]:
        summary["skips"] = str(Path(args.out) / SKIPS_FILE)  # one line per skipped record: key, file, row, why
    print(json.dumps(summary))
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mmlatent data {synth,tokenizer,convert} [options]\n\n"
              "  synth      write the synthetic reasoning set: mmlatent data synth --out DIR --train N --val M\n"
              "  tokenizer  build the tiny models' synthetic tokenizer (synth also builds it)\n"
              "  convert    convert a corpus to shards: mmlatent data convert {monet,zebra_cot,scienceqa,mmmu} "
              "--source PATH_OR_ID --out DIR")
        return 0
    if argv[0] == "convert":
        return convert_main(argv[1:])
    if argv[0] == "synth":
        args = synth_parser().parse_args(argv[1:])
        cfg = synth_parser().instantiate_classes(args).generator
        manifest = synthesize(
            args.out, cfg, train=args.train, val=args.val, test=args.test, seed=args.seed,
            samples_per_shard=args.samples_per_shard, progress=args.progress,
        )
        build_synthetic_tokenizer()  # the tiny models' tokenizer, built once per machine
        print(json.dumps({k: {"written": v["written"], "skipped": v["skipped"]} for k, v in manifest["splits"].items()}))
        return 0
    if argv[0] == "tokenizer":
        p = ArgumentParser(prog="mmlatent data tokenizer",
                           description="Build the tiny models' synthetic tokenizer (once per machine) and print its folder.")
        p.add_argument("--vocab_size", type=int, default=512, help="Vocabulary size (`tokenizer.synthetic_vocab_size`).")
        args = p.parse_args(argv[1:])
        print(json.dumps({"tokenizer": str(build_synthetic_tokenizer(args.vocab_size))}))
        return 0
    print(f"mmlatent data: unknown or unavailable subcommand {argv[0]!r}", file=sys.stderr)
    return 2
