"""One training run of a tiny-demo stage for the FSDP2 tests: `python -m tests.training.fsdp_run ...`.

The same fixed list of global batches (the real processor's batches of the stage's layout, from synthetic
shards) is trained on two ways: with `--devices 2` under `FSDP2Strategy`, rank r takes micro-batch r of
every global batch; with `--devices 1` a single process takes both micro-batches of a global batch and
accumulates them into one optimiser step (`accumulate_grad_batches=2`). Both average the two gradients,
so their losses and weights must agree to float tolerance. Each run trains two epochs over the list,
writes a checkpoint after each epoch (sharded with `--sharded`) and one JSON line per training batch
(`losses.rank{R}.jsonl`: epoch, batch, step, keys, loss). `--resume` continues from a checkpoint;
`--predict` then generates an answer per sample (`predictions.rank{R}.json`).
Lightning starts the second FSDP2 rank by running this module again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

MICRO_BATCH = 2
"""Samples per micro-batch (one rank's batch)."""
GLOBAL_BATCHES = 2
"""Global batches (optimiser steps) per epoch."""


def stage_config(name: str, teacher: str | None):
    from mmlatent.training.grounding import GroundingConfig
    from mmlatent.training.stages import StageConfig
    from mmlatent.training.teacher import TeacherConfig

    if name == "stage1":
        return StageConfig(name="stage1", grounding=GroundingConfig(selection_weight=1.0))
    return StageConfig(name=name, align_weight=1.0 if name == "stage2" else 2.0, teacher=TeacherConfig(checkpoint=teacher),
                       grounding=GroundingConfig(selection_weight=1.0, sketch_weight=0.1))


def fixed_batches(module, data: Path, n: int) -> list:
    """The first `n` batches of `MICRO_BATCH` samples the stage's data module renders, in order."""
    from mmlatent.training.datamodule import ShardDataModule, SplitConfig

    layout, teacher = module.data_layouts()
    dm = ShardDataModule(train=SplitConfig(shards=str(data / "train")), val=SplitConfig(shards=""), batch_size=MICRO_BATCH,
                         num_workers=0, shuffle_buffer=0, layout=layout, teacher_layout=teacher)
    dm.attach_model(module.model)
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) == n:
            return batches
    raise ValueError(f"{data} gave {len(batches)} batches of {MICRO_BATCH}, {n} needed")


class ListBatches(L.LightningDataModule):
    """Micro-batch r of every global batch for rank r (all of them, in order, for a single process)."""

    def __init__(self, batches: list):
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        mine = self.batches[rank::world]
        return DataLoader(mine, batch_size=None, shuffle=False, collate_fn=lambda b: b)

    predict_dataloader = train_dataloader


class LossRecorder(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        line = {"epoch": trainer.current_epoch, "batch": batch_idx, "step": trainer.global_step,
                "keys": batch.keys, "loss": float(outputs["loss"])}
        with open(self.out / f"losses.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", required=True, choices=["stage1", "stage2", "stage3"])
    ap.add_argument("--devices", type=int, required=True, choices=[1, 2])
    ap.add_argument("--data", type=Path, required=True, help="synthetic shards (train/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--init-from", default=None)
    ap.add_argument("--teacher", default=None, help="the online teacher's checkpoint (stages 2 and 3)")
    ap.add_argument("--sharded", action="store_true", help="FSDP2: sharded checkpoint folders")
    ap.add_argument("--resume", default=None, help="checkpoint to continue from")
    ap.add_argument("--predict", action="store_true", help="then generate an answer for every sample of this rank")
    args = ap.parse_args()

    from mmlatent.model.presets import preset
    from mmlatent.training.checkpointing import AtomicCheckpointIO
    from mmlatent.training.fsdp import FSDP2Strategy
    from mmlatent.training.module import LatentVLMModule
    from mmlatent.training.optim import OptimConfig

    L.seed_everything(0)
    args.out.mkdir(parents=True, exist_ok=True)
    vlm = preset("tiny-demo")
    # `projector.centre: batch` standardises over each rank's own micro-batch (as BatchNorm without a
    # synchronised variant), so two ranks on halves and one process on the whole batch differ by design.
    vlm.projector.centre = "none"
    module = LatentVLMModule(vlm=vlm, stage=stage_config(args.stage, args.teacher),
                             optim=OptimConfig(lr=1e-3, warmup_steps=1, schedule="cosine"), init_from=args.init_from)
    batches = fixed_batches(module, args.data, 2 * GLOBAL_BATCHES)
    fsdp = args.devices > 1
    strategy = FSDP2Strategy(param_dtype=None, reduce_dtype=None, save_distributed_checkpoint=args.sharded) if fsdp else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, precision="32-true", max_epochs=2,
        accumulate_grad_batches=1 if fsdp else 2, gradient_clip_val=1.0, deterministic=True, logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()], default_root_dir=str(args.out),
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(args.out / "ckpt"), filename="{epoch}",
                                                       save_top_k=-1, every_n_epochs=1),
                   LossRecorder(args.out)],
    )
    data = ListBatches(batches)
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)
    if args.predict:  # ranks decode different numbers of steps (FSDP2: every unit gathered meanwhile)
        answers = [a for batch in trainer.predict(module, datamodule=data) for a in batch]
        (args.out / f"predictions.rank{trainer.global_rank}.json").write_text(json.dumps(answers))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
