"""Training throughput and MFU of stage 1 and stage 3 on a ~0.5B-parameter random composed VLM, in bf16.

Both stages train on the same token budget: stage 1 as plain SFT (one forward over the whole sequence),
stage 3 with latent blocks filled by the KV-cached latent loop (a prefix forward, one single-position
forward per slot column, then the rest). Each step is forward, backward and AdamW.

- `stage1_tokens_per_s`, `stage3_tokens_per_s`: tokens (every position, slots included) per second.
- `stage1_mfu`: model FLOPs utilisation of stage 1, with FLOPs per token = 6 × trainable LM parameters
  (no embeddings) + 12 × layers × width × sequence length (attention), plus 2 × vision-tower parameters per
  patch (frozen tower: forward only), over the GPU's dense bf16 peak. Target ≥ 0.40 on an H100.
- `stage3_slowdown`: stage-1 tokens/s ÷ stage-3 tokens/s. Target ≤ 1.5.

Run on a GPU: `python benchmarks/gpu_throughput.py` (bf16 autocast, fp32 master weights). On a machine
without one (or with `--small`) it runs the same code on the tiny preset in fp32 to check the script (no
MFU). The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import latent_batch, timeit_pair  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks (no sparsity), by a substring of the device name."""


def config_0_5b():
    """~0.57B parameters: a Qwen2-style LM (24 layers, width 1280) and a random frozen ViT-B/16 at 224 px."""
    from mmlatent.model.config import ModelConfig
    from mmlatent.model.language_model import LanguageModelConfig, RandomLMConfig
    from mmlatent.model.presets import preset
    from mmlatent.model.projector import ProjectorConfig
    from mmlatent.model.vision_tower import VisionTowerConfig

    cfg: ModelConfig = preset("tiny")
    cfg.vision = VisionTowerConfig(library="timm", name="vit_base_patch16_224", image_size=224, freeze=True)
    cfg.projector = ProjectorConfig(kind="mlp", pixel_shuffle=2)
    cfg.lm = LanguageModelConfig(random_init=RandomLMConfig(
        hidden_size=1280, num_hidden_layers=24, num_attention_heads=20, num_key_value_heads=4,
        intermediate_size=5120, max_position_embeddings=8192))
    return cfg


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override * 1e12, "given"
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, name
    return None, name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny preset in fp32 (a check of the script, no MFU)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--slots", type=int, default=8, help="latent slots in stage 3's block")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per stage (after one warm-up)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    args = ap.parse_args()

    from mmlatent.losses.cross_entropy import weighted_cross_entropy
    from mmlatent.model.latent_loop import latent_forward
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        print("no GPU: running the --small check instead (the ~0.5B model would take hours on a CPU)", file=sys.stderr)
        args.small = True
    if args.small:
        cfg, args.batch, args.seq, args.slots, args.repeats = preset("tiny"), 4, 256, 4, 3
    else:
        cfg = config_0_5b()
    torch.manual_seed(0)
    model = LatentVLM(cfg).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    image_size = cfg.vision.image_size

    T = model.tokens_per_image
    batch = latent_batch(model, args.batch, prefix=args.seq // 2, slots=args.slots,
                         suffix=args.seq - args.seq // 2 - args.slots - 2, image_size=image_size)
    ids, mask, pos, pixels, labels = (t.to(device) for t in batch)
    plain_ids = torch.where(ids == model.ids.latent, torch.full_like(ids, 42), ids)  # stage 1: slots as text
    weights = torch.ones_like(labels, dtype=torch.float)

    def step(latent: bool):
        def run():
            with autocast:
                out = (latent_forward(model, ids, mask, pos, pixels) if latent
                       else model(plain_ids, mask, pos, pixels))
                loss = weighted_cross_entropy(out.logits, labels, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    t1, t3 = timeit_pair(step(False), step(True), repeats=args.repeats)
    tokens = int(mask.sum())
    lm = model.backbone.transformers_model
    lm_cfg = lm.config
    embed = lm.get_input_embeddings().weight.numel()
    lm_params = sum(p.numel() for p in lm.parameters() if p.requires_grad) - embed
    vision_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone.vision."))
    L = ids.shape[1]
    flops_per_token = 6 * lm_params + 12 * lm_cfg.num_hidden_layers * lm_cfg.hidden_size * L
    patches = T * cfg.projector.pixel_shuffle ** 2  # the tower's tokens per image, before the projector merges them
    step_flops = flops_per_token * tokens + 2 * vision_params * patches * pixels.shape[0]
    peak, gpu = peak_flops(device, args.peak_tflops)
    result = {
        "stage1_tokens_per_s": round(tokens / t1, 1),
        "stage3_tokens_per_s": round(tokens / t3, 1),
        "stage3_slowdown": round(t3 / t1, 3),
        "stage1_mfu": None if peak is None else round(step_flops / t1 / peak, 4),
        "stage1_step_s": round(t1, 4),
        "stage3_step_s": round(t3, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": gpu,
        "setting": f"{'tiny fp32' if args.small else 'random ~0.5B composed VLM, bf16 autocast'}, batch {args.batch} x "
                   f"{L} tokens, stage 3: one block of {args.slots} slots",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
