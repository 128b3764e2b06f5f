"""Counting what the data pipeline could not use, by reason, inside one worker.

Bad data never stops a run and is never lost silently: an unreadable tar, an undecodable image, a
sample that breaks the format or does not fit the sequence limit is skipped and counted here, and the
counts ride along on the next batch (`Batch.skipped`) to the trainer, which logs them per epoch. The
trade-off: counts arrive with a delay of one batch, in exchange for needing no shared memory between
worker processes.

Two kinds of entries share the counter: *samples* (one count per sample not trained on, e.g.
`bad_image`, `missing_image`, `too_long`, `unread_after_damage`) and *events* (`corrupt_tar`,
`truncated_tar`, `read_error`: one per damaged shard read). `truncated` counts samples that were kept
but cut to the sequence limit. `SkipSummary` splits a total into the three, so that a truncated tar that
cost one sample reads "1 sample lost, 1 damaged shard read", never "2 samples skipped".
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

from mmlatent.data.tar_reader import DamagedTar

log = logging.getLogger(__name__)

TAR_EVENTS = frozenset({"corrupt_tar", "truncated_tar", "read_error"})
"""Reasons that count damaged shards, not samples."""
KEPT = frozenset({"truncated"})
"""Reasons that count samples which were kept (changed, not skipped)."""


class SkipCounter:
    """Counts skipped samples by reason inside one worker; `drain` hands over and resets the counts."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, reason: str, detail: str, n: int = 1) -> None:
        self.counts[reason] += n
        log.warning("%s (%d sample%s): %s", reason.replace("_", " "), n, "" if n == 1 else "s", detail)

    def drain(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), Counter()
        return out

    def tar_handler(self, exn: Exception) -> bool:
        """webdataset-style handler for errors while reading tars: count and go on."""
        if isinstance(exn, DamagedTar):
            reason = exn.reason
        elif isinstance(exn, (tarfile.TarError, EOFError, OSError)):
            reason = "corrupt_tar"
        else:
            reason = "read_error"
        self.counts[reason] += 1
        log.warning("damaged shard (%s): %r", reason, exn)
        return True


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class SkipSummary:
    """Skip counts (summed over batches) split into lost samples, damage events and kept-but-changed samples."""

    samples: dict[str, int] = field(default_factory=dict)
    """Samples not trained on, by reason (`unread_after_damage`, `bad_image`, `too_long`, …)."""
    events: dict[str, int] = field(default_factory=dict)
    """Damaged shard reads, by reason (`TAR_EVENTS`); each may have cost any number of samples, counted above."""
    kept: dict[str, int] = field(default_factory=dict)
    """Samples trained on but changed, by reason (`KEPT`: `truncated`)."""

    @classmethod
    def of(cls, counts: Mapping[str, int]) -> "SkipSummary":
        """Split a counter of mixed reasons."""
        out = cls()
        for reason, n in sorted(counts.items()):
            if n:
                part = out.events if reason in TAR_EVENTS else out.kept if reason in KEPT else out.samples
                part[reason] = int(n)
        return out

    @property
    def lost(self) -> int:
        """Samples not trained on."""
        return sum(self.samples.values())

    @property
    def damage_events(self) -> int:
        """Damaged shard reads."""
        return sum(self.events.values())

    def metrics(self, split: str = "train") -> dict[str, float]:
        """What the trainer logs per epoch of `split` (each summed over ranks): `data/skipped`,
        `data/damage_events`, `data/truncated` for training, `data/{split}_skipped` … for the others."""
        prefix = "data/" if split == "train" else f"data/{split}_"
        return {f"{prefix}skipped": float(self.lost), f"{prefix}damage_events": float(self.damage_events),
                f"{prefix}truncated": float(sum(self.kept.values()))}

    def message(self) -> str:
        """`lost 1 sample by reason {...}; 1 damaged shard read {...}`, or "" when nothing was lost or damaged."""
        parts = []
        if self.lost:
            parts.append(f"lost {_plural(self.lost, 'sample')} by reason {self.samples}")
        if self.damage_events:
            parts.append(f"{_plural(self.damage_events, 'damaged shard read')} {self.events}")
        return "; ".join(parts)
