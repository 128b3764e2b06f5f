"""Short training loops that measure what the tiny model learns: the harness behind README's "tried" table.

One run trains the package's model (`model.vlm.preset` of a tiny recipe), stage and optimiser, exactly as the
recipe configures them, on fresh synthetic samples every step (generated in-process: no shards, no Lightning),
and measures teacher-forced accuracies on a dev split every `--eval-every` steps: the answer letter, the
observation words (each colour the reasoning reads off the image), the share of latent thoughts whose top
token lies on the walk's own cell, each broken down by hop count. It never reads a test split: the dev split
is `--dev-split` of the same seed, for decisions only.

One variable per run: `--set section.field=value` overrides a dotted field of `synth` (the `SynthConfig`, from
`mmlatent.demo.DemoConfig`), `model` (the `ModelConfig` of the preset), `stage`, `optim` (the recipe's), or
`run` (this script's own settings). Values are YAML (`[red, green]`, `null`, `1e-3`). Each run appends its
JSON line (settings, curves, final numbers, seconds) to `--log` and prints it last, so every row of the tried
table can be rerun from the command line it records:

    python benchmarks/learnability.py --recipe direct --steps 800 --set synth.task_mix.lookup=1 \\
        --set synth.task_mix.walk=0 --tag "lookup, 4 colours"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mmlatent.config_io import from_dict
from mmlatent.data.masks import observation_mask
from mmlatent.data.processor import Processor
from mmlatent.data.synthetic import SynthConfig, generate_sample
from mmlatent.data.synthetic_tokenizer import build_synthetic_tokenizer
from mmlatent.demo import DemoConfig, recipe
from mmlatent.model.config import ModelConfig
from mmlatent.model.latent_loop import LatentForward
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.presets import preset
from mmlatent.training.checkpoint_reader import init_weights
from mmlatent.training.optim import OptimConfig, build_optimizer
from mmlatent.training.stages import StageConfig, build_stage
from mmlatent.tokens import IGNORE_INDEX


@dataclass
class RunConfig:
    """The harness's own settings (`--set run.field=value`)."""

    steps: int = 800
    """Optimiser steps."""
    batch_size: int = 32
    """Samples per step (the demo's)."""
    seed: int = 0
    """Data and initialisation seed."""
    eval_every: int = 100
    """Steps between dev evaluations."""
    dev: int = 256
    """Dev samples per evaluation."""
    dev_split: str = "val"
    """Split name of the dev samples (never `test`)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (the recipes' `gradient_clip_val`)."""
    init_from: str | None = None
    """A Lightning checkpoint to start from (stage hand-off), or a `.pt` state dict this harness saved."""
    save: str | None = None
    """Write the final weights here (a `.pt` state dict) for a later `init_from`."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default, one per core)."""


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            raise SystemExit(f"--set {dotted}: {k!r} is not a section (known: {sorted(node)})")
        node = node[k]
    if keys[-1] not in node:
        raise SystemExit(f"--set {dotted}: unknown field {keys[-1]!r} (known: {sorted(node)})")
    node[keys[-1]] = value


def _merged(defaults: dict, given: dict) -> dict:
    """`defaults` with `given`'s values laid over it, section by section."""
    out = dict(defaults)
    for k, v in given.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def configs(recipe_name: str, sets: list[str]) -> dict:
    """The typed configs of a run: the recipe's stage and optimiser, its preset model, the demo's task."""
    rec = yaml.safe_load(recipe(recipe_name).read_text())["model"]
    trees = {
        "synth": dataclasses.asdict(DemoConfig().synth),
        "model": dataclasses.asdict(preset(rec["vlm"]["preset"])),
        "stage": _merged(dataclasses.asdict(StageConfig()), rec["stage"]),  # every field settable, the recipe's values
        "optim": _merged(dataclasses.asdict(OptimConfig()), rec.get("optim", {})),
        "run": dataclasses.asdict(RunConfig()),
    }
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: expected section.field=value")
        section, _, rest = key.partition(".")
        if section not in trees:
            raise SystemExit(f"--set {item!r}: unknown section {section!r} (known: {sorted(trees)})")
        _set(trees[section], rest, yaml.safe_load(raw))
    return {
        "synth": from_dict(SynthConfig, trees["synth"], "synth"),
        "model": from_dict(ModelConfig, trees["model"], "model"),
        "stage": from_dict(StageConfig, trees["stage"], "stage"),
        "optim": from_dict(OptimConfig, trees["optim"], "optim"),
        "run": from_dict(RunConfig, trees["run"], "run"),
    }


