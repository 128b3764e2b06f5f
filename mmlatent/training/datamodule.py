"""The LightningDataModule: shard locations in, an `EpochLoader` of typed batches out.

Its configuration says how a sample becomes a sequence: `layout` (and `teacher_layout` for an online
teacher's view), which the CLI links from `model.stage` and the model's slot count, so one config file
states both and they cannot drift. The tokenizer, image transform and image-token count are the model's
own and are read from the trainer's model at `setup`; a layout that is not the model stage's is an error
naming both. Training and evaluation read exact epochs: every
sample once per epoch across all ranks and workers, every rank the same ⌈N ÷ (W × B)⌉ steps, the last
step or two holding smaller batches (`remainder`, see `data/plan.py`). The sample count N is
counted from the shards themselves, once, by rank 0 at `setup`, and shared with every rank (a partial set,
a shard that cannot be read or a key seen twice stops the run there, as does a teacher cache that lacks a
key the splits hold); a `manifest.json` count that disagrees is reported. The resampled
mode and mixtures serve endless streams cut into epochs of `samples ÷ (W × B)` full batches. The train
loader is stateful, so a checkpoint holds every rank's and worker's position and a resume continues the
stream where it stopped. Settings that cannot work fail at start with a message naming the field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import torch

from mmlatent.config_io import ConfigError
from mmlatent.data.mixture import MixtureConfig, mixture_loader, resolve_sources
from mmlatent.data.pipeline import EpochLoader, ShardStream
from mmlatent.data.plan import Remainder
from mmlatent.data.processor import Processor, ProcessorConfig, SequenceLayout
from mmlatent.data.shards import expand_shards, manifest_count, shard_keys, shard_sizes, shared

log = logging.getLogger(__name__)


@dataclass
class SplitConfig:
    """Where one split's shards are and how many samples they hold."""

    shards: str = ""
    """A folder of `*.tar` shards, a brace pattern (`data/train/shard-{000000..000009}.tar`), a single
    tar, or a `pipe:`/URL pattern webdataset understands."""
    samples: int | None = None
    """Samples in the split; None reads it from `manifest.json` in the folder or its parent. It sizes the
    epochs of the resampled mode; exact epochs count the shards' samples and only compare with it."""
    allow_partial: bool = False
    """Read a set that may be partial: a folder without a complete `manifest.json` (an interrupted
    conversion, or shards written by another tool) or a brace pattern some of whose files are missing.
    False: either is an error at start naming what is missing."""


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
        remainder: Remainder = "spread",
        pin_memory: bool = True,
        layout: SequenceLayout | None = None,
        teacher_layout: SequenceLayout | None = None,
    ):
        """
        Args:
            train: Training shards (`--data.train.shards=DIR`). The tiny configs point at `data/synth/train`.
            val: Validation shards; also used by `validate`, `test` and `predict`. Empty `shards`: no validation.
            batch_size: Samples per batch on each rank.
            num_workers: Data-loader worker processes per rank (0 reads in the main process).
            shuffle_buffer: Size of the in-memory sample shuffle buffer (0 disables; validation never shuffles).
            resampled: Draw training shards with replacement (an endless stream, for very large corpora) instead
                of exact epochs (every sample once per epoch, shards reshuffled per epoch).
            seed: Seed of shard and sample shuffling (the same on every rank; each rank reads its own range).
            processor: Sequence-length limit and the policy for longer samples.
            mixture: Train on several shard sets drawn by weight (e.g. Monet's six subsets) instead of
                `train`; each set's shards are drawn with replacement. None: train on `train`.
            remainder: Exact epochs whose sample count is not a multiple of ranks × batch size: `spread`
                trains on every sample, the last step or two of each rank holding smaller batches; `drop`
                keeps every batch full and leaves the epoch's last N mod (W × B) samples out (they change
                from epoch to epoch as the shard order is reshuffled). Evaluation always uses `spread`.
            pin_memory: Pin batches in page-locked memory when training on a GPU (faster host-to-device copies).
            layout: How each sample is laid out as a sequence (aux images inline, latent blocks, the answer
                alone). The CLI links it from `model.stage` (`mmlatent.training.stages.data_layout`); in
                Python pass `data_layout(stage_cfg, latent_slots)`. None: stage 1's (`SequenceLayout()`).
            teacher_layout: The online teacher's view, rendered beside `layout` (linked like `layout`;
                None: the stage has no online teacher).
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
        self.remainder = remainder
        self.pin_memory = pin_memory
        self.layout = layout if layout is not None else SequenceLayout()
        self.teacher_layout = teacher_layout
        self._processor: Processor | None = None
        self._train_loader: EpochLoader | None = None
        self._train_state: dict | None = None
        self._eval_processor: Processor | None = None
        self._counts: dict[str, int] = {}
        """Samples of every shard counted at `setup` (by rank 0, the same on every rank), by URL."""
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be at least 1")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be >= 0")

    def attach_processors(self, train: Processor, evaluation: Processor) -> None:
        """Set the processors directly (benchmarks and tests use this without a Trainer)."""
        self._processor, self._eval_processor = train, evaluation

    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module
        if self._processor is None:
            self._check_layout(module)
            self.attach_model(module.model)
        splits = self._split_urls(stage)
        if any(u not in self._counts for urls in splits.values() for u in urls):  # the same answer on every rank

            def broadcast(obj: object) -> object:
                return self.trainer.strategy.broadcast(obj, src=0)

            self._counts.update(shared(lambda: self._count(splits, module), self.global_rank, broadcast))

    def _split_urls(self, stage: str) -> dict[str, list[str]]:
        """The shard URLs of every split `stage` reads, by split name (a mixture's sets count as one split)."""
        out = {}
        if stage == "fit" and self.mixture is not None:
            out["train"] = [u for s in resolve_sources(self.mixture, expand_shards, manifest_count) for u in s.urls]
        elif stage == "fit":
            out["train"] = self._urls(self.train_cfg, "train")
        if self.val_cfg is not None:
            out["val"] = self._urls(self.val_cfg, "val")
        return out

    @staticmethod
    def _urls(split: SplitConfig, name: str) -> list[str]:
        return expand_shards(split.shards, f"data.{name}.shards", split.allow_partial)

    def _count(self, splits: dict[str, list[str]], module) -> dict[str, int]:
        """Count every split's samples (keys seen twice are an error) and let the module check the keys it needs
        (a teacher cache must hold every one) before the first step."""
        keys = {name: shard_keys(urls) for name, urls in splits.items()}
        check = getattr(module, "check_sample_keys", None)
        if check is not None:
            check({name: [k for shard in shards for k in shard] for name, shards in keys.items()})
        return {u: len(k) for name, urls in splits.items() for u, k in zip(urls, keys[name])}

    def _sizes(self, urls: list[str]) -> list[int]:
        """Samples of each shard: the counts `setup` shared, else counted here (without a Trainer)."""
        if all(u in self._counts for u in urls):
            return [self._counts[u] for u in urls]
        return shard_sizes(urls)

    def attach_model(self, model) -> None:
        """Build the processors from `model`'s tokenizer and image transform and this module's layouts
        (`setup` does this with the trainer's model; benchmarks call it without a Trainer): training renders
        the layouts as configured, validation, test and predict without their training-time augmentation
        (`SequenceLayout.deterministic`)."""
        train = Processor.for_model(model, self.layout, self.processor_cfg, self.teacher_layout)
        teacher = self.teacher_layout.deterministic() if self.teacher_layout is not None else None
        evaluation = Processor.for_model(model, self.layout.deterministic(), self.processor_cfg, teacher)
        self.attach_processors(train, evaluation)

    def _check_layout(self, module) -> None:
        """Fail at start if this module's layouts are not the ones the model's stage trains on."""
        want = getattr(module, "data_layouts", None)
        if want is None:
            return
        layout, teacher = want()
        if (self.layout, self.teacher_layout) != (layout, teacher):
            name = module.stage.name
            raise ConfigError(
                f"data.layout / data.teacher_layout are not stage {name!r}'s: the data module renders {self.layout} "
                f"(teacher {self.teacher_layout}), the model trains on {layout} (teacher {teacher}). The CLI links "
                f"them from model.stage; in Python pass layout=data_layout(stage_cfg, latent_slots) and "
                f"teacher_layout=data_teacher_layout(stage_cfg, latent_slots) from mmlatent.training.stages"
            )

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def global_rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _loader(self, split: SplitConfig, name: str, train: bool) -> EpochLoader:
        urls = self._urls(split, name)
        resampled = train and self.resampled
        manifest = split.samples if split.samples is not None else manifest_count(split.shards)
        if resampled and manifest is None:
            raise ConfigError(f"data.{name}.samples is not set and no manifest.json was found beside {split.shards!r}: "
                             f"the resampled mode needs it to size an epoch")
        processor = self._processor if train else self._eval_processor
        stream = ShardStream(
            urls,
            processor,
            processor.collate,
            self.batch_size,
            resampled=resampled,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            seed=self.seed,
            remainder=self.remainder if train else "spread",
            epoch_samples=manifest if resampled else None,
            count=self._sizes,
        )
        if not resampled:
            counted = stream.source.samples
            if manifest is not None and manifest != counted:
                log.warning("data.%s: the manifest (or data.%s.samples) says %d samples, the shards hold %d readable "
                            "ones; the epoch plan uses %d", name, name, manifest, counted, counted)
        try:
            steps = stream.steps(self.world_size)
        except ValueError as err:
            raise ConfigError(f"data.{name}.shards={split.shards!r} with {self.world_size} rank(s) × "
                             f"data.batch_size={self.batch_size}: {err}") from None
        # more workers than steps would only idle; evaluation sets are small
        num_workers = min(self.num_workers, steps) if not train else self.num_workers
        return EpochLoader(stream, num_workers, rank=self.global_rank, world_size=self.world_size, pin_memory=self._pin())

    def _pin(self) -> bool:
        return self.pin_memory and torch.cuda.is_available()

    def train_dataloader(self) -> EpochLoader:
        if self.mixture is not None:
            loader = mixture_loader(
                self.mixture, self._processor, batch_size=self.batch_size, num_workers=self.num_workers,
                rank=self.global_rank, world_size=self.world_size, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
                count=self._sizes, pin_memory=self._pin(),
            )
        else:
            loader = self._loader(self.train_cfg, "train", train=True)
        if self._train_state is not None:
            self._resume(loader, self._train_state)
            self._train_state = None
        self._train_loader = loader
        return loader

    # The train stream's position also travels as the data module's state. Lightning hands a stateful
    # loader its saved state only when the train loader is first built *after* the restore, and
    # `trainer.estimated_stepping_batches` (our LR schedule's length) builds it before, so that state would
    # be dropped and a resume would restart the epoch. The data module's state is restored either before
    # the loader is built or after (strategy dependent); both orders reach the loader.

    def state_dict(self) -> dict:
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("train_loader")
        if state is not None and self._train_loader is not None:
            self._resume(self._train_loader, state)
        else:
            self._train_state = state  # for the loader `train_dataloader` builds next

    def _resume(self, loader: EpochLoader, state: dict) -> None:
        """Put the saved stream position into `loader`; a resume whose data settings differ names the checkpoint."""
        try:
            loader.load_state_dict(state)
        except ConfigError as err:
            ckpt = getattr(self.trainer, "ckpt_path", None) if self.trainer is not None else None
            raise ConfigError(f"--ckpt_path={ckpt}: {err}" if ckpt else str(err)) from None

    def _eval_split(self) -> tuple[SplitConfig, str]:
        if self.val_cfg is None:
            raise ConfigError("data.val.shards is not set; validation, test and predict need it")
        return self.val_cfg, "val"

    def val_dataloader(self) -> EpochLoader | list:
        return [] if self.val_cfg is None else self._loader(*self._eval_split(), train=False)

    def test_dataloader(self) -> EpochLoader:
        return self._loader(*self._eval_split(), train=False)

    def predict_dataloader(self) -> EpochLoader:
        return self._loader(*self._eval_split(), train=False)
