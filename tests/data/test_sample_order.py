"""Sample sources: which samples every (rank, worker) reads in which order. Exact epochs cover every sample
once and reshuffle shards per epoch; every position is a pure function of (seed, epoch, rank, worker, slot),
so reading from a saved position continues exactly; a mixture picks its sets in proportion to the weights."""

from __future__ import annotations

from collections import Counter
from itertools import islice, product
from pathlib import Path

import pytest

from mmlatent.data.sample_order import EpochSource, MixedSource, ResampledSource, WeightedSet, WorkerView
from mmlatent.data.shard_writer import write_shards
from mmlatent.data.skips import SkipCounter
from tests.data.test_pipeline import raw

N = 23
"""Samples of the exact-epoch shard set: shards of 5, 5, 5, 5 and 3."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[list[str], list[int]]:
    """(urls, sizes) of 23 samples `s0000`…`s0022` in 5 shards."""
    out = tmp_path_factory.mktemp("order")
    stats = write_shards((raw(i) for i in range(N)), out, samples_per_shard=5, progress=False)
    return stats.shards, [5, 5, 5, 5, 3]


def write_set(root: Path, name: str, first: int, count: int, per_shard: int) -> WeightedSet:
    """A mixture set of samples `s{first}`… (weight 1; callers set their own)."""
    stats = write_shards((raw(i) for i in range(first, first + count)), root / name, samples_per_shard=per_shard,
                         progress=False)
    sizes = [min(per_shard, count - i) for i in range(0, count, per_shard)]
    return WeightedSet(name, stats.shards, sizes, 1.0)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> tuple[WeightedSet, WeightedSet]:
    """Set `a` (s0000…s0011, 2 shards) and set `b` (s0100…s0107, 1 shard)."""
    root = tmp_path_factory.mktemp("mix")
    return write_set(root, "a", 0, 12, 6), write_set(root, "b", 100, 8, 8)


def keys(items) -> list[str | None]:
    return [None if x is None else x["__key__"] for x in items]


def read(source, view: WorkerView, start: int = 0, n: int | None = None) -> list[str | None]:
    """Keys of the slots `source` gives `view` from position `start` (the first `n` for endless sources)."""
    return keys(islice(source.slots(view, start, SkipCounter()), n))


def views(epoch: int, world: int, workers: int, batch_size: int) -> list[WorkerView]:
    return [WorkerView(epoch, r, world, k, workers, batch_size) for r, k in product(range(world), range(workers))]


# ------------------------------------------------------------------------------------------ EpochSource


@pytest.mark.parametrize(("world", "workers", "batch_size"), [(1, 1, 4), (2, 2, 3), (3, 2, 2), (2, 3, 5)])
def test_epoch_source_reads_every_sample_once_across_ranks_and_workers(shards, world, workers, batch_size):
    """The (rank, worker) views of one epoch read disjoint slots that together are every sample once, and
    each view's slots are exactly as many as its planned batch sizes add up to."""
    urls, sizes = shards
    source = EpochSource(urls, sizes, seed=3)
    seen: list[str | None] = []
    for view in views(1, world, workers, batch_size):
        got = read(source, view)
        assert len(got) == sum(source.batch_sizes(view, 0)), view
        seen += got
    assert sorted(seen) == [f"s{i:04d}" for i in range(N)]


def test_epoch_source_with_drop_leaves_out_only_the_remainder(shards):
    """`remainder="drop"`: every rank reads full batches only; N mod W·B samples (the end of the epoch's
    order) are left out, and no sample is read twice."""
    urls, sizes = shards
    source = EpochSource(urls, sizes, seed=3, remainder="drop")
    seen = [k for view in views(0, 2, 2, 4) for k in read(source, view)]  # 23 // 8 = 2 steps: 16 samples
    assert len(seen) == len(set(seen)) == 16
    order = [k for i in source.order(0) for k in [f"s{5 * i + j:04d}" for j in range(sizes[i])]]
    assert set(seen) == set(order[:16])


