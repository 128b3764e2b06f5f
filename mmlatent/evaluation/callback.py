"""Evaluation during training: a Lightning callback that scores a benchmark subset at validation time.

At the end of each (n-th) validation epoch every rank generates answers for its own slice of the subset
(questions `rank::world_size`, interleaved so long and short prompts spread evenly), scores them, and the
scored lines are gathered to every rank with one `all_gather_object`. No rank evaluates the whole set
while the others wait on a collective; the trade-off is that the gather moves the output lines (text, a
few KB per question) between processes. Every rank then holds the same results, logs them as
`eval/{task}/acc`, `eval/{task}/unparsed` and one accuracy per breakdown group, and rank 0 writes the
usual output files under `output_dir/epoch=N/` when a folder is given. It calls the unwrapped `LatentVLM`
on each rank, so it suits single-device and DDP training; a sharded strategy (FSDP), where every forward
is a collective over all ranks, would need equal step counts per rank and is not supported.

Add it on the command line (`mmlatent fit -c CONFIG --trainer.callbacks+=eval/callbacks/scienceqa_img.yaml`)
or in a training config:

    trainer:
      callbacks:
        - class_path: mmlatent.evaluation.callback.EvalCallback
          init_args: {task: scienceqa, data: path/to/ScienceQA, subset: img, limit: 200}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from mmlatent.evaluation.protocols import ProtocolName
from mmlatent.evaluation.runner import EvalConfig, generate_responses, score, summarize, write_outputs
from mmlatent.evaluation.tasks import EvalData, load_eval_data
from mmlatent.model.latent_vlm import LatentVLM


def gather_records(records: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Every rank's output lines on every rank (as is outside a multi-process run)."""
    dist = torch.distributed
    if world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return records
    parts: list[list[dict[str, Any]] | None] = [None] * world_size
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in (part or [])]


def metric_name(task: str, group: str) -> str:
    """`eval/mmmu/Art_Design`: group names with spaces and symbols made logger-safe."""
    return f"eval/{task}/" + re.sub(r"[^A-Za-z0-9_.-]+", "_", group).strip("_")


class EvalCallback(L.Callback):
    """Scores a benchmark subset at the end of validation epochs, split across ranks."""

    def __init__(
        self,
        task: Literal["mmmu", "scienceqa"] = "scienceqa",
        data: str | None = None,
        split: str | None = None,
        subset: Literal["full", "img"] = "full",
        limit: int | None = 64,
        batch_size: int = 16,
        latent: bool = True,
        max_new_tokens: int = 64,
        every_n_epochs: int = 1,
        output_dir: str | None = None,
        cache_dir: str | None = None,
        protocol: ProtocolName | None = None,
    ):
        """
        Args:
            task: Benchmark.
            data: Hub dataset id or local folder (default: the task's Hub id).
            split: Split (default: validation for MMMU, test for ScienceQA).
            subset: `img` keeps only questions with an image.
            limit: Evaluate the first N questions (None: all of them).
            batch_size: Questions per generation batch on each rank.
            latent: Start answers in a latent block (False: text only).
            max_new_tokens: Most generated positions per question.
            every_n_epochs: Evaluate after every n-th validation epoch.
            output_dir: Where rank 0 writes samples.jsonl, results.json, results.png per epoch (None: only log).
            cache_dir: datasets cache folder (default: the HF cache).
            protocol: Scoring protocol (`llava`, `scienceqa`, `lmms-eval` for ScienceQA; `mmmu`, `lmms-eval`
                for MMMU; default: the task's first).
        """
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.task, self.data, self.split, self.subset, self.limit = task, data, split, subset, limit
        self.cfg = EvalConfig(batch_size=batch_size, latent=latent, max_new_tokens=max_new_tokens, progress=False)
        self.every_n_epochs = every_n_epochs
        self.output_dir = output_dir
        self.cache_dir = cache_dir
        self.protocol = protocol
        self.eval_data: EvalData | None = None
        self.last_results: dict[str, Any] | None = None

    def load(self) -> EvalData:
        if self.eval_data is None:
            self.eval_data = load_eval_data(
                self.task, self.data, self.split, self.subset, self.limit, cache_dir=self.cache_dir,
                protocol=self.protocol,
            )
        return self.eval_data

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.load()  # fail at start, not after the first epoch, when the data is not there

    def evaluate_rank(self, model: LatentVLM, rank: int, world_size: int) -> list[dict[str, Any]]:
        """Scored output lines of this rank's slice of the questions."""
        data = self.load()
        mine = data.questions[rank::world_size]
        generated = generate_responses(model, data, mine, self.cfg)
        return score(mine, [g.text for g in generated], generated, data.task)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        model = getattr(pl_module, "model", pl_module)
        records = gather_records(self.evaluate_rank(model, trainer.global_rank, trainer.world_size), trainer.world_size)
        data = self.load()
        order = {q.id: i for i, q in enumerate(data.questions)}
        records.sort(key=lambda r: order[r["id"]])
        results = summarize(data, records, epoch=trainer.current_epoch)
        self.last_results = results
        metrics = {f"eval/{self.task}/unparsed": float(results["unparsed"])}
        if results["acc"] is not None:
            metrics[f"eval/{self.task}/acc"] = float(results["acc"])
        b = results["breakdown"]
        for group, tally in {**b.get("disciplines", {}), **b.get("groups", {})}.items():
            if tally["acc"] is not None:
                metrics[metric_name(self.task, group)] = float(tally["acc"])
        for name, value in metrics.items():  # identical on every rank after the gather
            pl_module.log(name, value, sync_dist=True)
        if self.output_dir is not None and trainer.global_rank == 0:
            write_outputs(Path(self.output_dir) / f"epoch={trainer.current_epoch}", data, records, results)
