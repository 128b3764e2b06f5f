"""File surgery the tests share: rewrite a tar's members, copy a synthetic split with some images broken, a file
that fails as a full disk does."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path
from typing import Callable

BROKEN_PNG = b"\x89PNG\r\n\x1a\n not really a png"
"""Bytes that start like a PNG and do not decode."""


def rewrite(tar_path, change: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite a tar with `change(name, payload)` -> new payload, or None to leave the member out."""
    with tarfile.open(tar_path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(tar_path, "w") as tf:
        for m, payload in members:
            payload = change(m.name, payload)
            if payload is not None:
                m.size = len(payload)
                tf.addfile(m, io.BytesIO(payload))


def copy_with_broken_images(src: Path, dst: Path, broken_shards: int) -> list[str]:
    """Copy the `*.tar` shards of `src` to `dst`, every image of the first `broken_shards` shards undecodable;
    returns the copied shards in order."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i, shard in enumerate(sorted(src.glob("*.tar"))):
        target = dst / shard.name
        shutil.copyfile(shard, target)
        if i < broken_shards:
            rewrite(target, lambda name, data: BROKEN_PNG if name.endswith(".png") else data)
        out.append(str(target))
    return out


class DiskFullFile(io.RawIOBase):
    """A file that accepts half of what it is given, then fails as a full disk would."""

    def __init__(self, real):
        self.real = real

    def write(self, data) -> int:
        self.real.write(bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        self.real.close()
        super().close()

    def __getattr__(self, name):
        return getattr(self.real, name)


def fill_the_disk(monkeypatch) -> None:
    """Every file `mmlatent.atomic` opens from now on fails as on a full disk."""
    import builtins

    from mmlatent import atomic

    real_open = builtins.open
    monkeypatch.setattr(atomic, "open", lambda *a, **k: DiskFullFile(real_open(*a, **k)), raising=False)
