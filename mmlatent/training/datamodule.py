"""The LightningDataModule: shard locations in, an `EpochLoader` of typed batches out.

It asks the LightningModule for the processor (tokenizer, image transform and the stage's layout), so
the data side never guesses what the model wants. Every rank runs the same number of steps per epoch:
samples ÷ (world size × batch size), with the sample count read from the `manifest.json` that
`mmlatent data synth` and the converters write, or given explicitly. Settings that cannot work fail at
start with a message naming the field.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
from braceexpand import braceexpand

from mmlatent.data.batch import collate
from mmlatent.data.mixture import MixtureConfig, mixture_loader
from mmlatent.data.pipeline import EpochLoader, ShardStream
from mmlatent.data.processor import Processor, ProcessorConfig


@dataclass
class SplitConfig:
    """Where one split's shards are and how many samples they hold."""

    shards: str = ""
    """A folder of `*.tar` shards, a brace pattern (`data/train/shard-{000000..000009}.tar`), a single
    tar, or a `pipe:`/URL pattern webdataset understands."""
    samples: int | None = None
    """Samples in the split; None reads it from `manifest.json` in the folder or its parent."""


def expand_shards(spec: str, field_name: str) -> list[str]:
    """Resolve a shard spec to a sorted list of URLs; raises naming `field_name` when nothing matches."""
    if not spec:
        raise ValueError(f"{field_name} is empty: give a folder of .tar shards or a brace pattern")
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif "://" in spec or spec.startswith("pipe:"):
        urls = list(braceexpand(spec))
    else:
        urls = [u for u in braceexpand(spec) if os.path.exists(u)]
    if not urls:
        raise ValueError(f"{field_name}={spec!r} matches no shard")
    return urls


def manifest_count(spec: str) -> int | None:
    """The split's sample count from a `manifest.json` beside the shards (folder or its parent)."""
    folder = Path(spec if os.path.isdir(spec) else os.path.dirname(spec) or ".")
    for candidate in (folder / "manifest.json", folder.parent / "manifest.json"):
        if candidate.exists():
            manifest = json.loads(candidate.read_text())
            split = manifest.get("splits", {}).get(folder.name)
            if split is not None:
                return int(split["written"])
            if "written" in manifest:
                return int(manifest["written"])
    return None


class ShardDataModule(L.LightningDataModule):
    """Streams WebDataset shards for training, validation, test and prediction."""

    def __init__(
        self,
        train: SplitConfig = SplitConfig(shards="data/synth/train"),
        val: SplitConfig = SplitConfig(shards="data/synth/val"),
        batch_size: int = 16,
        num_workers: int = 2,
        shuffle_buffer: int = 500,
        resampled: bool = False,
        seed: int = 0,
        processor: ProcessorConfig = ProcessorConfig(),
        mixture: MixtureConfig | None = None,
    ):
        """
        Args:
            train: Training shards (`--data.train.shards=DIR`). The tiny configs point at `data/synth/train`.
            val: Validation shards; also used by `validate`, `test` and `predict`. Empty `shards`: no validation.
            batch_size: Samples per batch on each rank.
            num_workers: Data-loader worker processes per rank (0 reads in the main process).
            shuffle_buffer: Size of the in-memory sample shuffle buffer (0 disables; validation never shuffles).
            resampled: Draw training shards with replacement (an endless stream, for mixtures and very
                large corpora) instead of looping over them in reshuffled passes.
            seed: Seed of shard and sample shuffling.
            processor: Sequence-length limit and the policy for longer samples.
            mixture: Train on several shard sets drawn by weight (e.g. Monet's six subsets) instead of
                `train`; each set's shards are drawn with replacement. None: train on `train`.
        """
        super().__init__()
        self.train_cfg = train
        self.val_cfg = val if val.shards else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.seed = seed
        self.processor_cfg = processor
        self.mixture = mixture
        self._processor: Processor | None = None
        self._eval_processor: Processor | None = None
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be at least 1")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")

    def attach_processors(self, train: Processor, evaluation: Processor) -> None:
        """Set the processors directly (benchmarks and tests use this without a Trainer)."""
        self._processor, self._eval_processor = train, evaluation

    def setup(self, stage: str) -> None:
        if self._processor is None:
            module = self.trainer.lightning_module
            self.attach_processors(
                module.build_processor(train=True, cfg=self.processor_cfg),
                module.build_processor(train=False, cfg=self.processor_cfg),
            )

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _loader(self, split: SplitConfig, name: str, train: bool) -> EpochLoader:
        urls = expand_shards(split.shards, f"data.{name}.shards")
        num_workers = self.num_workers
        if not train:  # evaluation sets are small: use fewer workers rather than fail
            num_workers = min(num_workers, max(1, len(urls) // self.world_size))
        workers = max(1, num_workers)
        if not (train and self.resampled) and len(urls) < self.world_size * workers:
            raise ValueError(
                f"data.{name}.shards has {len(urls)} shard(s) but {self.world_size} rank(s) × {workers} worker(s) "
                f"each need at least one: write more shards (e.g. `--samples_per_shard` smaller) or lower "
                f"data.num_workers"
            )
        samples = split.samples if split.samples is not None else manifest_count(split.shards)
        if samples is None:
            raise ValueError(f"data.{name}.samples is not set and no manifest.json was found beside {split.shards!r}")
        batches = samples // (self.world_size * self.batch_size)
        if batches < 1:
            raise ValueError(
                f"data.{name}: {samples} samples are fewer than one global batch "
                f"({self.world_size} rank(s) × data.batch_size={self.batch_size})"
            )
        processor = self._processor if train else self._eval_processor
        stream = ShardStream(
            urls,
            processor,
            partial(collate, pad_id=processor.ids.pad, latent_start_id=processor.ids.latent_start),
            self.batch_size,
            resampled=train and self.resampled,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            seed=self.seed,
        )
        return EpochLoader(stream, batches, num_workers)

    def train_dataloader(self) -> EpochLoader:
        if self.mixture is not None:
            return mixture_loader(
                self.mixture, self._processor, batch_size=self.batch_size, num_workers=self.num_workers,
                world_size=self.world_size, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
                expand=expand_shards, count=manifest_count,
            )
        return self._loader(self.train_cfg, "train", train=True)

    def _eval_split(self) -> tuple[SplitConfig, str]:
        if self.val_cfg is None:
            raise ValueError("data.val.shards is not set; validation, test and predict need it")
        return self.val_cfg, "val"

    def val_dataloader(self) -> EpochLoader | list:
        return [] if self.val_cfg is None else self._loader(*self._eval_split(), train=False)

    def test_dataloader(self) -> EpochLoader:
        return self._loader(*self._eval_split(), train=False)

    def predict_dataloader(self) -> EpochLoader:
        return self._loader(*self._eval_split(), train=False)
