"""Sample sources: the first stage of a `ShardStream`, which decides which raw samples every rank and
data-loader worker reads, in which order, and how many go into each of its batches.

A source sees a (rank, logical worker) as a *sequence of sample slots* and a list of batch sizes; the
stream reads the sequence from any position (for a resume) and cuts it into those batches. Three sources:

- `EpochSource` (the default): every epoch, the shards in an order shuffled by (seed, epoch), the same on
  every rank; the concatenated samples are cut by a `BatchPlan` into one contiguous range per rank and
  per logical worker. Every sample once per epoch, every rank the same number of steps.
- `ResampledSource`: each (rank, worker, epoch) draws shards with replacement from its own seeded stream,
  an endless sequence; an epoch is `epoch_samples ÷ (W·B)` full batches.
- `MixedSource`: several shard sets, each an endless resampled sequence; every slot picks its set by
  weight from a seeded stream, so set proportions hold at every step.

Every position is a pure function of (seed, epoch, rank, worker, slot): no state is carried between
batches, so a position saved in a checkpoint is enough to continue bit for bit. Skipping to a position
skips whole shards by their counted sizes and passes over the members of the first one without reading
their data. A slot whose sample cannot be read (damage past a tar's cut) comes out as `None`, counted.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import tarfile
from dataclasses import dataclass
from itertools import accumulate
from typing import Iterator

from mmlatent.data.plan import BatchPlan, Remainder
from mmlatent.data.skips import SkipCounter
from mmlatent.data.tar_reader import shard_samples


@dataclass(frozen=True)
class WorkerView:
    """One logical worker of one rank in one epoch."""

    epoch: int
    rank: int
    world: int
    worker: int
    """Logical worker k: produces steps k, k + K, … of its rank."""
    workers: int
    """K: data-loader workers per rank (1 when reading in the main process)."""
    batch_size: int


def read_range(url: str, start: int, stop: int, counter: SkipCounter) -> Iterator[dict | None]:
    """Exactly `stop - start` items: the raw samples at positions [start, stop) of one shard, `None` for
    each position the shard did not deliver (damage), counted as `unread_after_damage`."""
    got, last = start, None
    samples = shard_samples(url, start, stop)
    try:
        for raw in samples:
            got = raw["__pos__"] + 1
            if got == stop:  # read on to the next header first: damage right after the range is counted now,
                last = raw  # before the range's last sample goes out (its batch carries the count)
                for _ in samples:
                    pass
                break
            yield raw
    except (tarfile.TarError, OSError, EOFError) as exn:
        counter.tar_handler(exn)
    if last is not None:
        yield last
    if got < stop:
        counter.add("unread_after_damage", f"{url}: planned samples {got}..{stop - 1} could not be read", stop - got)
        for _ in range(stop - got):
            yield None


def shards_digest(urls: list[str], sizes: list[int]) -> str:
    """A short digest of the shards' file names and sample counts, in order: positions saved against one
    shard set mean other samples in another, also when the total is the same."""
    names = [[os.path.basename(u), n] for u, n in zip(urls, sizes)]
    return hashlib.sha1(json.dumps(names).encode()).hexdigest()[:12]


def _seeded(*parts) -> random.Random:
    """A generator seeded by a string of `parts`: the same in every process and every run."""
    return random.Random("/".join(map(str, parts)))


class EpochSource:
    """Every sample once per epoch, in a shard order shuffled per epoch, cut by a `BatchPlan`."""

    kind = "epoch"

    def __init__(self, urls: list[str], sizes: list[int], seed: int = 0, shuffle: bool = True,
                 remainder: Remainder = "spread"):
        self.urls, self.sizes, self.seed, self.shuffle, self.remainder = urls, sizes, seed, shuffle, remainder
        self.samples = sum(sizes)

    def plan(self, world: int, batch_size: int) -> BatchPlan:
        return BatchPlan(self.samples, world, batch_size, self.remainder)

    def steps(self, world: int, batch_size: int) -> int | None:
        return self.plan(world, batch_size).steps

    def order(self, epoch: int) -> list[int]:
        """Shard indices in this epoch's reading order."""
        order = list(range(len(self.urls)))
        if self.shuffle:
            _seeded(self.seed, epoch, "shards").shuffle(order)
        return order

    def batch_sizes(self, view: WorkerView, first: int) -> Iterator[int]:
        plan = self.plan(view.world, view.batch_size)
        for step in plan.worker_steps(view.worker, view.workers)[first:]:
            yield plan.size(view.rank, step)

    def prefix(self, view: WorkerView, batches: int) -> int:
        return self.plan(view.world, view.batch_size).worker_prefix(view.rank, view.worker, view.workers, batches)

    def _epoch_slots(self, epoch: int, start: int, stop: int, counter: SkipCounter) -> Iterator[dict | None]:
        """Slots [start, stop) of the epoch's order."""
        order = self.order(epoch)
        ends = list(accumulate(self.sizes[i] for i in order))  # slot after the last of each shard
        i = bisect.bisect_right(ends, start)
        while start < stop and i < len(order):
            shard_start = ends[i] - self.sizes[order[i]]
            end = min(stop, ends[i])
            if end > start:
                yield from read_range(self.urls[order[i]], start - shard_start, end - shard_start, counter)
            start, i = end, i + 1

    def slots(self, view: WorkerView, start: int, counter: SkipCounter) -> Iterator[dict | None]:
        plan = self.plan(view.world, view.batch_size)
        first = plan.worker_start(view.rank, view.worker, view.workers)
        total = plan.worker_samples(view.rank, view.worker, view.workers)
        return self._epoch_slots(view.epoch, first + start, first + total, counter)

    def probe(self, view: WorkerView, counter: SkipCounter) -> Iterator[dict | None]:
        """Every slot of the epoch, from this rank's range on (to find a sample for a filler batch)."""
        begin = self.plan(view.world, view.batch_size).rank_start(view.rank)
        yield from self._epoch_slots(view.epoch, begin, self.samples, counter)
        yield from self._epoch_slots(view.epoch, 0, begin, counter)

    def describe(self) -> dict:
        return {"source": self.kind, "samples": self.samples, "shards": len(self.urls), "seed": self.seed,
                "remainder": self.remainder, "shard_sizes": shards_digest(self.urls, self.sizes)}


