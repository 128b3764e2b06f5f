"""Weighted mixtures of shard sets: one training stream that draws each sample from source i with
probability weight_i / Σ weights (Monet's six subsets, or Zebra-CoT beside ScienceQA).

`MixtureStream` is a `ShardStream` whose source stage differs: instead of one looped shard list it keeps one
endless raw-sample stream per shard set (shards drawn with replacement, independently in every rank and
worker, seeded by (seed, epoch, rank, worker, set)) and picks the set of every next sample by weight. The
later stages are the shard stream's own (count, shuffle, decode and validate, process, batch, skip counts),
and `EpochLoader` still cuts every rank's epoch at the same number of batches.

The trade-off: sampling with replacement at the shard level means a sample can repeat before every
sample of its set has been seen, but a set never runs dry, small sets need no more shards than workers,
and the proportions hold at every step rather than only over a whole epoch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import webdataset as wds

from mmlatent.data.batch import collate
from mmlatent.data.pipeline import (
    EpochLoader,
    ShardStream,
    SkipCounter,
    attach_skips,
    decode_samples,
    process_samples,
)
from mmlatent.data.processor import Processor
from mmlatent.data.tar_reader import tar_samples


@dataclass
class MixtureSource:
    """One shard set of a mixture."""

    shards: str = ""
    """A folder of `*.tar` shards or a brace pattern (as `data.train.shards`)."""
    weight: float | None = None
    """Relative sampling weight; None weighs the set by its sample count (as if the sets were concatenated)."""
    samples: int | None = None
    """Samples in the set; None reads `manifest.json` beside the shards (needed when `weight` is None)."""
    name: str = ""
    """Name used in messages; empty uses the folder name."""


@dataclass
class MixtureConfig:
    """Several shard sets streamed together by weight (replaces `data.train` when set)."""

    sources: list[MixtureSource] = field(default_factory=list)
    """The shard sets and their weights."""
    samples_per_epoch: int | None = None
    """Samples that make one training epoch; None sums the sets' sample counts."""


@dataclass
class ResolvedSource:
    """A mixture source with its shard URLs, weight and sample count worked out."""

    name: str
    urls: list[str]
    weight: float
    samples: int | None


def resolve_sources(cfg: MixtureConfig, expand: Callable[[str, str], list[str]],
                    count: Callable[[str], int | None], field_name: str = "data.mixture") -> list[ResolvedSource]:
    """Expand each source's shards and settle its weight; errors name the offending field.

    `expand(spec, field)` lists a spec's shard URLs and `count(spec)` reads its manifest count (the data
    module's own `expand_shards` and `manifest_count`).
    """
    if not cfg.sources:
        raise ValueError(f"{field_name}.sources is empty: list at least one shard set")
    out = []
    for i, src in enumerate(cfg.sources):
        where = f"{field_name}.sources[{i}]"
        urls = expand(src.shards, f"{where}.shards")
        samples = src.samples if src.samples is not None else count(src.shards)
        weight = src.weight if src.weight is not None else samples
        if weight is None:
            raise ValueError(f"{where}.weight is None (weigh by size) but {where}.samples is unknown: "
                             f"set it or write a manifest.json beside {src.shards!r}")
        if not weight >= 0:
            raise ValueError(f"{where}.weight={weight} must be >= 0")
        name = src.name or src.shards.rstrip("/").split("/")[-1]
        out.append(ResolvedSource(name, urls, float(weight), samples))
    if sum(s.weight for s in out) <= 0:
        raise ValueError(f"{field_name}.sources: the weights sum to 0")
    return out


def epoch_samples(cfg: MixtureConfig, sources: list[ResolvedSource], field_name: str = "data.mixture") -> int:
    """Samples per epoch: `samples_per_epoch`, or the sum of the sets' sizes."""
    if cfg.samples_per_epoch is not None:
        return cfg.samples_per_epoch
    unknown = [i for i, s in enumerate(sources) if s.samples is None]
    if unknown:
        raise ValueError(f"{field_name}.samples_per_epoch is not set and {field_name}.sources[{unknown[0]}] has no "
                         f"sample count (set its `samples` or write a manifest.json)")
    return sum(s.samples for s in sources)


