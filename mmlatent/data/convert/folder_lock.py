"""One conversion at a time per output folder: an advisory lock on `OUT/.convert.lock`.

Two conversions writing one folder would interleave shards and staging files (the second used to fail
with a rename error about a staging file, after the first had lost work). `folder_lock` takes an
exclusive `flock` on a lock file in the folder for the whole conversion, or fails at once with
`FolderInUse` naming the folder and the holder's process id. The lock belongs to the open file, so it is
released when the holder exits, however it exits; the worker processes a conversion forks share it.

The trade-off: `flock` is advisory and local; two machines converting into one network folder are not
stopped on every file system.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".convert.lock"


class FolderInUse(ValueError):
    """The output folder is locked by another conversion."""


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the conversion lock of `folder` (which must exist) for the block; `FolderInUse` if another has it."""
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by another conversion (process {_holder(path)}); wait for it to "
                              f"finish or give another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
