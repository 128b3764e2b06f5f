"""The streaming shard reader: one list of stages from a sample source to typed batches, and the loader
that cuts it into resumable epochs.

`ShardStream` is the stage list (each stage says what is true after it); its first stage is a sample
source (`sample_order.py`): by default every sample once per epoch, cut by a `BatchPlan` into per-rank and
per-worker ranges; or endless resampled draws; or a weighted mixture of shard sets. The stream reads a
worker's slots in blocks of `shuffle_buffer`, each block permuted by (seed, epoch, rank, worker, block),
and closes each planned batch with a marker, so batch boundaries are planned, not counted: a sample that
turns out bad leaves its batch one smaller, and a batch whose samples are all bad becomes a filler
(`Batch.filler`: one earlier sample the trainer weighs by zero), so every rank still takes the same steps.
Skips are counted by reason (`skips.py`) and ride on the next batch.

`EpochLoader` wraps the stream in a `DataLoader`, runs exactly the plan's S steps per epoch on every
rank, and is stateful the way Lightning expects (`state_dict` / `load_state_dict`): its state is the
epoch and the steps taken, from which the plan gives every (rank, worker)'s position. Resuming starts
each worker at its position (skipping whole shards, then the members before it, and replaying only the
current shuffle block), so the batches after a resume are exactly those an uninterrupted run would
have seen.

The trade-off: shuffling is block-local (a block holds the samples of one or two consecutive shards in
the epoch's shuffled shard order), as with webdataset's shuffle buffer, in exchange for resumable
positions that are pure functions of (seed, epoch, rank, worker, step).
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from dataclasses import dataclass, replace
from itertools import count, islice
from typing import Callable, Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from mmlatent.config_io import ConfigError
from mmlatent.data.batch import Batch, ProcessedSample
from mmlatent.data.image_decode import ImageError, decode_rgb
from mmlatent.data.plan import Remainder
from mmlatent.data.processor import Processor
from mmlatent.data.sample import IMAGE_EXTENSIONS, SampleError, validate_sample
from mmlatent.data.shards import shard_sizes
from mmlatent.data.skips import KEPT, TAR_EVENTS, SkipCounter, SkipSummary
from mmlatent.data.sample_order import EpochSource, ResampledSource, WorkerView

__all__ = ["SkipCounter", "SkipSummary", "KEPT", "TAR_EVENTS", "ShardStream", "EpochLoader",
           "decode_samples", "process_samples", "attach_skips"]

log = logging.getLogger(__name__)

# wds.DataPipeline defines __len__; Lightning then warns that workers may duplicate data. Here every worker
# reads its own planned range and `EpochLoader` sets the epoch length, so it does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

FILLER_PROBE_LIMIT = 10_000
"""Most raw samples read while looking for a sample to build a filler batch from."""


class BatchEnd:
    """Marker closing one planned batch in the stage stream (passes through decode and process)."""


def decode_samples(src: Iterable[dict | BatchEnd], counter: SkipCounter) -> Iterator[dict | BatchEnd]:
    """Raw tar members -> {"key", "url", "meta", "images": {ref: RGB PIL image}}, validated.

    After this stage every sample's JSON is parsed, every image decoded to upright 8-bit RGB as the converters
    store it (`image_decode.py`: bit depths scaled, alpha on white, decompression bombs skipped as
    `bad_image`), and the format (DESIGN §2) holds.
    """
    for raw in src:
        if isinstance(raw, BatchEnd):
            yield raw
            continue
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        where = f"{url}:{key}"
        if "json" not in raw:
            counter.add("missing_json", where)
            continue
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as err:
            counter.add("bad_json", f"{where}: {err}")
            continue
        images = {}
        try:
            for name, value in raw.items():
                ref, _, ext = name.rpartition(".")
                if ext.lower() in IMAGE_EXTENSIONS and ref and not name.startswith("__"):
                    images[ref] = decode_rgb(value)
        except ImageError as err:
            counter.add("bad_image", f"{where}.{name}: {err}")
            continue
        try:
            validate_sample(meta, images.keys(), key=key)
        except SampleError as err:
            counter.add(err.reason, f"{where}: {err.detail}")
            continue
        yield {"key": key, "url": url, "meta": meta, "images": images}


def process_samples(
    src: Iterable[dict | BatchEnd], processor: Processor, counter: SkipCounter
) -> Iterator[ProcessedSample | BatchEnd]:
    """Decoded samples -> token ids, labels, weights and image tensors (a stage's layout).

    Samples over the length limit are dropped (`too_long`) or cut and kept (`truncated`), by the
    processor's `overlong` policy; both are counted.
    """
    for sample in src:
        if isinstance(sample, BatchEnd):
            yield sample
            continue
        try:
            out = processor(sample)
        except SampleError as err:
            counter.add(err.reason, f"{sample['url']}:{sample['key']}: {err.detail}")
            continue
        except (KeyError, ValueError, TypeError) as err:
            counter.add("process_error", f"{sample['url']}:{sample['key']}: {err!r}")
            continue
        if out.truncated:
            counter.add("truncated", f"{sample['url']}:{sample['key']}: cut to {out.input_ids.numel()} tokens")
        yield out


def attach_skips(src: Iterable[Batch], counter: SkipCounter) -> Iterator[Batch]:
    """Put the worker's skip counts since the previous batch on each batch."""
    for batch in src:
        batch.skipped = counter.drain()
        yield batch


@dataclass(frozen=True)
class StreamPosition:
    """Where an `EpochLoader` starts the stream: an epoch of a rank, after `start_step` steps."""

    epoch: int
    rank: int
    world: int
    start_step: int


class ShardStream(wds.DataPipeline):
    """Per-rank, per-worker stream of typed batches from WebDataset shards.

    Iterated directly (tests, teacher caching, the demo) it reads as rank 0 of 1, one epoch after another
    (`loop=True`) or one epoch (`loop=False`); an `EpochLoader` sets the rank and the start of the epoch.
    """

    def __init__(
        self,
        urls: list[str],
        processor: Processor,
        collate_fn: Callable[[list[ProcessedSample]], Batch],
        batch_size: int,
        *,
        resampled: bool = False,
        shuffle_buffer: int = 500,
        seed: int = 0,
        loop: bool = True,
        remainder: Remainder = "spread",
        epoch_samples: int | None = None,
        source: EpochSource | ResampledSource | None = None,
        count: Callable[[list[str]], list[int]] = shard_sizes,
    ):
        """
        Args:
            urls: Shard URLs (ignored when `source` is given).
            resampled: Draw shards with replacement (endless) instead of exact epochs.
            shuffle_buffer: Samples per shuffle block; 0 reads in order (shard order too).
            loop: Direct iteration only: run epoch after epoch (True) or one epoch (False).
            remainder: Exact epochs: `spread` plans every sample (the last steps hold smaller batches); `drop`
                keeps only full batches and leaves the epoch's last N mod (W·B) samples out (`BatchPlan`).
            epoch_samples: Resampled: samples per epoch (None: the shards' total; endless when iterated
                directly).
            source: The first stage (e.g. a `MixedSource`); None builds it from `urls`.
            count: Samples of each shard of `urls` (the data module passes the counts rank 0 made).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if source is None:
            sizes = count(urls)
            if resampled:
                source = ResampledSource(urls, sizes, seed, epoch_samples)
            else:
                source = EpochSource(urls, sizes, seed, shuffle=shuffle_buffer > 0, remainder=remainder)
        self.source = source
        self.processor, self.collate_fn, self.batch_size = processor, collate_fn, batch_size
        self.shuffle_buffer, self.seed, self.loop = shuffle_buffer, seed, loop
        self.epoch = 0
        self.position: StreamPosition | None = None
        self.counter = SkipCounter()
        self._view: WorkerView | None = None
        self._last: ProcessedSample | None = None
        super().__init__(
            # raw samples of this rank's and worker's planned steps, block-shuffled, each batch closed by a marker
            self._planned,
            # parsed, decoded and validated samples (bad ones counted and gone)
            lambda src: decode_samples(src, self.counter),
            # token ids / labels / weights / pixel tensors of the stage's layout
            lambda src: process_samples(src, processor, self.counter),
            # one padded typed batch per planned step (a filler where every sample of the step was bad)
            lambda src: self._batches(src),
            # batches carrying the skip counts
            lambda src: attach_skips(src, self.counter),
        )

    # ------------------------------------------------------------------------------------- the plan

    def steps(self, world: int = 1) -> int | None:
        """Steps per epoch of every rank (None: endless)."""
        return self.source.steps(world, self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.processor.set_epoch(epoch)  # e.g. the Coconut curriculum grows with the epoch

    def describe(self) -> dict:
        """What a saved position depends on (checked when a state is loaded)."""
        return {**self.source.describe(), "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer}

    # ----------------------------------------------------------------------------------- the stages

    def _planned(self) -> Iterator[dict | BatchEnd]:
        info = torch.utils.data.get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pos = self.position or StreamPosition(self.epoch, 0, 1, 0)
        single = self.position is not None or not self.loop or self.steps(pos.world) is None
        start = pos.start_step
        for epoch in [pos.epoch] if single else count(pos.epoch):
            if epoch != self.epoch:
                self.set_epoch(epoch)
            yield from self._worker_epoch(epoch, pos.rank, pos.world, physical, workers, start)
            start = 0

    def _worker_epoch(self, epoch: int, rank: int, world: int, physical: int, workers: int, start: int) -> Iterator:
        """The planned samples and batch ends of one physical worker, from step `start` of the epoch.

        Physical worker p produces steps start + p, start + p + K, …: the steps of logical worker
        (start + p) mod K from its batch (start + p) // K on, so a `DataLoader` taking batches from its
        workers in turn yields the steps in order.
        """
        steps = self.steps(world)
        first_step = start + physical
        if steps is not None and first_step >= steps:
            return
        view = WorkerView(epoch, rank, world, first_step % workers, workers, self.batch_size)
        self._view, self._last = view, None
        first = first_step // workers
        begin = self.source.prefix(view, first)
        block_size = max(1, self.shuffle_buffer)
        block = begin // block_size
        slots = self._shuffled(self.source.slots(view, block * block_size, self.counter), view, block, block_size)
        slots = islice(slots, begin - block * block_size, None)  # replayed part of the current block
        for size in self.source.batch_sizes(view, first):
            for item in islice(slots, size):
                if item is not None:
                    yield item
            yield BatchEnd()

    def _shuffled(self, slots: Iterator, view: WorkerView, block: int, block_size: int) -> Iterator:
        """`slots` in blocks of `block_size`, each permuted by (seed, epoch, rank, worker, block)."""
        while True:
            chunk = list(islice(slots, block_size))
            if not chunk:
                return
            if self.shuffle_buffer > 0:
                random.Random(f"{self.seed}/{view.epoch}/{view.rank}/{view.worker}/block{block}").shuffle(chunk)
            yield from chunk
            block += 1

    def _batches(self, src: Iterable[ProcessedSample | BatchEnd]) -> Iterator[Batch]:
        current: list[ProcessedSample] = []
        for item in src:
            if not isinstance(item, BatchEnd):
                current.append(item)
                continue
            if current:
                self._last = current[0]
                yield self.collate_fn(current)
            else:
                yield self._filler()
            current = []

    def _filler(self) -> Batch:
        """A one-sample batch for a step whose samples were all bad: the worker's last good sample, else the
        first usable one found reading on from this rank's range."""
        sample = self._last
        if sample is None:
            probe_counter = SkipCounter()  # the probe's reads are not this epoch's skips
            raw = islice((r for r in self.source.probe(self._view, probe_counter) if r is not None), FILLER_PROBE_LIMIT)
            found = process_samples(decode_samples(raw, probe_counter), self.processor, probe_counter)
            sample = next((s for s in found if not isinstance(s, BatchEnd)), None)
            if sample is None:
                raise RuntimeError(f"rank {self._view.rank}: a planned batch had no usable sample and none of the next "
                                   f"{FILLER_PROBE_LIMIT} samples is usable either; see the skip warnings above")
            self._last = sample
        return replace(self.collate_fn([sample]), filler=True)


def _shut_down(it) -> None:
    """Stop a `DataLoader` iterator's workers now and wait until its index queues' feeder threads have
    exited. The DataLoader only closes those queues, and the threads end on their own a moment later: a
    fork of the next epoch's workers while one is still ending can leave the child blocked forever in
    CPython's after-fork thread clean-up (a 2-rank DDP run hung so at an epoch's start)."""
    shutdown = getattr(it, "_shutdown_workers", None)  # absent with num_workers=0: nothing was forked
    if shutdown is None:
        return
    shutdown()
    for queue in getattr(it, "_index_queues", ()):
        feeder = getattr(queue, "_thread", None)
        if feeder is not None:
            feeder.join(timeout=10)


class EpochLoader:
    """A `DataLoader` over a `ShardStream` that runs exactly the plan's steps per epoch on every rank.

    Lightning calls `sampler.set_epoch(epoch)` before each epoch; here the "sampler" is this object, which
    forwards the epoch to the stream (the workers receive a fresh copy of the stream at each epoch's
    start). `state_dict` / `load_state_dict` make it a stateful loader Lightning saves in checkpoints.
    """

    def __init__(self, stream: ShardStream, num_workers: int, *, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False):
        steps = stream.steps(world_size)
        if steps is None:
            raise ValueError("an endless stream needs a number of samples per epoch to be cut into epochs")
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.batches = steps
        self.workers = max(1, num_workers)
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                                 pin_memory=pin_memory)
        # what Lightning inspects on a loader: an iterable dataset (so it never injects a sampler) and
        # a `sampler.set_epoch`
        self.dataset = stream
        self.batch_sampler = None
        self.sampler = self
        self.epoch = 0
        self.steps_done = 0
        """Batches handed out in the current epoch (Lightning fetches without prefetching a sized loader)."""
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Batch]:
        start = 0
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            if epoch == self.epoch:
                start = min(done, self.batches)
        self.stream.position = StreamPosition(self.epoch, self.rank, self.world_size, start)
        self.steps_done = start
        it = iter(self.loader)
        try:
            for i in range(start, self.batches):
                try:
                    batch = next(it)
                except StopIteration:
                    raise RuntimeError(
                        f"rank {self.rank}: the shard stream ended after {i} of {self.batches} planned batches"
                    ) from None
                self.steps_done = i + 1
                yield batch
        finally:
            _shut_down(it)

    def state_dict(self) -> dict:
        """The epoch and the steps taken (every rank's and worker's position follows from them and the plan),
        and what that plan depends on (checked by `load_state_dict`)."""
        return {
            "epoch": self.epoch,
            "steps_done": self.steps_done,
            "steps": self.batches,
            "world_size": self.world_size,
            "num_workers": self.workers,
            **self.stream.describe(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state: the next epoch `state["epoch"]` starts at step `steps_done`.

        A mid-epoch state must come from the same layout (ranks, workers, batch size, data): otherwise a
        `ConfigError` names what changed (a setting a state of an older version lacks is not compared); a
        finished epoch's state fits any layout.
        """
        if state["steps_done"] < state["steps"]:
            now = {"world_size": self.world_size, "num_workers": self.workers, **self.stream.describe()}
            changed = {k: (state[k], v) for k, v in now.items() if k in state and state[k] != v}
            if changed:
                detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                raise ConfigError(
                    f"cannot resume the data stream mid-epoch (epoch {state['epoch']}, step {state['steps_done']} of "
                    f"{state['steps']}) with a different layout ({detail}); resume with the saved settings, or "
                    f"from a checkpoint taken at an epoch's end"
                )
        self._resume = (state["epoch"], state["steps_done"])
