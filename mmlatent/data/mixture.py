"""Weighted mixtures of shard sets: one training stream that draws each sample from source i with
probability weight_i / Σ weights (Monet's six subsets, or Zebra-CoT beside ScienceQA).

`MixtureStream` is a `ShardStream` whose first stage is a `MixedSource` (`sample_order.py`): one endless
raw-sample sequence per shard set (shards drawn with replacement, independently in every rank and worker,
seeded by (seed, epoch, rank, worker, set)), and the set of every next sample picked by weight. The later
stages are the shard stream's own (shuffle, decode and validate, process, batch, skip counts), and
`EpochLoader` cuts every rank's epoch at the same number of full batches and saves resumable positions.

The trade-off: sampling with replacement at the shard level means a sample can repeat before every
sample of its set has been seen, but a set never runs dry, small sets need no more shards than workers,
and the proportions hold at every step rather than only over a whole epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mmlatent.config_io import ConfigError
from mmlatent.data.pipeline import EpochLoader, ShardStream
from mmlatent.data.processor import Processor
from mmlatent.data.shards import expand_shards, manifest_count, shard_sizes
from mmlatent.data.sample_order import MixedSource, WeightedSet


@dataclass
class MixtureComponent:
    """One shard set of a mixture."""

    shards: str = ""
    """A folder of `*.tar` shards or a brace pattern (as `data.train.shards`)."""
    weight: float | None = None
    """Relative sampling weight; None weighs the set by its sample count (as if the sets were concatenated)."""
    samples: int | None = None
    """Samples in the set; None reads `manifest.json` beside the shards (needed when `weight` is None)."""
    name: str = ""
    """Name used in messages; empty uses the folder name."""
    allow_partial: bool = False
    """Read the set although it may be partial (as `data.train.allow_partial`)."""


@dataclass
class MixtureConfig:
    """Several shard sets streamed together by weight (replaces `data.train` when set)."""

    sources: list[MixtureComponent] = field(default_factory=list)
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


def resolve_sources(cfg: MixtureConfig, expand: Callable[[str, str, bool], list[str]],
                    count: Callable[[str], int | None], field_name: str = "data.mixture") -> list[ResolvedSource]:
    """Expand each source's shards and settle its weight; errors name the offending field.

    `expand(spec, field, allow_partial)` lists a spec's shard URLs and `count(spec)` reads its manifest count
    (`shards.expand_shards` and `shards.manifest_count`).
    """
    if not cfg.sources:
        raise ConfigError(f"{field_name}.sources is empty: list at least one shard set")
    out = []
    for i, src in enumerate(cfg.sources):
        where = f"{field_name}.sources[{i}]"
        urls = expand(src.shards, f"{where}.shards", src.allow_partial)
        samples = src.samples if src.samples is not None else count(src.shards)
        weight = src.weight if src.weight is not None else samples
        if weight is None:
            raise ConfigError(f"{where}.weight is None (weigh by size) but {where}.samples is unknown: "
                             f"set it or write a manifest.json beside {src.shards!r}")
        if not weight >= 0:
            raise ConfigError(f"{where}.weight={weight} must be >= 0")
        name = src.name or src.shards.rstrip("/").split("/")[-1]
        out.append(ResolvedSource(name, urls, float(weight), samples))
    if sum(s.weight for s in out) <= 0:
        raise ConfigError(f"{field_name}.sources: the weights sum to 0")
    return out


def epoch_samples(cfg: MixtureConfig, sources: list[ResolvedSource], field_name: str = "data.mixture") -> int:
    """Samples per epoch: `samples_per_epoch`, or the sum of the sets' sizes."""
    if cfg.samples_per_epoch is not None:
        return cfg.samples_per_epoch
    unknown = [i for i, s in enumerate(sources) if s.samples is None]
    if unknown:
        raise ConfigError(f"{field_name}.samples_per_epoch is not set and {field_name}.sources[{unknown[0]}] has no "
                         f"sample count (set its `samples` or write a manifest.json)")
    return sum(s.samples for s in sources)


class MixtureStream(ShardStream):
    """A `ShardStream` whose source is a `MixedSource`: each sample drawn from set i with probability ∝ weight i."""

    def __init__(
        self,
        sources: list[ResolvedSource],
        processor: Callable,
        collate_fn: Callable,
        batch_size: int,
        *,
        shuffle_buffer: int = 500,
        seed: int = 0,
        epoch_samples: int | None = None,
        count: Callable[[list[str]], list[int]] = shard_sizes,
    ):
        """`epoch_samples`: samples that make one epoch (None: endless when iterated directly); `count`: samples
        of each shard of a set (the data module passes the counts rank 0 made)."""
        sets = [WeightedSet(s.name, s.urls, count(s.urls), s.weight) for s in sources]
        super().__init__(
            [], processor, collate_fn, batch_size, shuffle_buffer=shuffle_buffer, seed=seed,
            source=MixedSource(sets, seed, epoch_samples),
        )


def mixture_loader(
    cfg: MixtureConfig,
    processor: Processor,
    *,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    shuffle_buffer: int,
    seed: int,
    count: Callable[[list[str]], list[int]] = shard_sizes,
    pin_memory: bool = False,
) -> EpochLoader:
    """The training `EpochLoader` of a mixture: samples-per-epoch ÷ (world size × batch size) full batches."""
    sources = resolve_sources(cfg, expand_shards, manifest_count)
    samples = epoch_samples(cfg, sources)
    if samples < world_size * batch_size:
        raise ConfigError(f"data.mixture: {samples} samples per epoch are fewer than one global batch "
                         f"({world_size} rank(s) × data.batch_size={batch_size})")
    stream = MixtureStream(
        sources,
        processor,
        processor.collate,
        batch_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        epoch_samples=samples,
        count=count,
    )
    return EpochLoader(stream, num_workers, rank=rank, world_size=world_size, pin_memory=pin_memory)
