"""Write samples to WebDataset `.tar` shards: validated, byte-deterministic, and atomic per shard.

Every sample passes `validate_sample` before it is written; a bad one is skipped, counted by reason and
logged, never written. The same samples give the same bytes (fixed tar header fields, sorted JSON keys,
fixed image encoder settings), so a dataset can be checked by hash and regenerated exactly. Each shard is
written to a hidden temporary name and renamed when it closes (`mmlatent.atomic`), so an interrupted run
never leaves a complete-looking shard behind.

The trade-off: shards are cut by sample count only (not by bytes), which keeps shard boundaries a pure
function of the sample stream and makes resumption and per-rank splitting predictable; shards of samples
with very different image sizes then differ in size.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mmlatent.atomic import AtomicFile
from mmlatent.data.sample import IMAGE_EXTENSIONS, SampleError, image_refs_in_order, validate_sample

log = logging.getLogger(__name__)

TAR_MTIME = 946684800
"""Fixed modification time of every tar member (2000-01-01T00:00:00Z) so shard bytes do not depend on
when they were written."""

TAR_OWNER = "mmlatent"
"""Fixed user and group name of every tar member."""

ImageFormat = Literal["png", "jpeg", "webp"]


@dataclass
class RawSample:
    """One sample before encoding: its JSON and its images by ref."""

    key: str
    """Unique sample key: no dots, no slashes (webdataset splits member names at the first dot)."""
    meta: dict
    """The `KEY.json` content (see `mmlatent.data.sample`)."""
    images: dict[str, "Image.Image | bytes"] = field(default_factory=dict)
    """ref -> image. A PIL image is encoded with the writer's `image_format`; bytes are written as is."""
    image_ext: str = "png"
    """Extension of the members written from `bytes` images (one of `IMAGE_EXTENSIONS`)."""


@dataclass
class WriteStats:
    """What `write_shards` did."""

    written: int = 0
    """Samples written."""
    skipped: Counter = field(default_factory=Counter)
    """Samples skipped, by `SampleError.reason`."""
    shards: list[str] = field(default_factory=list)
    """Paths of the shards written, in order."""


def encode_image(image: Image.Image, image_format: ImageFormat) -> bytes:
    """Encode a PIL image deterministically (no metadata, fixed encoder settings)."""
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", optimize=False, compress_level=6)
    elif image_format == "jpeg":
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.save(buf, format="JPEG", quality=95, subsampling=0, optimize=False)
    elif image_format == "webp":
        image.save(buf, format="WEBP", lossless=True, quality=80, method=4, exact=True)
    else:
        raise ValueError(f"image_format must be one of png, jpeg, webp, got {image_format!r}")
    return buf.getvalue()


def encode_sample(
    sample: RawSample, image_format: ImageFormat = "png", seen_keys: set[str] | None = None
) -> dict[str, bytes | str]:
    """Validate `sample` and return its tar members {"__key__", "json", "<ref>.<ext>", ...}.

    Only referenced images are written. Raises `SampleError` for a bad sample ("bad_key", "duplicate_key",
    "bad_image" for an image of an unsupported type or extension, and the codes of `validate_sample`).
    """
    key = sample.key
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise SampleError("bad_key", f"key {key!r} must be a non-empty string without '.' or '/'", str(key))
    if seen_keys is not None and key in seen_keys:
        raise SampleError("duplicate_key", "key already written in this run", key)
    validate_sample(sample.meta, sample.images.keys(), key=key)
    members: dict[str, bytes | str] = {"__key__": key}
    for _, ref in image_refs_in_order(sample.meta):
        image = sample.images[ref]
        if isinstance(image, (bytes, bytearray)):
            ext = sample.image_ext.lower()
            if ext not in IMAGE_EXTENSIONS:
                raise SampleError("bad_image", f"image_ext {sample.image_ext!r} not in {IMAGE_EXTENSIONS}", key)
            members[f"{ref}.{ext}"] = bytes(image)
        elif isinstance(image, Image.Image):
            members[f"{ref}.{image_format}"] = encode_image(image, image_format)
        else:
            raise SampleError("bad_image", f"image '{ref}' is {type(image).__name__}, expected PIL or bytes", key)
    members["json"] = json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return members


class _AtomicShard:
    """One open shard: a TarWriter on a temporary sibling of `path`, moved to `path` on `commit`, removed on
    `abort` (`mmlatent.atomic.AtomicFile`)."""

    def __init__(self, path: Path):
        self.path = path
        self.target = AtomicFile(path)
        self.writer = wds.TarWriter(
            self.target.file, encoder=False, mtime=TAR_MTIME, user=TAR_OWNER, group=TAR_OWNER, mode=0o444
        )
        self.count = 0

    def write(self, members: dict) -> None:
        self.writer.write(members)
        self.count += 1

    def commit(self) -> None:
        self.writer.close()  # writes the tar end blocks; the file object stays ours
        self.target.commit()

    def abort(self) -> None:
        try:
            self.writer.close()  # flush tarfile's buffers now, not in a destructor on a closed file
        finally:
            self.target.abort()


def write_shards(
    samples: Iterable[RawSample],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    image_format: ImageFormat = "png",
    progress: bool = True,
    desc: str = "writing",
    total: int | None = None,
) -> WriteStats:
    """Validate and write `samples` to `out_dir/{prefix}-000000.tar`, `…-000001.tar`, ….

    Shards hold `samples_per_shard` good samples each (the last one fewer); no shard is written when no
    sample is good. `total` only sizes the progress bar. Existing shards of the same names are replaced.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if image_format not in ("png", "jpeg", "webp"):
        raise ValueError(f"image_format must be one of png, jpeg, webp, got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = WriteStats()
    seen_keys: set[str] = set()
    shard: _AtomicShard | None = None
    bar = tqdm(samples, total=total, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        for sample in bar:
            try:
                members = encode_sample(sample, image_format, seen_keys)
            except SampleError as err:
                stats.skipped[err.reason] += 1
                log.warning("skipping sample %s: %s (%s)", err.key, err.reason, err.detail)
                continue
            seen_keys.add(sample.key)
            if shard is None:
                shard = _AtomicShard(out / f"{prefix}-{len(stats.shards):06d}.tar")
            shard.write(members)
            stats.written += 1
            if shard.count >= samples_per_shard:
                shard.commit()
                stats.shards.append(str(shard.path))
                shard = None
            if progress:
                bar.set_postfix(skipped=sum(stats.skipped.values()), refresh=False)
        if shard is not None:
            shard.commit()
            stats.shards.append(str(shard.path))
            shard = None
    finally:
        bar.close()
        if shard is not None:  # interrupted: leave no partial shard
            shard.abort()
    return stats