def test_epoch_source_is_deterministic(shards):
    """Two sources with the same seed give every view the same sequence; another seed another shard order."""
    urls, sizes = shards
    a, b = EpochSource(urls, sizes, seed=5), EpochSource(urls, sizes, seed=5)
    for view in views(2, 2, 2, 3):
        assert read(a, view) == read(b, view)
    assert EpochSource(urls, sizes, seed=6).order(2) != a.order(2)


def test_epoch_source_reorders_shards_per_epoch_unless_told_not_to(shards):
    """Each epoch reads the shards in its own order (the same samples); `shuffle=False` keeps file order."""
    urls, sizes = shards
    source = EpochSource(urls, sizes, seed=0)
    orders = [source.order(e) for e in range(4)]
    assert all(sorted(o) == list(range(len(urls))) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    view = WorkerView(0, 0, 1, 0, 1, 4)
    epochs = [read(source, WorkerView(e, 0, 1, 0, 1, 4)) for e in range(4)]
    assert len({tuple(e) for e in epochs}) > 1 and all(sorted(e) == sorted(epochs[0]) for e in epochs)
    plain = EpochSource(urls, sizes, shuffle=False)
    assert plain.order(0) == plain.order(7) == list(range(len(urls)))
    assert read(plain, view) == [f"s{i:04d}" for i in range(N)]


def test_epoch_source_resumes_exactly_from_any_position(shards):
    """Reading a view from position p gives what reading from 0 gives after p slots, for every p."""
    urls, sizes = shards
    source = EpochSource(urls, sizes, seed=1)
    for view in views(3, 2, 2, 3):
        full = read(source, view)
        for start in range(len(full) + 1):
            assert read(source, view, start) == full[start:], (view, start)


def test_epoch_source_prefix_matches_the_batches_read(shards):
    """`prefix(view, b)` is the number of slots the view's first b batches take (where a resume starts)."""
    urls, sizes = shards
    source = EpochSource(urls, sizes)
    for view in views(0, 2, 3, 2):
        batch_sizes = list(source.batch_sizes(view, 0))
        for b in range(len(batch_sizes) + 1):
            assert source.prefix(view, b) == sum(batch_sizes[:b])
            assert list(source.batch_sizes(view, b)) == batch_sizes[b:]


def test_epoch_source_probe_starts_at_the_rank_and_wraps_around(shards):
    """`probe` reads every slot of the epoch once, starting with this rank's range."""
    urls, sizes = shards
    source = EpochSource(urls, sizes, seed=2)
    view = WorkerView(0, 1, 2, 0, 1, 3)
    probed = keys(source.probe(view, SkipCounter()))
    assert sorted(probed) == [f"s{i:04d}" for i in range(N)]
    assert probed[: len(read(source, view))] == read(source, view)


# -------------------------------------------------------------------------------------- ResampledSource


def test_resampled_source_is_deterministic_and_differs_per_worker(sets):
    """The same (seed, epoch, rank, worker) gives the same endless sequence; other ranks, workers and epochs
    draw their own."""
    a, _ = sets
    source = ResampledSource(a.urls, a.sizes, seed=4)
    view = WorkerView(0, 0, 2, 0, 2, 3)
    first = read(source, view, n=60)
    assert first == read(ResampledSource(a.urls, a.sizes, seed=4), view, n=60)
    assert set(first) <= {f"s{i:04d}" for i in range(12)}
    for other in (WorkerView(0, 1, 2, 0, 2, 3), WorkerView(0, 0, 2, 1, 2, 3), WorkerView(1, 0, 2, 0, 2, 3)):
        assert read(source, other, n=60) != first, other
    assert read(ResampledSource(a.urls, a.sizes, seed=5), view, n=60) != first


def test_resampled_source_resumes_exactly_from_any_position(sets):
    """Reading from position p continues the sequence read from 0 (skips land inside and across shards)."""
    a, _ = sets
    source = ResampledSource(a.urls, a.sizes, seed=0)
    view = WorkerView(2, 0, 1, 0, 1, 4)
    full = read(source, view, n=40)
    for start in range(30):
        assert read(source, view, start, 10) == full[start : start + 10], start


def test_resampled_source_epochs_and_errors(sets):
    """An epoch is epoch_samples ÷ (W·B) full batches (None: endless); fewer samples than one global batch
    and a set without readable samples are clear errors."""
    a, _ = sets
    source = ResampledSource(a.urls, a.sizes, epoch_samples=50)
    assert source.steps(2, 4) == 6
    view = WorkerView(0, 0, 2, 1, 4, 4)  # worker 1 of 4 produces steps 1 and 5
    assert list(source.batch_sizes(view, 0)) == [4, 4] and source.prefix(view, 2) == 8
    assert ResampledSource(a.urls, a.sizes).steps(2, 4) is None
    assert list(islice(ResampledSource(a.urls, a.sizes).batch_sizes(view, 0), 100)) == [4] * 100
    too_few = r"7 samples per epoch are fewer than one global batch \(2 rank\(s\) × batch size 4\)"
    with pytest.raises(ValueError, match=too_few):
        ResampledSource(a.urls, a.sizes, epoch_samples=7).steps(2, 4)
    with pytest.raises(RuntimeError, match="none of its 2 shard"):
        ResampledSource(a.urls, [0, 0])


# ----------------------------------------------------------------------------------------- MixedSource


def test_mixed_source_picks_sets_in_proportion_to_their_weights(sets):
    """Over 1200 slots, set `a` (weight 3) gives about 3/4 of the samples and set `b` (weight 1) the rest;
    a set of weight 0 is never read."""
    a, b = sets
    source = MixedSource([WeightedSet("a", a.urls, a.sizes, 3.0), WeightedSet("b", b.urls, b.sizes, 1.0)], seed=0)
    got = read(source, WorkerView(0, 0, 1, 0, 1, 8), n=1200)
    share_a = sum(k < "s0100" for k in got) / len(got)
    assert abs(share_a - 0.75) < 0.05  # binomial sd ≈ 0.0125: a 4-sigma bound
    only_b = MixedSource([WeightedSet("a", a.urls, a.sizes, 0.0), WeightedSet("b", b.urls, b.sizes, 1.0)], seed=0)
    assert all(k >= "s0100" for k in read(only_b, WorkerView(0, 0, 1, 0, 1, 8), n=100))


def test_mixed_source_every_set_keeps_its_own_order_at_every_step(sets):
    """Within any window the mixture holds both sets, and each set's samples follow that set's own
    resampled sequence (the mixture interleaves, it does not reorder a set)."""
    a, b = sets
    source = MixedSource([WeightedSet("a", a.urls, a.sizes, 1.0), WeightedSet("b", b.urls, b.sizes, 1.0)], seed=1)
    got = read(source, WorkerView(0, 0, 1, 0, 1, 8), n=400)
    windows = [Counter(k < "s0100" for k in got[i : i + 40]) for i in range(0, 400, 40)]
    assert all(w[True] >= 8 and w[False] >= 8 for w in windows)
    from_b = [k for k in got if k >= "s0100"]
    assert from_b[:8] == [f"s{100 + i:04d}" for i in range(8)]  # set b has one shard: read start to end, again


def test_mixed_source_is_deterministic_and_resumes_exactly(sets):
    """Same seed and view, same sequence; reading from position p continues the sequence read from 0."""
    a, b = sets

    def mixed() -> MixedSource:
        return MixedSource([WeightedSet("a", a.urls, a.sizes, 2.0), WeightedSet("b", b.urls, b.sizes, 1.0)], seed=7)

    view = WorkerView(1, 1, 2, 0, 1, 4)
    full = read(mixed(), view, n=60)
    assert read(mixed(), view, n=60) == full
    assert read(mixed(), WorkerView(1, 0, 2, 0, 1, 4), n=60) != full
    for start in range(0, 50, 3):
        assert read(mixed(), view, start, 10) == full[start : start + 10], start


def test_mixed_source_rejects_a_weighted_set_without_samples(sets):
    """A set with weight > 0 whose shards hold nothing readable is named in the error; with weight 0 it is
    allowed (never read)."""
    a, b = sets
    with pytest.raises(RuntimeError, match="mixture source 'b': none of its 1 shard"):
        MixedSource([WeightedSet("a", a.urls, a.sizes, 1.0), WeightedSet("b", b.urls, [0], 1.0)])
    MixedSource([WeightedSet("a", a.urls, a.sizes, 1.0), WeightedSet("b", b.urls, [0], 0.0)])
