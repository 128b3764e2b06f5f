"""The batch plan of one epoch: how many samples every rank takes at every step, and which range of the
epoch's sample order each rank and data-loader worker reads.

An epoch is an ordered sequence of N sample slots (the data source decides the order, e.g. shards
shuffled per epoch). `BatchPlan` cuts it so that
- every rank takes the same number of steps S = ⌈N / (W·B)⌉ (W ranks, B samples per batch and rank);
- every slot belongs to exactly one (rank, step): nothing is repeated or left out;
- rank r reads one contiguous range of slots, and within it logical worker k (of K) reads the
  contiguous run of slots behind its steps k, k+K, k+2K, … (the order a `DataLoader` takes batches
  from its workers), so each worker opens only the shards its range covers.

The remainder (N not a multiple of W·B) is spread over the last m steps of every rank, m as small as
keeps every batch non-empty (m = 1 or 2 for B ≥ 2): those batches hold ⌊·⌋ or ⌈·⌉ of the tail samples
instead of B. The trade-off: the last step or two of an epoch run smaller batches (a slightly noisier
gradient, never a repeated or dropped sample). `remainder="drop"` keeps every batch full instead and
leaves the last N mod W·B slots of each epoch's order out (they differ between epochs when the order is
reshuffled). When even one sample per (rank, step) is impossible (B = 1 and N mod W ≠ 0), some batches
are planned empty and the pipeline fills them with a zero-weight filler batch.

Everything here is arithmetic on (N, W, B, K): O(1) per batch, nothing materialised per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Remainder = Literal["spread", "drop"]


@dataclass(frozen=True)
class BatchPlan:
    """Batch sizes of every (rank, step) and the slot ranges of every (rank, logical worker)."""

    samples: int
    """N: slots in the epoch's order."""
    world: int
    """W: ranks."""
    batch_size: int
    """B: most samples in one rank's batch."""
    remainder: Remainder = "spread"
    """`spread`: every slot is planned; the last steps hold smaller batches. `drop`: only full batches."""

    def __post_init__(self) -> None:
        if self.world < 1 or self.batch_size < 1:
            raise ValueError(f"world={self.world} and batch_size={self.batch_size} must be at least 1")
        if self.samples == 0:
            raise ValueError("no sample to plan: every shard is empty or unreadable (see the warnings above)")
        if self.samples < self.world:
            raise ValueError(f"{self.samples} sample(s) cannot give each of {self.world} rank(s) one per epoch")
        if self.remainder == "drop" and self.samples < self.world * self.batch_size:
            raise ValueError(f"{self.samples} samples are fewer than one global batch ({self.world} × {self.batch_size})")

    # ------------------------------------------------------------------------------------ step sizes

    @property
    def steps(self) -> int:
        """S: steps of every rank in the epoch."""
        per_step = self.world * self.batch_size
        if self.remainder == "drop":
            return self.samples // per_step
        return -(-self.samples // per_step)

    @property
    def tail_steps(self) -> int:
        """m: the last steps that share the remainder (0 when every batch is full)."""
        S, per_step = self.steps, self.world * self.batch_size
        if self.remainder == "drop" or self.samples == S * per_step:
            return 0
        for m in range(1, S + 1):
            if self.samples - per_step * (S - m) >= self.world * m:
                return m
        return S  # B = 1 and N mod W != 0: some tail batches stay empty (fillers)

    def _tail(self) -> tuple[int, int, int, int]:
        """(first tail step, m, base size, number of tail batches one larger), batches ordered (step, rank)."""
        S, m = self.steps, self.tail_steps
        first = S - m
        tail = self.samples - self.world * self.batch_size * first
        base, extra = divmod(tail, self.world * m) if m else (0, 0)
        return first, m, base, extra

    def size(self, rank: int, step: int) -> int:
        """Samples of rank `rank`'s batch at step `step` (0 only in the B = 1 corner)."""
        first, _, base, extra = self._tail()
        if step < first:
            return self.batch_size
        return base + ((step - first) * self.world + rank < extra)

    def rank_samples(self, rank: int) -> int:
        """Samples rank `rank` takes in the epoch."""
        first, m, _, _ = self._tail()
        return self.batch_size * first + sum(self.size(rank, t) for t in range(first, first + m))

    def rank_start(self, rank: int) -> int:
        """First slot of rank `rank`'s range (ranks read consecutive ranges in rank order)."""
        first, m, _, _ = self._tail()
        tail_before = sum(self.size(r, t) for r in range(rank) for t in range(first, first + m))
        return rank * self.batch_size * first + tail_before

    # ------------------------------------------------------------------------------- worker ranges

    def worker_steps(self, worker: int, workers: int) -> range:
        """The steps logical worker `worker` of `workers` produces: worker, worker + K, …"""
        return range(worker, self.steps, workers)

    def worker_prefix(self, rank: int, worker: int, workers: int, batches: int) -> int:
        """Samples in the first `batches` batches of logical worker `worker` on rank `rank`."""
        steps = self.worker_steps(worker, workers)[:batches]
        first = self._tail()[0]
        full = len(range(worker, min(first, self.steps), workers)[:batches])
        return self.batch_size * full + sum(self.size(rank, s) for s in steps if s >= first)

    def worker_start(self, rank: int, worker: int, workers: int) -> int:
        """First slot of logical worker `worker`'s run inside rank `rank`'s range."""
        before = sum(self.worker_prefix(rank, k, workers, len(self.worker_steps(k, workers))) for k in range(worker))
        return self.rank_start(rank) + before

    def worker_samples(self, rank: int, worker: int, workers: int) -> int:
        """Samples logical worker `worker` of rank `rank` reads in the epoch."""
        return self.worker_prefix(rank, worker, workers, len(self.worker_steps(worker, workers)))