def resampled_slots(urls: list[str], sizes: list[int], rng: random.Random, start: int, counter: SkipCounter,
                    name: str) -> Iterator[dict | None]:
    """An endless sequence of the samples of shards drawn with replacement, from position `start`."""
    readable = [i for i, n in enumerate(sizes) if n > 0]
    if not readable:
        raise RuntimeError(f"{name}: none of its {len(urls)} shard(s) holds a readable sample (see the warnings above)")
    while True:
        i = readable[rng.randrange(len(readable))]
        if start >= sizes[i]:
            start -= sizes[i]
            continue
        yield from read_range(urls[i], start, sizes[i], counter)
        start = 0


class ResampledSource:
    """Shards drawn with replacement, independently per (rank, worker, epoch): an endless stream cut into
    epochs of `epoch_samples ÷ (W·B)` full batches (endless when `epoch_samples` is None)."""

    kind = "resampled"

    def __init__(self, urls: list[str], sizes: list[int], seed: int = 0, epoch_samples: int | None = None,
                 name: str = "shards"):
        self.urls, self.sizes, self.seed, self.epoch_samples, self.name = urls, sizes, seed, epoch_samples, name
        if not any(sizes):
            raise RuntimeError(f"{name}: none of its {len(urls)} shard(s) holds a readable sample")

    def steps(self, world: int, batch_size: int) -> int | None:
        if self.epoch_samples is None:
            return None
        steps = self.epoch_samples // (world * batch_size)
        if steps < 1:
            raise ValueError(f"{self.epoch_samples} samples per epoch are fewer than one global batch "
                             f"({world} rank(s) × batch size {batch_size})")
        return steps

    def batch_sizes(self, view: WorkerView, first: int) -> Iterator[int]:
        steps = self.steps(view.world, view.batch_size)
        if steps is None:
            while True:
                yield view.batch_size
        yield from (view.batch_size for _ in range(view.worker, steps, view.workers)[first:])

    def prefix(self, view: WorkerView, batches: int) -> int:
        return batches * view.batch_size

    def slots(self, view: WorkerView, start: int, counter: SkipCounter) -> Iterator[dict | None]:
        rng = _seeded(self.seed, view.epoch, view.rank, view.worker, "draws")
        return resampled_slots(self.urls, self.sizes, rng, start, counter, self.name)

    def probe(self, view: WorkerView, counter: SkipCounter) -> Iterator[dict | None]:
        return self.slots(view, 0, counter)

    def describe(self) -> dict:
        return {"source": self.kind, "samples": self.epoch_samples, "shards": len(self.urls), "seed": self.seed,
                "shard_sizes": shards_digest(self.urls, self.sizes)}


@dataclass
class WeightedSet:
    """One shard set of a mixture, with its counted shard sizes."""

    name: str
    urls: list[str]
    sizes: list[int]
    weight: float


class MixedSource(ResampledSource):
    """Several endless resampled shard sets; each slot comes from set i with probability ∝ its weight."""

    kind = "mixture"

    def __init__(self, sets: list[WeightedSet], seed: int = 0, epoch_samples: int | None = None):
        for s in sets:
            if s.weight > 0 and not any(s.sizes):
                raise RuntimeError(f"mixture source {s.name!r}: none of its {len(s.urls)} shard(s) holds a readable "
                                   f"sample; its shards seem unreadable (see the warnings above)")
        self.sets = sets
        super().__init__([u for s in sets for u in s.urls], [n for s in sets for n in s.sizes], seed, epoch_samples,
                         name="mixture")

    def slots(self, view: WorkerView, start: int, counter: SkipCounter) -> Iterator[dict | None]:
        key = (self.seed, view.epoch, view.rank, view.worker)
        choose = _seeded(*key, "mix")
        weights = [s.weight for s in self.sets]
        order = range(len(self.sets))
        taken = [0] * len(self.sets)
        for _ in range(start):  # replay the choices before `start`: each set's own position
            taken[choose.choices(order, weights)[0]] += 1
        streams = [
            resampled_slots(s.urls, s.sizes, _seeded(*key, "set", i), taken[i], counter, f"mixture source {s.name!r}")
            if s.weight > 0 else iter(())
            for i, s in enumerate(self.sets)
        ]
        while True:
            yield next(streams[choose.choices(order, weights)[0]])

    def describe(self) -> dict:
        return {**super().describe(), "sets": [s.name for s in self.sets], "weights": [s.weight for s in self.sets]}
