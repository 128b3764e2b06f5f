"""Batched evaluation vs one question at a time, latent reasoning on.

Setting (issue 5): the tiny model, 64 synthetic pointer-chasing questions written as a ScienceQA-layout
parquet (one image each), read back through `load_eval_data`, answered with `generate_responses` (prompt
rendering, image decoding and the KV-cached latent/text loop, all included in the timing), greedy,
`max_new_tokens` positions per question, every answer starting in a latent block.
- `batched_speedup`: seconds per question at batch 1 ÷ at batch 16. Target ≥ 3.
- `identical_outputs`: both runs generated the same token ids for every question. Target true.
On CPU the benchmark runs torch with one intra-op thread by default (`--threads`): on a shared machine two
OpenMP threads wait on each other whenever another process holds a core, which slowed batch-16 steps by up
to 20× in our runs while batch-1 steps (too small to be split across threads) were untouched; one thread
measures the batching itself. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import torch


def write_questions(root: Path, n: int, seed: int = 0) -> Path:
    """`n` synthetic questions as `root/data/test-00000-of-00001.parquet` in ScienceQA's columns."""
    import datasets

    from mmlatent.data.synthetic import SynthConfig, generate_sample

    rows = []
    for i in range(n):
        s = generate_sample(SynthConfig(), seed, "eval", i)
        buf = io.BytesIO()
        s.images["img0"].save(buf, format="PNG")
        question = s.meta["messages"][0]["content"][1]["text"].split("\n")[0]
        rows.append({
            "image": {"bytes": buf.getvalue(), "path": None}, "question": question, "choices": s.meta["choices"],
            "answer": ord(s.meta["answer"]) - ord("A"), "hint": "", "subject": "natural science", "grade": "grade3",
        })
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")), "answer": datasets.Value("int64"),
        "hint": datasets.Value("string"), "subject": datasets.Value("string"), "grade": datasets.Value("string"),
    })
    path = root / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return root


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (0: torch's default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from mmlatent.data.synthetic_tokenizer import build_synthetic_tokenizer
    from mmlatent.evaluation.runner import EvalConfig, generate_responses
    from mmlatent.evaluation.tasks import load_eval_data
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    build_synthetic_tokenizer()  # the tiny preset's tokenizer (a no-op once built)
    torch.manual_seed(0)
    model = LatentVLM(preset("tiny")).to(args.device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_questions(Path(tmp), args.questions)
        data = load_eval_data("scienceqa", str(root), "test", cache_dir=str(Path(tmp) / "cache"))
        qs = data.questions

        def run(batch_size: int, questions=qs):
            cfg = EvalConfig(batch_size=batch_size, latent=True, max_new_tokens=args.max_new_tokens, progress=False)
            t0 = time.perf_counter()
            out = generate_responses(model, data, questions, cfg)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return out, time.perf_counter() - t0

        run(args.batch_size, qs[: args.batch_size])  # warm-up (allocator, kernels, lazy imports)
        run(1, qs[:2])
        batched, t_batched = run(args.batch_size)
        single, t_single = run(1)
    identical = [g.token_ids for g in batched] == [g.token_ids for g in single]
    per_q_single, per_q_batched = t_single / len(qs), t_batched / len(qs)
    result = {
        "batched_speedup": round(per_q_single / per_q_batched, 2),
        "identical_outputs": identical,
        "seconds_per_question_batch1": round(per_q_single, 4),
        f"seconds_per_question_batch{args.batch_size}": round(per_q_batched, 4),
        "questions": len(qs),
        "mean_latent_steps": round(sum(g.latent_steps for g in batched) / len(batched), 2),
        "mean_positions": round(sum(g.positions for g in batched) / len(batched), 2),
        "device": str(torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device),
        "cpu_threads": torch.get_num_threads(),
        "setting": f"tiny model, fp32, latent on, greedy, max_new_tokens={args.max_new_tokens}, "
                   f"batch 1 vs {args.batch_size}, ScienceQA-layout parquet of synthetic questions",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
