"""Tar shards to raw samples by position, noticing the damage `tarfile` hides.

A shard is a sequence of samples: consecutive members sharing a key (`KEY.json`, `KEY.img0.png`, …) form
one sample, numbered 0, 1, … in file order. The data pipeline plans epochs in these positions, so this
module offers the two views of a shard that must agree: `sample_keys` (from member headers only) and
`shard_samples` (the samples at positions [start, stop), reading member data only for those).

Python's `tarfile` in stream mode (what webdataset uses, so `pipe:` and HTTP URLs work) ends a tar quietly
when it meets a corrupt header after the first member, or when the file is cut short: every sample after
the damage would vanish without a trace. `shard_samples` checks *why* the tar ended: a proper archive
ends on a zero block; anything else raises `DamagedTar` (`corrupt_tar` or `truncated_tar`) after the
samples read before the damage. The caller knows how many samples the shard should hold and counts the
ones it never received.

The trade-off: a sample starts when the key changes or a member name repeats within a key, exactly as
in `sample_keys`; webdataset would reject a repeated name, here it makes a new sample that validation
then rejects and counts, so positions never drift between counting and reading.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from typing import Iterator

from webdataset.gopen import gopen

log = logging.getLogger(__name__)

BLOCK = 512

_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


class UnreadableShard(OSError):
    """A shard whose samples cannot be counted: the file or stream cannot be read (not archive damage)."""


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


def split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-cased suffix) of a member name as webdataset splits it: `d/K.img0.png` -> (`d/K`, `img0.png`)."""
    match = _NAME.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


class _Positions:
    """Numbers the samples of one shard as members go by: a new sample on a new key or a repeated suffix."""

    def __init__(self) -> None:
        self.pos, self.key, self.suffixes = -1, None, set()

    def feed(self, key: str, suffix: str) -> bool:
        """Advance over one member; True when it starts a new sample (then `pos` is that sample's number)."""
        new = key != self.key or suffix in self.suffixes
        if new:
            self.pos, self.key, self.suffixes = self.pos + 1, key, set()
        self.suffixes.add(suffix)
        return new


def _sample_members(tf: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(info, key, suffix) of the members that belong to samples (regular files, not `__*`, with a suffix)."""
    for info in tf:
        if info.isreg() and not info.name.startswith("__"):
            split = split_name(info.name)
            if split is not None:
                yield info, *split
        tf.members = []  # do not keep every TarInfo in memory


def sample_keys(url: str) -> list[str]:
    """The key of every sample in one shard, in order, from member headers. A local file is read by seeking
    past member data.

    Where the archive itself is damaged (a corrupt header, bytes cut short) the list stops there, as
    `tarfile` does: those are the samples `shard_samples` can at least start to read, and the reader counts
    the rest when it gets there. A shard that cannot be read at all (no such file, a failing `pipe:`
    command or connection) raises `UnreadableShard`: a short count would give this rank a different plan.
    """
    positions = _Positions()
    keys: list[str] = []
    try:
        if os.path.isfile(url):
            with tarfile.open(url, mode="r:*") as tf:
                for _, key, suffix in _sample_members(tf):
                    if positions.feed(key, suffix):
                        keys.append(key)
        else:
            stream = gopen(url)
            try:
                with tarfile.open(fileobj=stream, mode="r|*") as tf:
                    for _, key, suffix in _sample_members(tf):
                        if positions.feed(key, suffix):
                            keys.append(key)
            finally:
                stream.close()  # a `pipe:` command that failed raises here
    except (tarfile.TarError, EOFError) as err:  # damage inside the archive: keep what was counted
        log.warning("shard %s is damaged after %d sample(s) (%s); the reader counts what it loses", url, len(keys), err)
    except OSError as err:
        raise UnreadableShard(f"shard {url} cannot be read to count its samples: {err}") from None
    return keys


def shard_samples(url: str, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Raw samples at positions [start, stop) of one shard: {"__key__", "__url__", "__pos__", suffix: bytes}.

    Members of earlier samples are passed over without copying their data. Raises `DamagedTar` (or the
    `tarfile`/OS error) after yielding whatever was read before the damage, the damaged sample included.
    """
    stream = gopen(url)
    reader = TailReader(stream)
    positions = _Positions()
    current: dict | None = None
    try:
        tf = tarfile.open(fileobj=reader, mode="r|*")
        offset = 0
        for info, key, suffix in _sample_members(tf):
            offset = info.offset_data + -(-info.size // BLOCK) * BLOCK
            if positions.feed(key, suffix):
                if current is not None:
                    yield current
                    current = None
                if stop is not None and positions.pos >= stop:
                    return
            if positions.pos < start:
                continue
            try:
                data = tf.extractfile(info).read()
            except tarfile.ReadError as err:  # the bytes end inside this member
                raise DamagedTar("truncated_tar", url, reader.pos) from err
            if current is None:
                current = {"__key__": key, "__url__": url, "__pos__": positions.pos}
            current[suffix] = data
            if len(data) != info.size:
                raise DamagedTar("truncated_tar", url, info.offset_data + len(data))
        # tarfile stopped: at the end-of-archive zero block (fine), a bad header, or the end of the bytes
        if current is not None:
            yield current
            current = None
        end = reader.block_at(offset)
        if end is None:
            raise DamagedTar("truncated_tar", url, offset)
        if end.strip(b"\0"):
            raise DamagedTar("corrupt_tar", url, offset)
    except (tarfile.TarError, OSError, EOFError):
        if current is not None:
            yield current  # the sample the damage cut: validation counts what it lacks
        raise
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
