"""Atomic file and folder writes: the one place mmlatent writes "to a temporary name, then renames".

A reader (another rank, a resumed run, a user's `ls`) must never see a half-written checkpoint, shard,
manifest or export folder. Every write therefore goes to a hidden temporary sibling (same folder, so the
rename stays on one file system) and is moved over the target with `os.replace`, which is atomic on POSIX
file systems; a write that fails removes its temporary and leaves the old target as it was. `durable=True`
also fsyncs the file and, after the rename, its folder, so the new name survives a power cut (checkpoints,
shards); cheap metadata skips that cost.

- `atomic_path(path)`: a temporary path to write however one likes (torch.save, safetensors, tar), then moved.
- `write_bytes` / `write_text` / `write_json`: the common cases on top of it (`write_json` is stable:
  sorted keys, two-space indent, UTF-8, final newline).
- `AtomicFile`: an open temporary file committed or aborted later (a shard written sample by sample).
- `atomic_folder(path)`: a temporary folder renamed into place (export folders, built tokenizers).
- `move(src, dst)`: rename a finished file into place.

A write that runs out of space (ENOSPC, EDQUOT) raises `DiskFull`, which names the target file and the
free space left; the `mmlatent` command prints it as one line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Literal


_NO_SPACE = os.strerror(errno.ENOSPC)
"""'No space left on device', as native writers report it in their messages too."""


class DiskFull(OSError):
    """A write that ran out of space on its file system; the message names the file being written."""


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


@contextmanager
def full_disk_named(path: str | os.PathLike) -> Iterator[None]:
    """Turn an out-of-space error inside the block into `DiskFull` naming `path`."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as err:
        # an OSError says so by errno; libraries that write natively (safetensors) only in their message
        full = err.errno in (errno.ENOSPC, errno.EDQUOT) if isinstance(err, OSError) else _NO_SPACE in str(err)
        if not full:
            raise
        folder = Path(path).parent
        raise DiskFull(errno.ENOSPC, f"no space left on the device writing {path} ({_free_space(folder)})") from None


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_folder(folder: Path) -> None:
    try:  # make a rename durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some file systems do not support fsync on folders


def move(src: str | os.PathLike, dst: str | os.PathLike, durable: bool = False) -> None:
    """Rename the finished file or folder `src` over `dst` in one atomic step."""
    os.replace(src, dst)
    if durable:
        _fsync_folder(Path(dst).parent)


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error it replaces `path`.

    With `durable`, the temporary file is fsynced before the rename and the folder after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        with full_disk_named(path):
            yield tmp
            if durable:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
        move(tmp, path, durable=durable)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> None:
    """Write `data` to `path` so that `path` is never seen half-written."""
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: str | os.PathLike, text: str, durable: bool = False) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes(path, text.encode("utf-8"), durable=durable)


def stable_json(obj: Any) -> str:
    """JSON with sorted keys, two-space indent, UTF-8 characters kept, and a final newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any, durable: bool = False) -> None:
    """Write `obj` as stable JSON (`stable_json`) to `path` atomically."""
    write_text(path, stable_json(obj), durable=durable)


class _NamedWrites:
    """A binary file whose out-of-space errors name the file it stands for (`DiskFull`)."""

    def __init__(self, file: IO[bytes], path: Path):
        self._file, self._path = file, path

    def write(self, data) -> int:
        with full_disk_named(self._path):
            return self._file.write(data)

    def flush(self) -> None:
        with full_disk_named(self._path):
            self._file.flush()

    def __getattr__(self, name: str):
        return getattr(self._file, name)


class AtomicFile:
    """An open temporary file beside `path`: `commit()` fsyncs, closes and renames it into place;
    `abort()` closes and removes it. For writers that produce a file over many calls (a tar shard)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _temporary_sibling(self.path)
        self.file: IO[bytes] = _NamedWrites(open(self.tmp, "wb"), self.path)  # type: ignore[assignment]

    def commit(self) -> None:
        with full_disk_named(self.path):
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        move(self.tmp, self.path, durable=True)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _publish_modes(folder: Path) -> None:
    """Folders 0755, files 0644 (`mkdtemp` and some libraries' own writes create them owner-only)."""
    os.chmod(folder, 0o755)
    for path in folder.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, if_exists: Literal["error", "replace", "keep"] = "error") -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; when the block ends without error it becomes `out_dir`.

    An existing non-empty `out_dir` is an error (`error`), replaced (`replace`; the old one is renamed
    aside first, so a reader sees the old or the new folder, never a mix), or kept and the new one
    discarded (`keep`: another process already built the same thing). On any error the temporary folder
    is removed and `out_dir` is left as it was. Files and folders get ordinary read permissions.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if if_exists == "error" and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        with full_disk_named(out):
            yield tmp
        _publish_modes(tmp)
        if out.exists() and if_exists == "keep":
            return
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            move(out, old)
            move(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                move(tmp, out)
            except OSError:
                if if_exists != "keep" or not out.exists():  # lost a race to an equivalent folder: fine
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
