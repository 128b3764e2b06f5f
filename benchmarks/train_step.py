"""Cost of latent slots in a training step, and of Jacobi mode against sequential.

- `latent_step_ratio`: one training step (forward, backward, AdamW) on sequences holding a block of T=4
  latent slots ÷ a plain SFT step on the same tokens (the slots read as ordinary tokens). Target ≤ 1.4.
- `jacobi_ratio`: a whole training step in Jacobi mode (3 passes) ÷ the same step in sequential mode,
  at T=24 slots (PCCoT's own setting). Target ≤ 0.6.
Tiny model, fp32, CPU, batch 8, ≈512-token sequences. The last line printed is a JSON object.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import latent_batch, timeit_pair  # noqa: E402


def main() -> None:
    from mmlatent.losses.cross_entropy import weighted_cross_entropy
    from mmlatent.model.latent_loop import latent_forward
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    torch.manual_seed(0)
    model = LatentVLM(preset("tiny")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(ids, mask, pos, pixels, labels, latent: bool, schedule: str = "sequential"):
        def run():
            if latent:
                out = latent_forward(model, ids, mask, pos, pixels, schedule=schedule)
            else:
                out = model(ids, mask, pos, pixels)
            loss = weighted_cross_entropy(out.logits, labels, torch.ones_like(labels, dtype=torch.float))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    ids, mask, pos, pixels, labels = latent_batch(model, batch=8, prefix=400, slots=4, suffix=100)
    plain_ids = torch.where(ids == model.ids.latent, torch.full_like(ids, 42), ids)  # same tokens, no slots
    t_latent, t_plain = timeit_pair(
        step(ids, mask, pos, pixels, labels, True), step(plain_ids, mask, pos, pixels, labels, False)
    )

    ids, mask, pos, pixels, labels = latent_batch(model, batch=8, prefix=400, slots=24, suffix=80)
    model.cfg.latent.jacobi_iterations = 3
    t_seq, t_jac = timeit_pair(
        step(ids, mask, pos, pixels, labels, True, "sequential"), step(ids, mask, pos, pixels, labels, True, "jacobi")
    )
    result = {
        "latent_step_ratio": round(t_latent / t_plain, 3),
        "jacobi_ratio": round(t_jac / t_seq, 3),
        "latent_step_s": round(t_latent, 4),
        "plain_step_s": round(t_plain, 4),
        "sequential_24_s": round(t_seq, 4),
        "jacobi_24_s": round(t_jac, 4),
        "setting": "tiny model, fp32, CPU, batch 8, ~500-token sequences; T=4 (ratio) and T=24 (Jacobi, 3 passes)",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
