"""`skips.jsonl`: why each skipped record was skipped, one JSON line per record, beside `manifest.json`.

Skip counts by reason say how much was lost; this file says which records and why, so a researcher can
open the offending file at the offending row. A line is `{"key", "file", "row", "reason", "path",
"detail"}`: the sample key the record would have had, the source file and row (or record index) it came
from, the stable reason code, the image path or column involved (null when none), and the message.

Lines are appended as records are skipped. The trade-off with resumption: the byte size of the file is
saved with the conversion's resumable state when a shard is finished, and a resumed run cuts the file back
to that size before it converts the records after that shard again, so no record is listed twice, at the
price of one `truncate` per resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from mmlatent.atomic import full_disk_named

SKIPS_FILE = "skips.jsonl"
"""Name of the file, beside `manifest.json`."""


class Skip(NamedTuple):
    """One skipped record (plain fields, so it pickles from a worker process)."""

    key: str
    """The sample key the record would have had."""
    file: str
    """Source file, relative to the source root."""
    row: int
    """Row of a parquet file, or record index of a JSON file."""
    reason: str
    """Stable reason code (`missing_image_file`, `marker_mismatch`, …), the key of the skip counts."""
    path: str | None
    """The image path or column involved, when there is one."""
    detail: str
    """Human-readable explanation."""


class SkipLog:
    """Appends `Skip` lines to `skips.jsonl`; keeps the first skip of each reason as an example."""

    def __init__(self, path: Path, resume_at: int = 0):
        self.path = path
        """The file written."""
        self.examples: dict[str, Skip] = {}
        """The first skip of each reason in this run (what an error message shows)."""
        self._file = open(path, "a+b")
        size = self._file.seek(0, 2)
        self._file.truncate(min(size, resume_at))  # lines of records after the last finished shard come again

    def add(self, skip: Skip) -> None:
        self.examples.setdefault(skip.reason, skip)
        line = json.dumps(skip._asdict(), ensure_ascii=False, sort_keys=True) + "\n"
        with full_disk_named(self.path):
            self._file.write(line.encode("utf-8"))

    def offset(self) -> int:
        """Bytes written so far (saved with the resumable state)."""
        with full_disk_named(self.path):
            self._file.flush()
        return self._file.tell()

    def close(self) -> None:
        with full_disk_named(self.path):
            self._file.close()