def samples(synth: SynthConfig, seed: int, split: str, start: int, n: int) -> list[dict]:
    out = []
    for i in range(start, start + n):
        raw = generate_sample(synth, seed, split, i)
        out.append({"key": raw.key, "meta": raw.meta, "images": raw.images})
    return out


def letter_ids(model: LatentVLM, n: int) -> dict[int, str]:
    """Token id of each option letter as it appears after "The answer is "."""
    enc = [model.tokenizer(f"The answer is {chr(65 + i)}.", add_special_tokens=False)["input_ids"] for i in range(n)]
    at = next(j for j in range(len(enc[0])) if len({e[j] for e in enc}) == n)
    return {e[at]: chr(65 + i) for i, e in enumerate(enc)}


class Meter:
    """Right/total counts by (metric, hops)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])

    def add(self, metric: str, hops: int, right: int, total: int) -> None:
        for key in ((metric, "all"), (metric, str(hops))):
            self.counts[key][0] += right
            self.counts[key][1] += total

    def result(self) -> dict:
        out: dict = {}
        for (metric, hops), (right, total) in sorted(self.counts.items()):
            if total:
                out.setdefault(metric, {})[hops] = round(right / total, 4)
        return out


@torch.no_grad()
def evaluate(model: LatentVLM, stage, processor: Processor, dev: list[dict], letters: dict[int, str]) -> dict:
    """Teacher-forced accuracies on the dev samples, by hop count."""
    model.eval()
    meter = Meter()
    ids = model.ids
    for start in range(0, len(dev), 64):
        chunk = dev[start : start + 64]
        batch = processor.collate([processor(s) for s in chunk])
        out = stage.forward(model, batch)
        pred = out.logits[:, :-1].argmax(-1)  # (B, L-1): the prediction of token t+1
        target = batch.labels[:, 1:]  # (B, L-1)
        inside = observation_mask(batch.input_ids, ids.observation_open, ids.observation_close)[:, 1:] & (target != IGNORE_INDEX)
        is_letter = torch.zeros_like(target, dtype=torch.bool)
        for t in letters:
            is_letter |= target == t
        thoughts_on_cell = _thoughts_on_cell(model, batch, out) if isinstance(out, LatentForward) else None
        for b, s in enumerate(chunk):
            hops = s["meta"]["meta"]["hops"]
            obs = inside[b].nonzero().flatten()
            meter.add("observation", hops, int((pred[b, obs] == target[b, obs]).sum()), obs.numel())
            for i, col in enumerate(obs.tolist()):  # the first observation is the start cell's, then one per move
                meter.add(f"observation_{min(i, 2)}", hops, int(pred[b, col] == target[b, col]), 1)
            cols = is_letter[b].nonzero().flatten()
            if cols.numel():
                col = int(cols[-1])
                meter.add("answer", hops, int(pred[b, col] == target[b, col]), 1)
            if thoughts_on_cell is not None:
                right, total = thoughts_on_cell[b]
                meter.add("thought_on_own_cell", hops, right, total)
    model.train()
    return meter.result()


def _thoughts_on_cell(model: LatentVLM, batch, out: LatentForward) -> list[tuple[int, int]]:
    """Per sample: (thoughts whose top token lies in their own block's region, thoughts with a region)."""
    if out.relevance is None or batch.aux_blocks.numel() == 0:
        return [(0, 0)] * len(batch)
    from mmlatent.training.grounding import block_vectors

    maps, valid = block_vectors(batch.input_ids, out.latent_mask, out.relevance, model.ids.latent_start, batch.aux_blocks)
    region = batch.aux_regions[:, : maps.shape[-1]]  # (n, M)
    top = maps.argmax(-1)  # (n, N)
    hit = torch.gather(region, 1, top) & valid  # (n, N)
    starts = (batch.input_ids == model.ids.latent_start).nonzero()[:, 0]  # (n_blocks,) row of each block
    per = [[0, 0] for _ in range(len(batch))]
    for i, blk in enumerate(batch.aux_blocks.tolist()):
        row = int(starts[blk])
        per[row][0] += int(hit[i].sum())
        per[row][1] += int(valid[i].sum())
    return [tuple(p) for p in per]


def _load_init(model: LatentVLM, path: str) -> None:
    if path.endswith(".pt"):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
    else:
        init_weights(model, path)


def run(recipe_name: str, cfg: dict) -> dict:
    rc: RunConfig = cfg["run"]
    if rc.threads:
        torch.set_num_threads(rc.threads)
    torch.manual_seed(rc.seed)
    build_synthetic_tokenizer()
    model = LatentVLM(cfg["model"])
    if rc.init_from:
        _load_init(model, rc.init_from)
    stage = build_stage(cfg["stage"])
    cfg["stage"].grounding.check(model)
    stage.to(torch.device("cpu"))
    slots = cfg["model"].latent.slots
    processor = Processor.for_model(model, stage.layout(slots), teacher_layout=stage.online_teacher_layout(slots))
    opt, sched = build_optimizer(model, cfg["optim"], rc.steps)
    dev = samples(cfg["synth"], rc.seed, rc.dev_split, 0, rc.dev)
    letters = letter_ids(model, cfg["synth"].num_choices)
    curve = []
    t0 = time.perf_counter()
    model.train()
    for step in range(rc.steps + 1):
        if step % rc.eval_every == 0 or step == rc.steps:
            point = {"step": step, "seconds": round(time.perf_counter() - t0, 1), **evaluate(model, stage, processor, dev, letters)}
            curve.append(point)
            print(json.dumps(point), file=sys.stderr, flush=True)
        if step == rc.steps:
            break
        batch = processor.collate([processor(s) for s in samples(cfg["synth"], rc.seed, "train", step * rc.batch_size, rc.batch_size)])
        out = stage.forward(model, batch)
        losses = stage.losses(model, batch, out)
        loss = torch.stack(list(losses.values())).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), rc.grad_clip)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(json.dumps({"step": step, **{k: round(float(v.detach()), 4) for k, v in losses.items()}}), file=sys.stderr, flush=True)
    if rc.save:
        Path(rc.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), rc.save)
    return {"curve": curve, "final": curve[-1], "seconds": round(time.perf_counter() - t0, 1)}


