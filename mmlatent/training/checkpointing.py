"""Atomic checkpoint writes (a checkpoint file is either the old complete one or the new complete one), and a
`last.ckpt` that is always the run's latest state (`LatestCheckpoint`, below).

`AtomicCheckpointIO` is Lightning's `TorchCheckpointIO` with a different `save_checkpoint`: it writes the
checkpoint durably and atomically through `mmlatent.atomic.write_bytes` (a hidden temporary file in the
same folder, fsynced, renamed over the target, the folder fsynced so the rename survives a power cut). A write that fails partway (disk full, a killed process, a bad object)
leaves the previous checkpoint untouched and removes its temporary file, so `--ckpt_path=last` always
finds the last good state. Lightning's own writer streams into the target path (through an fsspec
transaction whose temporary file may live on another file system), so a crash mid-write can leave a
truncated `last.ckpt`. Loading uses `weights_only=True` (DESIGN §5): every object mmlatent puts in a
checkpoint is a tensor, a number, a string or a container of those; a file it cannot read stops the run
at start with one line naming it (`checkpoint_reader.CheckpointError`).

The trade-off: the checkpoint is serialised in memory first (as Lightning does) and needs room for a
second copy on disk while it is written; remote paths (`s3://…`) fall back to Lightning's writer, which
uploads the object in one request (object stores do not expose half-written objects).

Use it with `--trainer.plugins=mmlatent.training.checkpointing.AtomicCheckpointIO` (the `mmlatent` CLI
sets it by default). Sharded FSDP checkpoints (`state_dict_type="sharded"`) are folders written by
`torch.distributed.checkpoint` and do not pass through a `CheckpointIO`.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmlatent.atomic import write_bytes
from mmlatent.training.checkpoint_reader import READ_ERRORS, checkpoint_error

log = logging.getLogger(__name__)


def _to_storage(storage, location):
    """`map_location` that keeps tensors on the CPU (Lightning's default)."""
    return storage


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes atomically (`mmlatent.atomic`) and loads weights only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        if "://" in str(path):  # object stores: Lightning's writer (one upload, never half-visible)
            return super().save_checkpoint(checkpoint, path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes(path, buffer.getvalue(), durable=True)

    def load_checkpoint(self, path, map_location: Any = _to_storage, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader with `weights_only=True` unless the caller says otherwise; an unreadable file
        is a one-line `CheckpointError` naming it."""
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only is not False)
        except FileNotFoundError:
            raise
        except READ_ERRORS as err:
            raise checkpoint_error(path, err) from err


class LatestCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` whose `last.ckpt` is always the latest state of the run.

    Lightning 2.6 refreshes `last.ckpt` only when a top-k checkpoint is written at the same step. With a
    monitored metric that stops improving (a validation loss that rises late in a run), or with a step
    interval that does not divide the run's length, `last.ckpt` falls behind the run, and
    `--ckpt_path=last`, the next stage's `init_from` and `mmlatent export` would silently take older
    weights. This callback writes `last.ckpt` at every validation end and at the end of training whenever
    it is not already the current step; top-k selection (`monitor`, `save_top_k`) is unchanged.
    """

    def _refresh_last(self, trainer) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer) and trainer.training:
            self._refresh_last(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.fast_dev_run and not trainer.sanity_checking:
            self._refresh_last(trainer)
