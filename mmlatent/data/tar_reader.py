"""Tar shards to raw samples, noticing the damage `tarfile` hides.

Python's `tarfile` in stream mode (what webdataset uses) ends a tar quietly when it meets a corrupt
header after the first member, or when the file is cut short: every sample after the damage would vanish
without a trace. This stage reads members with `tarfile` as webdataset does, then checks *why* the tar
ended: a proper archive ends on a zero block; anything else raises `DamagedTar` (`corrupt_tar` or
`truncated_tar`), which the caller counts. The samples lost past the damage cannot be counted (their
headers are gone), so the shard URL and byte offset are logged instead.

URL opening (`url_opener`, so `pipe:` and HTTP URLs work) and grouping members into samples
(`group_by_keys`) are webdataset's own stages.
"""

from __future__ import annotations

import tarfile
from typing import Callable, Iterable, Iterator

from webdataset.tariterators import group_by_keys, url_opener

BLOCK = 512


class DamagedTar(IOError):
    """A shard that does not end like a tar archive. `reason` is `corrupt_tar` or `truncated_tar`."""

    def __init__(self, reason: str, url: str, offset: int):
        self.reason = reason
        super().__init__(f"{url}: {reason.replace('_', ' ')} at byte {offset}")


class TailReader:
    """A read-only wrapper that remembers the last `window` bytes read and the absolute position."""

    def __init__(self, raw, window: int = 1 << 16):
        self.raw, self.window, self.pos, self.tail = raw, window, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.pos += len(data)
        self.tail = (self.tail + data)[-self.window:]
        return data

    def block_at(self, offset: int) -> bytes | None:
        """The 512 bytes at absolute `offset`, reading ahead if needed; None if the file ends first."""
        while self.pos < offset + BLOCK:
            if not self.read(offset + BLOCK - self.pos):
                return None
        start = offset - (self.pos - len(self.tail))
        if start < 0:
            return None
        return self.tail[start : start + BLOCK]


def checked_members(stream, url: str) -> Iterator[dict]:
    """Regular-file members of one tar as {"fname", "data", "__url__"}; raises `DamagedTar` at the end."""
    reader = TailReader(stream)
    tf = tarfile.open(fileobj=reader, mode="r|*")
    offset = 0
    for info in tf:
        offset = info.offset_data + -(-info.size // BLOCK) * BLOCK
        if not info.isreg() or info.name.startswith("__"):
            continue
        data = tf.extractfile(info).read()
        if len(data) != info.size:
            raise DamagedTar("truncated_tar", url, info.offset_data + len(data))
        yield {"fname": info.name, "data": data, "__url__": url}
        tf.members = []  # stream mode: do not keep every TarInfo in memory
    # tarfile stopped: at the end-of-archive zero block (fine), a bad header, or the end of the bytes
    end = reader.block_at(offset)
    if end is None:
        raise DamagedTar("truncated_tar", url, offset)
    if end.strip(b"\0"):
        raise DamagedTar("corrupt_tar", url, offset)


def tar_samples(src: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """{"url"} dicts -> raw samples {"__key__", "__url__", "json", "img0.png", ...}.

    Samples of a damaged shard read before the damage are kept; the damage itself goes to `handler`.
    """

    def members() -> Iterator[dict]:
        for source in url_opener(src, handler=handler):
            try:
                yield from checked_members(source["stream"], source["url"])
            except (tarfile.TarError, OSError, EOFError) as exn:
                if not handler(exn):
                    return
            finally:
                close = getattr(source["stream"], "close", None)
                if close is not None:
                    close()
            yield {}  # end of shard: never group members of two shards into one sample

    return group_by_keys(members(), handler=handler)