def _commit() -> str | None:
    """The checkout's commit (with `+dirty` for uncommitted changes): the recipes a row ran with."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _headline(point: dict) -> str:
    """The final numbers of a run in a few words: observation and answer accuracies by hop count."""
    parts = []
    for metric in ("observation", "answer", "thought_on_own_cell"):
        if metric in point:
            by_hop = point[metric]
            hops = ", ".join(f"{h}: {v:.2f}" for h, v in by_hop.items() if h != "all")
            parts.append(f"{metric} {by_hop['all']:.2f} ({hops})")
    return "; ".join(parts)


def table(log: str) -> str:
    """The runs of a log as a markdown table (what README's tried table is drawn from), oldest first."""
    rows = ["| run | at step | teacher-forced, by moves | command |", "|---|---|---|---|"]
    for line in Path(log).read_text(encoding="utf-8").splitlines():
        run = json.loads(line)
        point = run["final"]
        rows.append(f"| {run['tag']} | {point['step']} | {_headline(point)} | `{run['command']}` |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="direct", help="tiny recipe whose stage, optimiser and preset to use")
    ap.add_argument("--steps", type=int, default=None, help="shorthand for --set run.steps=N")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.field=YAML value (repeatable)")
    ap.add_argument("--tag", default="", help="what this run varies (one variable)")
    ap.add_argument("--log", default="docs/learnability.jsonl", help="JSON-lines file each run appends to ('' for none)")
    ap.add_argument("--table", action="store_true", help="print the log's runs as a markdown table and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.log))
        return
    sets = args.sets + ([f"run.steps={args.steps}"] if args.steps is not None else [])
    cfg = configs(args.recipe, sets)
    result = run(args.recipe, cfg)
    line = {
        "tag": args.tag, "recipe": args.recipe, "sets": sets, "commit": _commit(),
        "command": "python benchmarks/learnability.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        **result, "contended": True,
    }
    text = json.dumps(line)
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        with open(args.log, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    print(json.dumps({"tag": args.tag, "final": result["final"], "seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
