"""Reading mmlatent's Lightning checkpoints outside the Trainer: the one place that opens them.

Stage hand-off (`init_from`), online teachers and the teacher-cache command all need "the `LatentVLM` in
this checkpoint" without a Trainer. Checkpoints are opened with `torch.load(weights_only=True)`: the
module stores its hyper-parameters as plain dicts, so no pickle of a class is needed, and nothing in a
checkpoint can run code. A file that cannot be read (truncated, empty, not a checkpoint) is a
`CheckpointError` naming it and the cause in one line (`checkpoint_error`; Lightning's own loading of
`--ckpt_path` goes through `checkpointing.AtomicCheckpointIO`, which raises the same).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from mmlatent.config_io import ConfigError, from_dict
from mmlatent.model.config import ModelConfig
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.weight_memory import FilePages

MODEL_PREFIX = "model."
"""Prefix of the `LatentVLM` parameters in the Lightning module's state dict."""


INIT_CHUNK_BYTES = 256 * 2**20
"""How much of a checkpoint `init_weights` and `load_model` copy before releasing the file pages they read."""

READ_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError)
"""What `torch.load` raises on a file that is not a readable checkpoint."""


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be read; the message names the file and the cause."""


def checkpoint_error(path: str | Path, err: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint `torch.load` could not read."""
    first = (str(err).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
    if isinstance(err, EOFError):
        cause = "the file ends early (empty or truncated)"
    elif isinstance(err, pickle.UnpicklingError):
        cause = "not a PyTorch checkpoint of tensors and plain values (torch.load with weights_only=True refused it)"
    elif "central directory" in first or isinstance(err, zipfile.BadZipFile):
        cause = f"truncated, or not a PyTorch checkpoint ({first})"
    else:
        cause = first or type(err).__name__
    return CheckpointError(f"checkpoint {path} cannot be read: {cause}; write it again or use another checkpoint")


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict (a file, or a sharded checkpoint folder consolidated), with a clear error when it is
    missing, unreadable or not a Lightning checkpoint."""
    path = Path(path)
    if path.is_dir():
        from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint

        if not (path / _METADATA_FILENAME).is_file():
            raise ValueError(f"{path} is a folder but not a sharded Lightning checkpoint (no {_METADATA_FILENAME})")
        ckpt = _load_distributed_checkpoint(path)
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    else:
        try:
            try:  # memory-mapped: a multi-GB checkpoint is not read whole to take a few tensors
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap can only be used" not in str(err):
                    raise
                ckpt = torch.load(path, map_location="cpu", weights_only=True)  # legacy format, empty or damaged
        except READ_ERRORS as err:
            raise checkpoint_error(path, err) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{path} is not an mmlatent Lightning checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The `LatentVLM` part of a module state dict, with the `model.` prefix removed."""
    return {k[len(MODEL_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(MODEL_PREFIX)}


def load_model(path: str | Path) -> LatentVLM:
    """The `LatentVLM` a checkpoint holds, built from its stored config, in eval mode."""
    ckpt = read_checkpoint(path)
    model = LatentVLM(from_dict(ModelConfig, ckpt["hyper_parameters"]["vlm"]))
    state, own = model_state(ckpt), model.state_dict()
    if set(state) != set(own):
        missing, unknown = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"checkpoint {path} does not match the model it describes: missing {missing[:5]}, "
                         f"unknown {unknown[:5]}")
    _copy_in_chunks(model, state)
    return model.eval()


def _copy_in_chunks(model: LatentVLM, state: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state)` in chunks of `INIT_CHUNK_BYTES`, handing each chunk's pages of the
    memory-mapped checkpoint back once copied (weight_memory.py): the host holds the model and one chunk."""
    pages, chunk, size = FilePages(), {}, 0
    for i, (name, tensor) in enumerate(state.items(), 1):
        chunk[name], size = tensor, size + tensor.numel() * tensor.element_size()
        if size >= INIT_CHUNK_BYTES or i == len(state):
            model.load_state_dict(chunk, strict=False)
            for view in chunk.values():
                pages.release(view)
            chunk, size = {}, 0


def init_weights(model: LatentVLM, path: str | Path) -> list[str]:
    """Copy the weights of a previous stage's checkpoint into `model` (stage hand-off).

    Every tensor the checkpoint holds must fit; parameters the checkpoint lacks keep their fresh init (a
    later stage may add an LQ-Former or a diffusion head) and their names are returned so the caller can
    say so. A shape mismatch or an unknown key is an error naming the tensor. The memory-mapped checkpoint
    is copied in chunks (`_copy_in_chunks`), so the host holds the model and one chunk, not two models.
    """
    state = model_state(read_checkpoint(path))
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"init_from {path}: tensors not in this model: {unknown[:5]}{' …' if len(unknown) > 5 else ''}")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"init_from {path}: {name} has shape {tuple(tensor.shape)}, model has {tuple(own[name].shape)}")
    _copy_in_chunks(model, state)
    return sorted(set(own) - set(state))
