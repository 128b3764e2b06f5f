"""The LightningModule: builds a `LatentVLM`, asks its stage for losses, sums and logs them.

Like open_clip's task wrapper, the module owns no loss logic: the stage returns named `*_loss` terms, the
module adds them up, logs each, and steps the optimiser with the one LR schedule of `optim.py`. It also
keeps the data pipeline's skip counts (riding on each batch, fillers included) per split and logs them
per epoch, so a run on bad shards says what it dropped. Hyper-parameters are saved as plain dicts so checkpoints load with
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
from mmlatent.data.skips import SkipSummary
from mmlatent.data.processor import SequenceLayout
from mmlatent.evaluation.protocols import judge
from mmlatent.model.config import ModelConfig
from mmlatent.model.generation import GenerationConfig, generate
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.presets import preset
from mmlatent.training.acceleration import AccelerationConfig, apply_acceleration, prepare_ddp
from mmlatent.training.checkpoint_reader import init_weights
from mmlatent.training.fault import FaultConfig, StepGuard
from mmlatent.training.optim import OptimConfig, build_optimizer
from mmlatent.training.resume import gather_rng_states, set_rng_state
from mmlatent.training.resume_check import check_resume
from mmlatent.training.metrics import observation_accuracy
from mmlatent.training.stages import StageConfig, build_stage

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
        val_answers: bool = False,
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
            val_answers: Validation also generates every answer from its prompt (`generation` settings) and logs
                `val/answer_acc`, the share judged right as the benchmarks judge them (multiple choice: the
                parsed letter). Costs one generation pass over the validation split.
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
                "val_answers": val_answers,
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
        self.skipped: dict[str, Counter] = {split: Counter() for split in ("train", "val", "test")}
        """Samples the data pipeline skipped in the current epoch of each split, by reason."""
        self.guard = StepGuard(self.fault_cfg)
        self.filler_steps = 0
        self._accelerated = False
        self._rng_to_restore: list[dict] | None = None
        self._observation_counts = torch.zeros(2, dtype=torch.float64)  # (correct, total) of the eval epoch
        self.val_answers = val_answers
        self._answer_counts = torch.zeros(2, dtype=torch.float64)  # (correct, judged) of the validation epoch

    def data_layouts(self) -> tuple[SequenceLayout, SequenceLayout | None]:
        """(layout, online teacher's layout) this stage trains on: what the data module's must equal."""
        slots = self.vlm_cfg.latent.slots
        return self.stage.layout(slots), self.stage.online_teacher_layout(slots)

    def check_sample_keys(self, keys: dict[str, list[str]]) -> None:
        """The data module hands over every sample key of the splits the run reads before step 1; a teacher
        cache that lacks one (or belongs to another stage or model) stops the run here, naming it."""
        self.stage.check_sample_keys(self.model, keys)

    def configure_model(self) -> None:
        """Before the strategy wraps the model: DDP defaults, gradient checkpointing, torch.compile (once)."""
        if self._trainer is not None:
            prepare_ddp(self.trainer.strategy)
        if not self._accelerated:
            apply_acceleration(self.model, self.accel_cfg, trains_with_kv_cache=self.stage.trains_latent_blocks)
            self._accelerated = True

    def on_fit_start(self) -> None:
        self.stage.to(self.device)

    def on_validation_start(self) -> None:
        self.stage.to(self.device)

    def _real(self, batch: Batch, split: str) -> bool:
        """Count the batch's skips for `split`; whether it carries real samples (a filler carries none)."""
        self.skipped[split].update(batch.skipped)
        return not batch.filler

    def _log_skips(self, split: str) -> None:
        """Log and report the split's skip counts of the epoch (summed over ranks)."""
        summary = SkipSummary.of(self.skipped[split])
        for name, value in summary.metrics(split).items():  # e.g. data/skipped, data/val_skipped
            self.log(name, value, reduce_fx="sum", sync_dist=True)
        if summary.message():
            log.warning("%s epoch %d: %s", split, self.current_epoch, summary.message())

    def _step(self, batch: Batch, prefix: str) -> Tensor:
        out = self.stage.forward(self.model, batch)
        losses = self.stage.losses(self.model, batch, out)
        total = torch.stack(list(losses.values())).sum()
        if batch.filler:  # a stand-in for a step without data (training only): run it, learn nothing, log nothing
            return total * 0.0
        bs, sync = len(batch), prefix != "train"
        for name, value in losses.items():
            self.log(f"{prefix}/{name}", value, batch_size=bs, sync_dist=sync)
        self.log(f"{prefix}/loss", total, prog_bar=True, batch_size=bs, sync_dist=sync)
        ids = self.model.ids
        correct, n = observation_accuracy(out.logits.detach(), batch.input_ids, batch.labels, ids.observation_open, ids.observation_close)
        if prefix == "train":
            if n:
                self.log("train/observation_acc", correct / n, batch_size=n)
        else:  # summed over the epoch (and ranks) and logged once: the token-level accuracy of the split
            self._observation_counts += torch.tensor([correct, n], dtype=torch.float64)
        return total

    def _log_ratio(self, name: str, counts: Tensor) -> None:
        """Log `name` = correct / total from (correct, total) counts summed over every rank, if total > 0."""
        counts = counts.to(self.device)
        if self._trainer is not None:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        correct, n = counts.tolist()
        if n:  # the same on every rank after the reduction, so every rank logs or none does
            self.log(name, correct / n)

    def _log_observation_acc(self, prefix: str) -> None:
        self._log_ratio(f"{prefix}/observation_acc", self._observation_counts)
        self._observation_counts = torch.zeros(2, dtype=torch.float64)

    def _count_answers(self, batch: Batch) -> None:
        """Generate the batch's answers and add (right, judged) to the epoch's counts (`val_answers`)."""
        outs = generate(self.model, batch.input_ids, batch.starts, batch.prompt_lengths, batch.pixel_values, self.gen_cfg)
        for g, gold, choices in zip(outs, batch.answers, batch.choices):
            verdict = judge("multiple-choice" if choices else "open", choices, gold, g.text)
            self._answer_counts += torch.tensor([bool(verdict.correct), 1.0], dtype=torch.float64)

    def on_validation_epoch_start(self) -> None:
        self._observation_counts = torch.zeros(2, dtype=torch.float64)
        self._answer_counts = torch.zeros(2, dtype=torch.float64)
        self.skipped["val"].clear()

    def on_validation_epoch_end(self) -> None:
        self._log_observation_acc("val")
        if self.val_answers:
            self._log_ratio("val/answer_acc", self._answer_counts)
        self._log_skips("val")

    def on_test_epoch_start(self) -> None:
        self._observation_counts = torch.zeros(2, dtype=torch.float64)
        self.skipped["test"].clear()

    def on_test_epoch_end(self) -> None:
        self._log_observation_acc("test")
        self._log_skips("test")

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        filler = not self._real(batch, "train")
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
        if not self._real(batch, "val"):
            return None
        if self.val_answers:
            self._count_answers(batch)
        return self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        return self._step(batch, "test") if self._real(batch, "test") else None

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict]:
        """Generate an answer for each sample's prompt (the chat up to the assistant turn)."""
        if batch.filler:
            return []
        outs = generate(self.model, batch.input_ids, batch.starts, batch.prompt_lengths, batch.pixel_values, self.gen_cfg)
        return [
            {"key": k, "response": g.text, "answer": a, "positions": g.positions, "latent_steps": g.latent_steps}
            for k, g, a in zip(batch.keys, outs, batch.answers)
        ]

    def on_train_epoch_start(self) -> None:
        self.skipped["train"].clear()
        self.filler_steps = 0

    def on_train_epoch_end(self) -> None:
        self._log_skips("train")  # data/skipped (samples), data/damage_events, data/truncated
        self.log("data/filler_steps", float(self.filler_steps), reduce_fx="sum", sync_dist=True)
        self.log("train/skipped_steps", float(self.guard.skipped_steps), sync_dist=True)  # the same on every rank

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Every rank's RNG states (a collective: every rank dumps the checkpoint, rank 0 writes it)."""
        checkpoint["rng_states"] = gather_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resume (`--ckpt_path`) must be the same run: stop when the checkpoint's stage or model settings
        are not this command's (`resume_check`); then keep its RNG states for the first batch."""
        path = self._trainer.ckpt_path if self._trainer is not None else None
        check_resume(f"--ckpt_path {path}" if path else "the checkpoint", checkpoint.get("hyper_parameters", {}),
                     dict(self.hparams), {"vlm": ("model.vlm", ModelConfig), "stage": ("model.stage", StageConfig)})
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
