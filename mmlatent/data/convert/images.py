"""Image loading and re-encoding for the converters: any source image in, bounded, deterministic bytes out.

Sources hand over images in three shapes: a Hugging Face `Image` struct (`{"bytes", "path"}`, what a
parquet column holds when read with `decode(False)`), raw bytes, or a file path relative to the dataset
root (Monet-SFT). `load_image_bytes` turns each into bytes; `reencode` decodes them fully (so a truncated
or corrupt image is caught here and counted, not at training time), makes them upright 8-bit RGB by the
shard reader's own rule (`mmlatent.data.image_decode`: EXIF orientation, bit depths scaled, transparency
on white), shrinks the longest side to `max_size`, and encodes with `shard_writer.encode_image` (fixed
encoder settings, so the bytes are a pure function of the input).

The trade-off: an image already in the target format, small enough, in opaque 8-bit RGB or greyscale and
with no EXIF rotation is written with its original bytes (the reader decodes them to the same pixels). That saves the encode (the dominant cost for PNG) and
avoids a second lossy JPEG generation, at the price of keeping whatever metadata chunks the source had.
Large JPEGs are decoded at a reduced scale (`Image.draft`), which is several times faster than a full
decode followed by a downscale and just as deterministic. Images over PIL's decompression-bomb limit
(about 89 M pixels) are skipped as `bad_image` rather than risking a worker's memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from mmlatent.data.image_decode import ImageError, is_rotated, load_image, open_image, to_rgb
from mmlatent.data.sample import SampleError
from mmlatent.data.shard_writer import encode_image

ImageFormat = Literal["png", "jpeg", "webp"]

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
"""Our format name -> the name PIL reports in `Image.format`."""


@dataclass(frozen=True)
class ImageOptions:
    """How converted images are stored."""

    format: ImageFormat = "jpeg"
    """Encoding of every written image (JPEG at quality 95, or lossless PNG / WebP)."""
    max_size: int = 1024
    """Longest side in pixels; larger images are shrunk (aspect ratio kept). 0 keeps every size."""

    def __post_init__(self) -> None:
        if self.format not in _PIL_FORMAT:
            raise ValueError(f"image_format must be one of {sorted(_PIL_FORMAT)}, got {self.format!r}")
        if self.max_size < 0:
            raise ValueError(f"max_image_size must be >= 0 (0 keeps every size), got {self.max_size}")


def load_image_bytes(value: object, root: str | os.PathLike | None, key: str, what: str) -> bytes:
    """The bytes of one source image: an HF Image struct, bytes, or a path (relative to `root`).

    Raises `SampleError` "missing_image" (no image at all), "missing_image_file" (a path that does not
    exist) or "image_outside_root" (a path that leaves `root`, e.g. `../…` or an absolute path elsewhere:
    a record may name only its own dataset's files). `what` names the image in messages (a column or a path).
    """
    if isinstance(value, dict):  # HF Image struct {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value)
        if root is not None:
            path = inside_root(path, Path(root), key, what)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise SampleError("missing_image_file", f"{what}: no file {path}", key, str(path)) from None
    raise SampleError("missing_image", f"{what}: no image (got {type(value).__name__})", key, what)


def inside_root(path: Path, root: Path, key: str, what: str) -> Path:
    """`path` (relative to `root`, or absolute) as a path inside `root`; raises SampleError "image_outside_root".

    The test is on the normalised path, not on symlink targets: a dataset folder may hold links into a cache
    (the Hub's snapshots link to its blob store), and the links are the dataset's own.
    """
    full = os.path.normpath(root / path)
    base = os.path.normpath(root)
    if os.path.commonpath([full, base]) != base:
        raise SampleError("image_outside_root", f"{what}: {full} is outside the image root {base}", key, str(path))
    return Path(full)


def reencode(data: bytes, options: ImageOptions, key: str, what: str) -> bytes:
    """Decode `data`, bound its size and encode it in `options.format`; raises SampleError "bad_image"."""
    try:
        img = open_image(data)
        limit, drafted = options.max_size, False
        if img.format == "JPEG" and limit and max(img.size) > 2 * limit:
            scale = limit / max(img.size)
            # decode at 1/2, 1/4 or 1/8 scale, never below the final size
            drafted = img.draft("RGB", (round(img.width * scale), round(img.height * scale))) is not None
        load_image(img)
    except ImageError as err:
        raise SampleError("bad_image", f"{what}: {err}", key, what) from None
    fits = not options.max_size or max(img.size) <= options.max_size
    if img.format == _PIL_FORMAT[options.format] and fits and _stored_as_is(img) and not drafted:
        return data  # already what we would write: keep the original bytes
    img = to_rgb(img)
    if not fits:
        w, h = img.size
        scale = options.max_size / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    return encode_image(img, options.format)


def _stored_as_is(img: Image.Image) -> bool:
    """Whether the reader decodes `img`'s bytes to exactly what `to_rgb` would store: 8-bit RGB or greyscale,
    opaque, upright."""
    return img.mode in ("RGB", "L") and "transparency" not in img.info and not is_rotated(img)


def convert_image(value: object, root: str | os.PathLike | None, options: ImageOptions, key: str, what: str) -> bytes:
    """`load_image_bytes` then `reencode`: the bytes to store for one source image."""
    return reencode(load_image_bytes(value, root, key, what), options, key, what)
