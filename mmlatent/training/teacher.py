"""Teacher hidden states for latent distillation: from a frozen model run online, or from a cache.

Stage 2 aligns the student's hidden states at observation tokens with the stage-1 teacher's (which sees
the aux images inline); stage 3 aligns its latent slots with stage 2's. Both read "the teacher's states
at some positions of its own view of the same sample", so one function, `teacher_states`, computes them
for the online teacher and for the cache writer alike, and the stage never knows which one it got.

The cache (`mmlatent teacher …`, `teacher_command.py`) runs the teacher once over the shards and stores, per sample key, a
(num_layers, n_positions, D) tensor in safetensors part files with an `index.json` mapping keys to parts.
The trade-off: disk (layers × positions × D per sample, fp16 by default) against a teacher forward per
step, which for stage 2 is the inline layout's full forward and for stage 3 a whole latent loop.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from mmlatent.atomic import write_bytes, write_text
from mmlatent.config_io import ConfigError
from mmlatent.data.batch import Batch
from mmlatent.data.masks import observation_mask
from mmlatent.model.latent_loop import latent_forward
from mmlatent.model.latent_vlm import LatentVLM

Positions = Literal["observation", "latent"]
INDEX = "index.json"
FORMAT_VERSION = 1


@dataclass
class TeacherConfig:
    """Where a distillation stage gets its teacher's hidden states (exactly one of the two)."""

    checkpoint: str | None = None
    """The previous stage's Lightning checkpoint, run online as a frozen teacher on every batch."""
    cache: str | None = None
    """A folder written by `mmlatent teacher`: the same states precomputed once, keyed by sample key."""


def target_positions(model: LatentVLM, input_ids: Tensor, kind: Positions) -> Tensor:
    """(B, L) ids -> (B, L) bool: observation tokens (stage 2) or latent slots (stage 3)."""
    if kind == "observation":
        return observation_mask(input_ids, model.ids.observation_open, model.ids.observation_close)
    return input_ids == model.ids.latent


def gather_states(hidden_states: tuple[Tensor, ...], positions: Tensor) -> list[Tensor]:
    """Per sample, the states of every layer after the embeddings at `positions`.

    hidden_states: num_layers + 1 tensors of (B, L, D); positions (B, L) bool -> B tensors (num_layers, n_b, D).
    """
    layers = torch.stack(hidden_states[1:])  # (num_layers, B, L, D)
    return [layers[:, b, positions[b]] for b in range(positions.shape[0])]


@torch.no_grad()
def teacher_states(model: LatentVLM, view: Batch, kind: Positions) -> list[Tensor]:
    """The teacher's per-sample (num_layers, n_b, D) states at `kind` positions of its own view."""
    if (view.input_ids == model.ids.latent).any():  # a latent view (stage 2's): run the latent loop
        out = latent_forward(
            model, view.input_ids, view.lm_attention_mask, view.position_ids, view.pixel_values, output_hidden_states=True,
            prompt_end=view.prompt_end,
        )
    else:
        out = model(view.input_ids, view.lm_attention_mask, view.position_ids, view.pixel_values, output_hidden_states=True)
    return gather_states(out.hidden_states, target_positions(model, view.input_ids, kind))


STAGE_OF: dict[str, str] = {"observation": "stage2", "latent": "stage3"}
"""The stage that reads a cache of each kind of positions (`mmlatent teacher --stage`)."""


