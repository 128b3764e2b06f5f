"""`mmlatent plan -c RECIPE --gpu-memory GiB --gpus N`: the memory model's prediction for a recipe.

Prints the predicted bytes per device by part (`memory_plan.Plan`) at the recipe's micro-batch, whether it
fits, and the largest micro-batch that fits; the last line is the same as one JSON object. Any
`--key=value` after the options overrides the recipe as on `mmlatent fit` (e.g. `--model.vlm.lora.enabled=true`,
`--data.batch_size=1`); `--gpus` sets the devices the run shards over.
"""

from __future__ import annotations

import argparse
import json

from mmlatent.training.memory_plan import (
    GiB, Device, activation_probe, count_parameters, largest_micro_batch, plan_memory, read_recipe, settings_of,
)


_MEASURED: dict[str, tuple] = {}
"""(counts, activation probe) per model configuration, for a process that plans many rows (README's table)."""


def plan_recipe(configs: list[str], overrides: list[str], device: Device, seq_len: int | None = None) -> dict:
    """The prediction for a recipe on `device`: the plan at its micro-batch and the largest that fits."""
    tree = read_recipe(configs, overrides)
    s = settings_of(tree)
    if device.kind == "gpu":
        s.devices = device.count
        if device.count == 1 and s.strategy == "ddp":
            s.strategy = "single"
    key = repr((s.vlm, s.compute_dtype))
    if key not in _MEASURED:
        _MEASURED[key] = count_parameters(s.vlm), activation_probe(s.vlm, s.compute_dtype)
    counts, act = _MEASURED[key]
    plan = plan_memory(s, counts, act, device, seq_len)
    return {
        "recipe": configs[-1], "overrides": list(overrides), "device": f"{device.count}x{device.memory_gib:g}GiB {device.kind}",
        "stage": s.stage.name, "strategy": s.strategy, "parameters": counts.total, "trainable": counts.trainable,
        "seq_len": seq_len or s.max_length, "plan": plan.row(), "fits": plan.total <= device.memory_gib * GiB,
        "largest_micro_batch": largest_micro_batch(s, counts, act, device, seq_len),
        "activation_bytes_per_token_layer": round(act.per_layer_checkpointed if s.checkpointing else act.per_layer),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mmlatent plan", description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", action="append", required=True, help="recipe YAML (repeatable, later wins)")
    ap.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs the run shards over (all nodes)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the recipe's max_length)")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        ap.error(f"overrides are --key=value: {bad}")
    out = plan_recipe(args.config, overrides, Device(args.gpu_memory, args.gpus, "gpu"), args.seq_len)
    print(f"{out['recipe']} ({out['stage']}, {out['strategy']}) on {out['device']}, "
          f"{out['parameters'] / 1e9:.2f}B parameters ({out['trainable'] / 1e9:.3f}B trainable), {out['seq_len']} tokens/sample")
    for key, value in out["plan"].items():
        print(f"  {key:>12}: {value}")
    print(f"  fits: {out['fits']}; largest micro-batch: {out['largest_micro_batch']}")
    print(json.dumps(out))
    return 0
