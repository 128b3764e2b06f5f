"""Does the tiny stage-1 model ever wait on the shard pipeline?

Measures, in one run on the same synthetic shards and the same batches:
- `loader_samples_per_s`: the shard pipeline alone (tar reading, image decode, validation, the stage-1
  processor with the tower's own image transform, collation), 2 worker processes;
- `model_samples_per_s`: tiny stage-1 training steps (forward, backward, AdamW) on those batches, held in
  memory so no data work is counted;
- `ratio`: loader ÷ model. Target: at least 2.
The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024, help="synthetic samples to write")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model-steps", type=int, default=12)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from mmlatent.data.synthetic import SynthConfig, synthesize
    from mmlatent.data.synthetic_tokenizer import build_synthetic_tokenizer
    from mmlatent.training.datamodule import ShardDataModule, SplitConfig
    from mmlatent.training.module import LatentVLMModule
    from mmlatent.training.optim import build_optimizer

    build_synthetic_tokenizer()  # the tiny preset's tokenizer (a no-op once built)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(tmp, SynthConfig(), train=args.samples, val=0, seed=0, samples_per_shard=args.samples // 8, progress=False)
        module = LatentVLMModule()
        dm = ShardDataModule(train=SplitConfig(shards=f"{tmp}/train"), batch_size=args.batch_size, num_workers=args.workers)
        dm.attach_model(module.model)
        loader = dm.train_dataloader()

        it = iter(loader)
        first = next(it)  # worker start-up is not throughput
        t0 = time.perf_counter()
        batches = [b for b in it]
        loader_time = time.perf_counter() - t0
        n_loaded = sum(len(b) for b in batches)
        loader_sps = n_loaded / loader_time

        model = module.model.train()
        opt, _ = build_optimizer(model, module.optim_cfg, total_steps=100)
        steps = [first, *batches][: args.model_steps + 1]

        def train_step(batch) -> None:
            losses = module.stage.losses(model, batch, module.stage.forward(model, batch))
            loss = torch.stack(list(losses.values())).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        train_step(steps[0])  # warm-up
        t0 = time.perf_counter()
        for b in steps[1:]:
            train_step(b)
        model_time = time.perf_counter() - t0
        model_sps = sum(len(b) for b in steps[1:]) / model_time

    result = {
        "loader_samples_per_s": round(loader_sps, 1),
        "model_samples_per_s": round(model_sps, 1),
        "ratio": round(loader_sps / model_sps, 2),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "tokens_per_sample": round(float(first.attention_mask.sum()) / len(first), 1),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
