"""`mmlatent teacher`: precompute the hidden states a distillation stage aligns to, once, into a cache.

It reads the shards in the teacher's own view (stage 2's teacher, stage 1, sees the aux images inline;
stage 3's teacher, stage 2, reads stage 2's layout), runs the teacher checkpoint over them and writes the
cache that `stage.teacher.cache` points a stage at (`teacher.write_teacher_cache`). It sits above both the
stages (which know the layouts) and the teacher module (which knows the states), so neither imports the
other's command.
"""

from __future__ import annotations

import argparse
import json

import torch

from mmlatent.data.pipeline import ShardStream
from mmlatent.data.processor import Processor, ProcessorConfig
from mmlatent.data.shards import expand_shards, manifest_count
from mmlatent.data.skips import SkipSummary
from mmlatent.training.checkpoint_reader import load_model
from mmlatent.training.stages import StageConfig, build_stage
from mmlatent.training.teacher import write_teacher_cache


def main(argv: list[str] | None = None) -> None:
    """`mmlatent teacher`: precompute a distillation stage's teacher states."""
    ap = argparse.ArgumentParser(
        prog="mmlatent teacher",
        description="Precompute the teacher hidden states a distillation stage aligns to, keyed by sample key. "
        "Point the stage at them with --model.stage.teacher.cache=OUT.",
    )
    ap.add_argument("--checkpoint", required=True, help="the teacher: stage 1's checkpoint for stage 2, stage 2's for stage 3")
    ap.add_argument("--stage", required=True, choices=["stage2", "stage3"], help="the stage that will read the cache")
    ap.add_argument("--shards", required=True, nargs="+", help="shard folders or brace patterns: every split the stage reads (train and val)")
    ap.add_argument("--out", required=True, help="cache folder to write")
    ap.add_argument("--batch-size", type=int, default=16, help="samples per teacher forward")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16", help="storage dtype")
    ap.add_argument("--workers", type=int, default=1, help="data-loader workers")
    ap.add_argument("--max-length", type=int, default=ProcessorConfig.max_length,
                    help="longest sample in tokens, as the stage's data.processor.max_length (longer ones are "
                    "skipped and counted, and the stage would find no states for them)")
    ap.add_argument("--allow-partial", action="store_true", help="read a folder without a complete manifest.json, "
                    "or a brace pattern some of whose files are missing")
    args = ap.parse_args(argv)

    model = load_model(args.checkpoint)
    stage = build_stage(StageConfig(name=args.stage, align_weight=0.0))  # layouts only
    layout = stage.teacher_layout(model.cfg.latent.slots)
    processor = Processor.for_model(model, layout, ProcessorConfig(max_length=args.max_length))
    urls = [u for spec in args.shards for u in expand_shards(spec, "--shards", args.allow_partial)]
    counts = [manifest_count(spec) for spec in args.shards]
    total = None if None in counts else sum(counts)
    stream = ShardStream(
        urls, processor, processor.collate,
        args.batch_size, shuffle_buffer=0, loop=False,
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=min(args.workers, len(urls)))
    n, skipped = write_teacher_cache(
        model, loader, args.out, stage.positions, getattr(torch, args.dtype), total
    )
    lost = SkipSummary.of(skipped)  # samples not cached apart from damaged shard reads
    print(json.dumps({"cached": n, "skipped": lost.samples, "damage_events": lost.events, "out": args.out,
                      "positions": stage.positions}))