class MixtureStream(ShardStream):
    """A `ShardStream` over several shard sets, each sample drawn from set i with probability ∝ weight i."""

    def __init__(
        self,
        sources: list[ResolvedSource],
        processor: Callable,
        collate_fn: Callable,
        batch_size: int,
        *,
        shuffle_buffer: int = 500,
        seed: int = 0,
        max_empty_draws: int | None = None,
    ):
        # ShardStream's attributes that its methods (set_epoch, _worker_seed, _shuffle) use
        self.urls = [u for s in sources for u in s.urls]
        self.seed, self.epoch, self.resampled, self.loop = seed, 0, True, True
        self.processor = processor
        self.counter = SkipCounter()
        self.sources = sources
        self.max_empty_draws = max_empty_draws
        shuffle = shuffle_buffer > 0
        wds.DataPipeline.__init__(
            self,
            # raw samples, each from a set drawn by weight; every set an endless resampled shard stream
            self._mixed_samples,
            # (counted, as in ShardStream)
            lambda src: self.counter.count_raw(src),
            # raw samples in a locally shuffled order
            *([lambda src: self._shuffle(src, shuffle_buffer)] if shuffle else []),
            # parsed, decoded and validated samples
            lambda src: decode_samples(src, self.counter),
            # token ids / labels / weights / pixel tensors of the stage's layout
            lambda src: process_samples(src, processor, self.counter),
            # padded typed batches
            wds.batched(batch_size, collation_fn=collate_fn, partial=False),
            # batches carrying the skip counts
            lambda src: attach_skips(src, self.counter),
        )

    def _source_samples(self, i: int) -> Iterator[dict]:
        """Endless raw samples of set i from shards drawn with replacement.

        Raises when `max_empty_draws` shard draws in a row (default: twice the set's shards, at least 4)
        gave no sample: every shard of the set is unreadable, and waiting would hang the run.
        """
        src = self.sources[i]
        rng = random.Random(self._worker_seed(1000 + i))
        limit = self.max_empty_draws or max(4, 2 * len(src.urls))
        empty = 0
        while True:
            got = 0
            url = src.urls[rng.randrange(len(src.urls))]
            for raw in tar_samples([{"url": url}], handler=self.counter.tar_handler):
                got += 1
                yield raw
            empty = 0 if got else empty + 1
            if empty >= limit:
                raise RuntimeError(f"mixture source {src.name!r}: {empty} shard draws in a row gave no sample; "
                                   f"its shards seem unreadable (see the skip warnings)")

    def _mixed_samples(self) -> Iterator[dict]:
        rng = random.Random(self._worker_seed(-1))
        streams = [self._source_samples(i) for i in range(len(self.sources))]
        weights = [s.weight for s in self.sources]
        order = range(len(streams))
        while True:
            yield next(streams[rng.choices(order, weights)[0]])


def mixture_loader(
    cfg: MixtureConfig,
    processor: Processor,
    *,
    batch_size: int,
    num_workers: int,
    world_size: int,
    shuffle_buffer: int,
    seed: int,
    expand: Callable[[str, str], list[str]],
    count: Callable[[str], int | None],
) -> EpochLoader:
    """The training `EpochLoader` of a mixture: samples-per-epoch ÷ (world size × batch size) batches."""
    sources = resolve_sources(cfg, expand, count)
    samples = epoch_samples(cfg, sources)
    batches = samples // (world_size * batch_size)
    if batches < 1:
        raise ValueError(f"data.mixture: {samples} samples per epoch are fewer than one global batch "
                         f"({world_size} rank(s) × data.batch_size={batch_size})")
    stream = MixtureStream(
        sources,
        processor,
        partial(collate, pad_id=processor.ids.pad, latent_start_id=processor.ids.latent_start),
        batch_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
    )
    return EpochLoader(stream, batches, num_workers)
