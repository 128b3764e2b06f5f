"""The epoch batch plan: every slot in exactly one (rank, step), equal steps per rank, contiguous rank and
worker ranges, the remainder spread or dropped, clear errors for plans that cannot work."""

from __future__ import annotations

from itertools import product

import pytest

from mmlatent.data.plan import BatchPlan, Remainder

SAMPLES = [*range(1, 41), 47, 64, 97, 128]
WORLDS = (1, 2, 3, 4)
BATCHES = (1, 2, 3, 5)
WORKERS = (1, 2, 3)


def plans(remainder: Remainder) -> list[BatchPlan]:
    """Every valid plan of the (N, W, B) grid."""
    out = []
    for n, w, b in product(SAMPLES, WORLDS, BATCHES):
        if n >= w and (remainder == "spread" or n >= w * b):
            out.append(BatchPlan(n, w, b, remainder))
    return out


def slot_owners(plan: BatchPlan, workers: int) -> list[tuple[int, int]]:
    """(rank, step) of every slot the plan reads, in slot order, built only from the worker ranges: worker k
    of rank r reads its steps k, k + K, … one after another from `worker_start` on."""
    owners: dict[int, tuple[int, int]] = {}
    for rank, worker in product(range(plan.world), range(workers)):
        slot = plan.worker_start(rank, worker, workers)
        for step in plan.worker_steps(worker, workers):
            for _ in range(plan.size(rank, step)):
                assert slot not in owners, f"{plan}, K={workers}: slot {slot} planned twice"
                owners[slot] = (rank, step)
                slot += 1
    assert sorted(owners) == list(range(len(owners))), f"{plan}, K={workers}: the planned slots leave gaps"
    return [owners[s] for s in range(len(owners))]


@pytest.mark.parametrize("remainder", ["spread", "drop"])
def test_every_planned_slot_belongs_to_exactly_one_rank_step(remainder: Remainder):
    """Reading the worker ranges gives each (rank, step) exactly `size` slots, each slot once, no gaps, and
    covers all N slots (spread) or all full global batches (drop)."""
    for plan, workers in product(plans(remainder), WORKERS):
        owners = slot_owners(plan, workers)
        per_step = plan.world * plan.batch_size
        planned = plan.samples if remainder == "spread" else plan.samples - plan.samples % per_step
        assert len(owners) == planned, (plan, workers)
        for rank, step in product(range(plan.world), range(plan.steps)):
            assert owners.count((rank, step)) == plan.size(rank, step), (plan, workers, rank, step)


