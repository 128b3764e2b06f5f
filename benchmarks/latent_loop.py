"""KV-cached latent loop vs full recompute, and a latent step vs a cached decode step.

Setting (issue 3): 8 latent steps after a 512-token prefix, batch 8, the tiny model, fp32, no grad.
- `kv_speedup`: full-recompute loop time (every latent step re-runs the whole prefix, as Coconut does)
  ÷ the KV-cached loop time (the prefix once, then one single-position forward per step). Target ≥ 3.
- `step_vs_decode`: one latent step (hidden state -> sketch head -> one cached LM position -> logits)
  ÷ one cached text decode step (embedding -> one cached LM position -> logits). Target ≤ 1.3.
  `step_vs_decode_thought` is the same with the LQ-Former (thought mode).
- `max_abs_logit_diff`: between the two loops' logits. Target ≤ 1e-4.
- `jacobi_decode_ratio`: decoding one latent block of 8 slots in `generate` with Jacobi passes (3, PCCoT's
  T) ÷ decoding it slot by slot, batch 8 after a 64-token prompt (the prompt's prefill is timed apart and
  left out; a short prompt keeps it from drowning the block's time). `jacobi_decode_ratio_converged` is the same with 9 passes (slots + 1), where Jacobi reaches the
  sequential result: `answers_identical_at_convergence` says whether the 16 tokens after the block are the
  same, `max_abs_latent_diff_converged` how far the block's vectors are apart.
The last line printed is a JSON object.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import latent_batch, timeit, timeit_pair  # noqa: E402


def step_times(model, prefix_len: int, batch: int, steps: int = 20) -> tuple[float, float]:
    """Median seconds of one latent step and one decode step on a cache holding `prefix_len` positions."""
    bb = model.backbone
    D = bb.hidden_size
    g = torch.Generator().manual_seed(0)
    cache = bb.new_cache()
    embeds = torch.randn(batch, prefix_len, D, generator=g)
    mask = torch.ones(batch, prefix_len + 1, dtype=torch.long)
    out = bb.forward_lm(embeds, mask[:, :-1], torch.arange(prefix_len).expand(batch, -1), cache=cache, logits=False)
    h = out.last_hidden[:, -1]
    pos = torch.full((batch, 1), prefix_len)
    visual = torch.randn(batch, 16, D, generator=g)
    vmask = torch.ones(batch, 16, dtype=torch.bool)
    tok = torch.randint(10, 300, (batch, 1), generator=g)

    def latent_step():
        v = model.latent_step(h, visual, vmask).vector[:, None]  # (B, 1, D)
        o = bb.forward_lm(v, mask, pos, cache=cache, logits=False)
        bb.lm_head(o.last_hidden[:, -1]).argmax(-1)
        bb.truncate_cache(cache, prefix_len)

    def decode_step():
        x = bb.embed_tokens(tok)  # (B, 1, D)
        o = bb.forward_lm(x, mask, pos, cache=cache, logits=False)
        bb.lm_head(o.last_hidden[:, -1]).argmax(-1)
        bb.truncate_cache(cache, prefix_len)

    return timeit(latent_step, repeats=steps, warmup=3), timeit(decode_step, repeats=steps, warmup=3)


def jacobi_decoding(slots: int = 8, batch: int = 8, prefix: int = 64) -> dict:
    """Jacobi ÷ sequential decoding of one latent block in `generate` (see the module docstring)."""
    from mmlatent.model.generation import GenerationConfig, generate_from_prompts
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    cfg = preset("tiny")
    cfg.latent.slots, cfg.latent.block_end = slots, "slots"  # sequential: exactly `slots` steps, like Jacobi
    torch.manual_seed(0)
    model = LatentVLM(cfg).eval()
    ids, _, _, pixels, _ = latent_batch(model, batch=batch, prefix=prefix, slots=slots, suffix=0)
    ids_ = model.ids
    prompts = [row[: int((row == ids_.latent_start).nonzero()[0]) + 1] for row in ids]  # each ends opening a block

    def run(schedule: str, passes: int, positions: int, latents: bool = False):
        model.cfg.latent.schedule, model.cfg.latent.jacobi_iterations = schedule, passes
        return generate_from_prompts(model, prompts, pixels, GenerationConfig(max_new_tokens=positions, return_latents=latents))

    block = slots + 1  # the slots and the closing <|latent_end|>
    times = {}
    for name, schedule, passes in (("sequential", "sequential", 3), ("jacobi", "jacobi", 3),
                                   ("converged", "jacobi", slots + 1)):
        with_block, prefill = timeit_pair(lambda: run(schedule, passes, block), lambda: run(schedule, passes, 0), repeats=7)
        times[name] = with_block - prefill
    seq = run("sequential", 3, block + 16, latents=True)
    conv = run("jacobi", slots + 1, block + 16, latents=True)
    diff = max(float((a.vector - b.vector).abs().max()) for s, c in zip(seq, conv) for a, b in zip(s.latents, c.latents))
    return {
        "jacobi_decode_ratio": round(times["jacobi"] / times["sequential"], 3),
        "jacobi_decode_ratio_converged": round(times["converged"] / times["sequential"], 3),
        "answers_identical_at_convergence": [g.token_ids for g in seq] == [g.token_ids for g in conv],
        "max_abs_latent_diff_converged": diff,
        "block_decode_s": {k: round(v, 5) for k, v in times.items()},
    }


@torch.no_grad()
def main() -> None:
    from mmlatent.model.latent_loop import latent_forward, reference_latent_forward
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    torch.manual_seed(0)
    model = LatentVLM(preset("tiny")).eval()
    ids, mask, pos, pixels, _ = latent_batch(model, batch=8, prefix=512, slots=8, suffix=0)
    fast = latent_forward(model, ids, mask, pos, pixels)
    slow = reference_latent_forward(model, ids, mask, pos, pixels)
    diff = float((fast.logits - slow.logits)[mask.bool()].abs().max())
    t_fast = timeit(lambda: latent_forward(model, ids, mask, pos, pixels), repeats=5)
    t_slow = timeit(lambda: reference_latent_forward(model, ids, mask, pos, pixels), repeats=3)
    t_latent, t_decode = step_times(model, 512, 8)

    cfg = preset("tiny")
    cfg.latent.mode = "thought"
    thought = LatentVLM(cfg).eval()
    t_thought, t_decode2 = step_times(thought, 512, 8)
    jacobi = jacobi_decoding()
    result = {
        "kv_speedup": round(t_slow / t_fast, 2),
        "step_vs_decode": round(t_latent / t_decode, 3),
        "step_vs_decode_thought": round(t_thought / t_decode2, 3),
        "max_abs_logit_diff": diff,
        "cached_loop_s": round(t_fast, 4),
        "recompute_loop_s": round(t_slow, 4),
        "forwards_cached": fast.forwards,
        "forwards_recompute": slow.forwards,
        **jacobi,
        "setting": "tiny model, fp32, CPU, batch 8, 512-token prefix (block start varies by row), 8 latent steps; "
                   "Jacobi decoding: 3 passes (converged: 9) over a block of 8 slots after a 64-token prompt",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
