"""Counting what the data pipeline could not use, by reason, inside one worker.

Bad data never stops a run and is never lost silently: an unreadable tar, an undecodable image, a
sample that breaks the format or does not fit the sequence limit is skipped and counted here, and the
counts ride along on the next batch (`Batch.skipped`) to the trainer, which logs them per epoch. The
trade-off: counts arrive with a delay of one batch, in exchange for needing no shared memory between
worker processes.

Two kinds of entries share the counter: *samples* (one count per sample not trained on, e.g.
`bad_image`, `missing_image`, `too_long`, `unread_after_damage`) and *events* (`corrupt_tar`,
`truncated_tar`, `read_error`: one per damaged shard read). `truncated` counts samples that were kept
but cut to the sequence limit.
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter

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