class TeacherCache:
    """Reads a teacher-state cache folder: `states(keys)` -> the tensors, in order.

    Opening reads `index.json`; `check` (at start, before step 1) opens every part's header, so a damaged
    cache, one for the other stage or another model, or one that lacks a sample is a `ConfigError` naming
    the file and the cause instead of a failure mid-run.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if not index.is_file():
            raise ConfigError(f"teacher cache {self.folder}: no {INDEX} (write it with `mmlatent teacher`; an "
                              f"interrupted run leaves none)")
        try:
            meta = json.loads(index.read_text())
            self.kind: Positions = meta["positions"]
            self.keys: dict[str, str] = meta["keys"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"teacher cache {index} cannot be read: {err!r}") from None
        self._open: dict[str, object] = {}

    def _part(self, name: str):
        if name not in self._open:
            try:
                self._open[name] = safe_open(str(self.folder / name), framework="pt")
            except (OSError, SafetensorError) as err:
                raise ConfigError(f"teacher cache part {self.folder / name} cannot be read: {err}") from None
        return self._open[name]

    def check(self, kind: Positions, layers: int, width: int, keys: dict[str, list[str]]) -> None:
        """Fail naming the file unless the cache holds `kind` states of a `layers` × `width` model for every
        sample key of every split in `keys`."""
        if self.kind != kind:
            raise ConfigError(
                f"teacher cache {self.folder / INDEX} holds {self.kind} states (written with `mmlatent teacher "
                f"--stage {STAGE_OF.get(self.kind, '?')}`); {STAGE_OF[kind]} aligns at {kind} positions: point "
                f"stage.teacher.cache at a cache written with --stage {STAGE_OF[kind]}")
        for split, wanted in keys.items():
            missing = [k for k in wanted if k not in self.keys]
            if missing:
                raise ConfigError(
                    f"teacher cache {self.folder}: no states for {len(missing)} of the {len(wanted)} samples of "
                    f"data.{split} (e.g. {missing[0]!r}); write it with `mmlatent teacher --shards` over every split "
                    f"this run reads")
        for part in sorted(set(self.keys.values())):
            self._part(part)  # reads the header: a missing or truncated part fails here
        if self.keys:
            key = next(iter(self.keys))
            shape = self._part(self.keys[key]).get_slice(key).get_shape()  # (layers, n, D)
            if shape[0] != layers or shape[-1] != width:
                raise ConfigError(
                    f"teacher cache {self.folder}: its states come from a model with {shape[0]} layers of width "
                    f"{shape[-1]}, this model has {layers} of width {width} (a cache of another model?)")

    def states(self, keys: list[str]) -> list[Tensor]:
        missing = [k for k in keys if k not in self.keys]
        if missing:
            raise KeyError(f"teacher cache {self.folder} has no states for sample key(s) {missing[:5]}")
        return [self._part(self.keys[k]).get_tensor(k) for k in keys]


def write_teacher_cache(
    model: LatentVLM, batches, out: str | Path, kind: Positions, dtype: torch.dtype = torch.float16, total: int | None = None
) -> tuple[int, Counter]:
    """Run `model` over teacher-view `batches` and write one safetensors part per batch.

    Returns the number of samples cached and the samples the pipeline skipped, by reason (a filler batch,
    which stands in for a batch of unusable samples, is not cached; its counts are kept).
    Parts are written under a temporary name and renamed, and the index last, so an interrupted run never
    leaves a cache that looks complete.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    skipped: Counter = Counter()
    parts = 0
    with tqdm(total=total, unit="sample", desc="teacher states") as bar:
        for batch in batches:
            skipped.update(batch.skipped)
            if batch.filler:
                continue
            states = teacher_states(model, batch, kind)
            part = f"part-{parts:06d}.safetensors"
            parts += 1
            tensors = {k: s.to(dtype).contiguous() for k, s in zip(batch.keys, states)}
            dupes = sorted(set(tensors) & set(keys))
            if dupes:
                raise ValueError(f"sample key(s) {dupes[:5]} appear twice in the shards: the cache is keyed by sample key")
            write_bytes(out / part, save(tensors))  # through `atomic`: a full disk names the part
            keys.update({k: part for k in tensors})
            bar.update(len(batch))
    write_text(out / INDEX, json.dumps({"format_version": FORMAT_VERSION, "positions": kind, "keys": keys}, indent=0))
    return len(keys), skipped