def test_spread_sizes_every_rank_the_same_steps_and_no_empty_batch():
    """Spread: S = ⌈N / (W·B)⌉ steps per rank, full batches before the m tail steps, tail batches differing by
    at most one, none empty when B ≥ 2 (m ≤ 2), and m as small as that allows."""
    for plan in plans("spread"):
        n, w, b = plan.samples, plan.world, plan.batch_size
        S, m = plan.steps, plan.tail_steps
        assert S == -(-n // (w * b)), plan
        sizes = [[plan.size(r, t) for t in range(S)] for r in range(w)]
        assert sum(map(sum, sizes)) == n, plan
        assert all(row[: S - m] == [b] * (S - m) for row in sizes), plan
        tail = [s for row in sizes for s in row[S - m :]]
        assert all(0 <= s <= b for s in tail) and (not tail or max(tail) - min(tail) <= 1), plan
        if b >= 2:
            assert min(map(min, sizes)) >= 1 and m <= 2, plan
        if m > 1:  # one step fewer would leave a tail batch empty
            assert n - w * b * (S - m + 1) < w * (m - 1), plan
        if n % (w * b) == 0:
            assert m == 0 and all(s == b for row in sizes for s in row), plan


def test_drop_keeps_only_full_batches():
    """Drop: ⌊N / (W·B)⌋ steps of full batches; the last N mod W·B slots are not planned."""
    for plan in plans("drop"):
        per_step = plan.world * plan.batch_size
        assert plan.steps == plan.samples // per_step and plan.tail_steps == 0, plan
        assert all(plan.size(r, t) == plan.batch_size for r in range(plan.world) for t in range(plan.steps)), plan
        last = plan.world - 1
        assert plan.rank_start(last) + plan.rank_samples(last) == plan.samples - plan.samples % per_step, plan


def test_one_sample_batches_plan_empty_fillers_only_when_unavoidable():
    """B = 1 and N mod W ≠ 0: the missing (rank, step) batches are planned empty; nothing else is."""
    for n, w in product(range(1, 30), WORLDS):
        if n < w:
            continue
        plan = BatchPlan(n, w, 1)
        sizes = [plan.size(r, t) for r in range(w) for t in range(plan.steps)]
        assert set(sizes) <= {0, 1} and sum(sizes) == n
        assert sizes.count(0) == (-n) % w, (n, w)


@pytest.mark.parametrize("remainder", ["spread", "drop"])
def test_rank_ranges_are_contiguous_and_consecutive(remainder: Remainder):
    """Rank r reads [rank_start(r), rank_start(r) + rank_samples(r)); rank 0 starts at 0, each next rank
    where the previous one ended, and rank_samples is the sum of the rank's batch sizes."""
    for plan in plans(remainder):
        end = 0
        for rank in range(plan.world):
            assert plan.rank_start(rank) == end, (plan, rank)
            assert plan.rank_samples(rank) == sum(plan.size(rank, t) for t in range(plan.steps)), (plan, rank)
            end += plan.rank_samples(rank)


@pytest.mark.parametrize("remainder", ["spread", "drop"])
def test_worker_ranges_partition_the_rank_range(remainder: Remainder):
    """Workers 0..K-1 of a rank read consecutive runs that tile the rank's range, and `worker_prefix` counts
    the samples of a worker's first batches (its steps k, k + K, …)."""
    for plan, workers in product(plans(remainder), WORKERS):
        for rank in range(plan.world):
            end = plan.rank_start(rank)
            for worker in range(workers):
                assert plan.worker_start(rank, worker, workers) == end, (plan, rank, worker)
                steps = plan.worker_steps(worker, workers)
                assert list(steps) == list(range(worker, plan.steps, workers))
                sizes = [plan.size(rank, s) for s in steps]
                for batches in range(len(steps) + 1):
                    assert plan.worker_prefix(rank, worker, workers, batches) == sum(sizes[:batches])
                assert plan.worker_samples(rank, worker, workers) == sum(sizes)
                end += sum(sizes)
            assert end == plan.rank_start(rank) + plan.rank_samples(rank), (plan, rank)


def test_more_workers_than_steps_leaves_the_extra_workers_empty():
    """A worker with no step reads nothing, and starts where the rank's range ends."""
    plan = BatchPlan(10, 2, 4)  # 2 steps per rank
    assert plan.steps == 2
    assert plan.worker_samples(1, 3, 4) == 0 and list(plan.worker_steps(3, 4)) == []
    assert plan.worker_start(1, 3, 4) == plan.rank_start(1) + plan.rank_samples(1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples": 0, "world": 1, "batch_size": 2}, "no sample to plan: every shard is empty or unreadable"),
        ({"samples": 3, "world": 4, "batch_size": 2}, r"3 sample\(s\) cannot give each of 4 rank\(s\) one per epoch"),
        ({"samples": 7, "world": 2, "batch_size": 4, "remainder": "drop"},
         r"7 samples are fewer than one global batch \(2 × 4\)"),
        ({"samples": 8, "world": 0, "batch_size": 2}, "world=0 and batch_size=2 must be at least 1"),
        ({"samples": 8, "world": 2, "batch_size": 0}, "world=2 and batch_size=0 must be at least 1"),
    ],
)
def test_plans_that_cannot_work_fail_with_a_clear_message(kwargs: dict, message: str):
    """Invalid (N, W, B) combinations raise `ValueError` naming the numbers involved."""
    with pytest.raises(ValueError, match=message):
        BatchPlan(**kwargs)


def test_exactly_one_global_batch_is_enough_for_drop():
    """Drop with N == W·B plans one step of full batches (the bound is inclusive)."""
    plan = BatchPlan(8, 2, 4, "drop")
    assert plan.steps == 1 and plan.size(0, 0) == plan.size(1, 0) == 4
