"""The LightningModule: builds a `LatentVLM`, asks its stage for losses, sums and logs them.

Like open_clip's task wrapper, the module owns no loss logic: the stage returns named `*_loss` terms, the
module adds them up, logs each, and steps the optimiser with the one LR schedule of `optim.py`. It also
keeps the data pipeline's skip counts (riding on each batch) and logs them per epoch, so a run on bad
shards says what it dropped. Hyper-parameters are saved as plain dicts so checkpoints load with
`torch.load(weights_only=True)`.

Fault tolerance and scale live in small helpers it calls: `fault.StepGuard` decides (identically on all
ranks) whether an optimiser step runs after a NaN/Inf loss or when every rank holds a zero-weight filler
batch; `resume` puts each rank's RNG states in the checkpoint and back, so a resumed run continues bit
for bit (the data stream's position is saved by the stateful `EpochLoader` itself); `acceleration`
applies gradient checkpointing and torch.compile and prepares DDP before the strategy wraps the model.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import asdict

import lightning as L
import torch
from torch import Tensor

from mmlatent.config_io import from_dict
from mmlatent.data.batch import Batch
from mmlatent.data.pipeline import KEPT, FillerBatch
from mmlatent.data.processor import Processor, ProcessorConfig
from mmlatent.model.config import ModelConfig
from mmlatent.model.generation import GenerationConfig, generate
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.presets import preset
from mmlatent.training.acceleration import AccelerationConfig, apply_acceleration, prepare_ddp
from mmlatent.training.checkpoint_io import init_weights
from mmlatent.training.fault import FaultConfig, StepGuard
from mmlatent.training.optim import OptimConfig, build_optimizer
from mmlatent.training.resume import gather_rng_states, set_rng_state
from mmlatent.training.stages import LatentStage, StageConfig, build_stage

log = logging.getLogger(__name__)


class LatentVLMModule(L.LightningModule):
    """Trains one stage of a `LatentVLM`."""

    def __init__(
        self,
        vlm: ModelConfig = preset("tiny"),
        stage: StageConfig = StageConfig(),
        optim: OptimConfig = OptimConfig(),
        generation: GenerationConfig = GenerationConfig(),
        init_from: str | None = None,
        fault: FaultConfig = FaultConfig(),
        acceleration: AccelerationConfig = AccelerationConfig(),
    ):
        """
        Args:
            vlm: The model to build (vision tower, projector, LM, tokenizer). Default: the `tiny` preset.
            stage: Which stage to train and its loss weights.
            optim: AdamW, warm-up and decay, per-module learning-rate multiples.
            generation: Decoding settings for `predict` (and evaluation during training).
            init_from: The previous stage's checkpoint (`.ckpt`): its weights initialise this stage's model
                (stage hand-off). Resuming this stage itself is `--ckpt_path`, which restores everything.
            fault: What a NaN/Inf loss does: skip the optimiser step (on every rank) or stop naming the batch.
            acceleration: Gradient checkpointing and torch.compile (precision and strategy are Trainer settings).
        """
        super().__init__()
        # `load_from_checkpoint` passes the stored plain dicts; defaults are shared objects: keep private copies
        self.vlm_cfg, self.stage_cfg, self.optim_cfg, self.gen_cfg, self.fault_cfg, self.accel_cfg = copy.deepcopy(
            (
                from_dict(ModelConfig, vlm),
                from_dict(StageConfig, stage),
                from_dict(OptimConfig, optim),
                from_dict(GenerationConfig, generation),
                from_dict(FaultConfig, fault),
                from_dict(AccelerationConfig, acceleration),
            )
        )
        self.save_hyperparameters(
            {
                "vlm": asdict(self.vlm_cfg),
                "stage": asdict(self.stage_cfg),
                "optim": asdict(self.optim_cfg),
                "generation": asdict(self.gen_cfg),
                "fault": asdict(self.fault_cfg),
                "acceleration": asdict(self.accel_cfg),
            }
        )
        self.model = LatentVLM(self.vlm_cfg)
        # not a hyper-parameter: a checkpoint of this stage already holds the weights init_from gave
        if init_from is not None:
            fresh = init_weights(self.model, init_from)
            if fresh:
                log.info("init_from %s: %d tensors not in the checkpoint keep their fresh init: %s", init_from, len(fresh), fresh)
        self.stage = build_stage(self.stage_cfg)
        self.stage_cfg.grounding.check(self.model)
        self.skipped: Counter = Counter()
        self.guard = StepGuard(self.fault_cfg)
        self.filler_steps = 0
        self._accelerated = False
        self._rng_to_restore: list[dict] | None = None

    def build_processor(self, train: bool, cfg: ProcessorConfig | None = None) -> Processor:
        """The data processor matching this model and stage (called by the data module)."""
        slots = self.vlm_cfg.latent.slots
        teacher = getattr(self.stage, "online_teacher_layout", lambda n: None)(slots)
        return Processor.for_model(self.model, self.stage.layout(slots), cfg or ProcessorConfig(), teacher)

    def configure_model(self) -> None:
        """Before the strategy wraps the model: DDP defaults, gradient checkpointing, torch.compile (once)."""
        if self._trainer is not None:
            prepare_ddp(self.trainer.strategy)
        if not self._accelerated:
            apply_acceleration(self.model, self.accel_cfg, trains_with_kv_cache=isinstance(self.stage, LatentStage))
            self._accelerated = True

    def on_fit_start(self) -> None:
        self.stage.to(self.device)

    def on_validation_start(self) -> None:
        self.stage.to(self.device)

    def _step(self, batch: Batch, prefix: str) -> Tensor:
        self.skipped.update(batch.skipped)
        losses = self.stage.losses(self.model, batch)
        total = torch.stack(list(losses.values())).sum()
        if isinstance(batch, FillerBatch):  # a stand-in for a step without data: run it, learn nothing, log nothing
            return total * 0.0
        bs = len(batch)
        for name, value in losses.items():
            self.log(f"{prefix}/{name}", value, batch_size=bs, sync_dist=prefix != "train")
        self.log(f"{prefix}/loss", total, prog_bar=True, batch_size=bs, sync_dist=prefix != "train")
        return total

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        filler = isinstance(batch, FillerBatch)
        self.filler_steps += filler
        loss = self._step(batch, "train")
        self.guard.check(loss, batch.keys, filler, self.global_step, self.current_epoch, batch_idx)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Run forward and backward (the closure) on every rank, then step unless `StepGuard` says skip."""
        result = optimizer_closure() if optimizer_closure is not None else None
        if self.guard.take(self.global_step):
            optimizer.zero_grad(set_to_none=True)
            return
        optimizer.step(closure=lambda: result)

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        return None if isinstance(batch, FillerBatch) else self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        return None if isinstance(batch, FillerBatch) else self._step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict]:
        """Generate an answer for each sample's prompt (the chat up to the assistant turn)."""
        if isinstance(batch, FillerBatch):
            return []
        outs = generate(self.model, batch.input_ids, batch.prompt_lengths, batch.pixel_values, self.gen_cfg)
        return [
            {"key": k, "response": g.text, "answer": a, "positions": g.positions, "latent_steps": g.latent_steps}
            for k, g, a in zip(batch.keys, outs, batch.answers)
        ]

    def on_train_epoch_start(self) -> None:
        self.skipped.clear()
        self.filler_steps = 0

    def on_train_epoch_end(self) -> None:
        skipped = {r: n for r, n in self.skipped.items() if r not in KEPT}
        total = sum(skipped.values())
        self.log("data/skipped", float(total), reduce_fx="sum", sync_dist=True)
        self.log("data/truncated", float(sum(self.skipped[r] for r in KEPT)), reduce_fx="sum", sync_dist=True)
        self.log("data/filler_steps", float(self.filler_steps), reduce_fx="sum", sync_dist=True)
        self.log("train/skipped_steps", float(self.guard.skipped_steps), sync_dist=True)  # the same on every rank
        if total:
            log.warning("epoch %d: skipped %d samples by reason %s", self.current_epoch, total, skipped)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Every rank's RNG states (a collective: every rank dumps the checkpoint, rank 0 writes it)."""
        checkpoint["rng_states"] = gather_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """After a resume, put this rank's RNG states back just before its first step."""
        if self._rng_to_restore:
            set_rng_state(self._rng_to_restore[self.global_rank % len(self._rng_to_restore)])
            self._rng_to_restore = None

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1000
        opt, sched = build_optimizer(self.model, self.optim_cfg, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
