"""README's memory table: `mmlatent plan` for the flagship recipes on 8×80 GB and on 1×24 GB.

Each row is `plan_recipe` (the function behind `mmlatent plan`) on one recipe file with the overrides the
row names, so every row can be reproduced with the `mmlatent plan` command it prints. The 8×80 GB rows
are the recipes as written; the 1×24 GB rows are the settings a single 24 GB GPU needs (one device, LoRA
over a bf16 base for the 3B, a precomputed teacher). Prints a markdown table, then one JSON line last.
`python benchmarks/memory_table.py` (a few minutes on 2 cores: each row counts parameters and probes one
decoder layer's activations).
"""

from __future__ import annotations

import json
from pathlib import Path

from mmlatent.training.memory_plan import Device
from mmlatent.training.plan_command import plan_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
Q, S = "qwen2_5_vl_3b", "siglip_qwen2_5_0_5b"
ONE = ["--trainer.strategy=auto", "--trainer.devices=1"]
LORA = ["--model.vlm.lora.enabled=true", "--model.vlm.native.dtype=bfloat16"]
B1 = ["--data.batch_size=1"]


def cache(stage: str, recipes: str) -> list[str]:
    """A teacher read from `mmlatent teacher`'s cache instead of an online copy."""
    return ["--model.stage.teacher.checkpoint=null", f"--model.stage.teacher.cache=runs/{recipes}/{stage}/teacher"]


ROWS: list[tuple[str, str, str, list[str], tuple[float, int]]] = [
    ("Qwen2.5-VL-3B", "stage1 as written (FSDP2, fp32 master, batch 2)", f"{Q}/stage1.yaml", [], (80, 8)),
    ("Qwen2.5-VL-3B", "stage2 as written (online teacher)", f"{Q}/stage2.yaml", [], (80, 8)),
    ("Qwen2.5-VL-3B", "stage3 as written (online teacher)", f"{Q}/stage3.yaml", [], (80, 8)),
    ("SigLIP + Qwen2.5-0.5B", "stage1, FSDP2 (batch 8 as written)", f"{S}/stage1.yaml",
     ["--trainer.strategy=fsdp2", "--trainer.devices=8"], (80, 8)),
    ("SigLIP + Qwen2.5-0.5B", "stage2, FSDP2 (teacher cache as written)", f"{S}/stage2.yaml",
     ["--trainer.strategy=fsdp2", "--trainer.devices=8"], (80, 8)),
    ("Qwen2.5-VL-3B", "stage1 full fine-tune, one GPU", f"{Q}/stage1.yaml", ONE, (24, 1)),
    ("Qwen2.5-VL-3B", "stage1, LoRA on a bf16 base, batch 1", f"{Q}/stage1.yaml", ONE + LORA + B1, (24, 1)),
    ("Qwen2.5-VL-3B", "stage2, LoRA, bf16 base, batch 1, teacher cache", f"{Q}/stage2.yaml",
     ONE + LORA + B1 + cache("stage2", Q), (24, 1)),
    ("Qwen2.5-VL-3B", "stage3, LoRA, bf16 base, batch 1, teacher cache", f"{Q}/stage3.yaml",
     ONE + LORA + B1 + cache("stage3", Q), (24, 1)),
    ("SigLIP + Qwen2.5-0.5B", "stage1 as written (batch 8)", f"{S}/stage1.yaml", [], (24, 1)),
    ("SigLIP + Qwen2.5-0.5B", "stage1, batch 1", f"{S}/stage1.yaml", B1, (24, 1)),
    ("SigLIP + Qwen2.5-0.5B", "stage2, batch 1 (teacher cache)", f"{S}/stage2.yaml", B1, (24, 1)),
    ("SigLIP + Qwen2.5-0.5B", "stage3, batch 1 (teacher cache)", f"{S}/stage3.yaml", B1, (24, 1)),
]


def main() -> None:
    rows = []
    print("| model | setting | GPUs | batch | weights | gathered | grads | AdamW | teacher | activations | logits | total GiB | fits | largest micro-batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, what, recipe, over, (gib, n) in ROWS:
        r = plan_recipe([str(CONFIGS / recipe)], over, Device(gib, n, "gpu"))
        p = r["plan"]
        rows.append({"model": model, "setting": what, "gpus": f"{n}x{gib:g}GB", "command":
                     f"mmlatent plan -c train/configs/{recipe} --gpu-memory {gib:g} --gpus {n} {' '.join(over)}".strip(),
                     "seq_len": r["seq_len"], "fits": r["fits"], "largest_micro_batch": r["largest_micro_batch"], "plan": p})
        print(f"| {model} | {what} | {n}×{gib:g} GB | {p['batch_size']} | {p['weights']} | {p['gathered']} | {p['gradients']} | "
              f"{p['optimizer']} | {p['teacher']} | {p['activations']} | {p['logits']} | **{p['total']}** | "
              f"{'yes' if r['fits'] else 'no'} | {r['largest_micro_batch']} |", flush=True)
    print(json.dumps({"rows": rows, "seq_len": rows[0]["seq_len"]}))


if __name__ == "__main__":
    main()
