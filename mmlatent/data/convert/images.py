"""Image loading and re-encoding for the converters: any source image in, bounded, deterministic bytes out.

Sources hand over images in three shapes: a Hugging Face `Image` struct (`{"bytes", "path"}`, what a
parquet column holds when read with `decode(False)`), raw bytes, or a file path relative to the dataset
root (Monet-SFT). `load_image_bytes` turns each into bytes; `reencode` decodes them fully (so a truncated
or corrupt image is caught here and counted, not at training time), applies the EXIF orientation, flattens
transparency onto white (diagrams with an alpha channel would otherwise turn black), shrinks the longest
side to `max_size`, and encodes with `shard_writer.encode_image` (fixed encoder settings, so the bytes are
a pure function of the input).

The trade-off: an image already in the target format, small enough, in RGB or greyscale and with no
EXIF rotation is written with its original bytes. That saves the encode (the dominant cost for PNG) and
avoids a second lossy JPEG generation, at the price of keeping whatever metadata chunks the source had.
Large JPEGs are decoded at a reduced scale (`Image.draft`), which is several times faster than a full
decode followed by a downscale and just as deterministic. Images over PIL's decompression-bomb limit
(about 89 M pixels) are skipped as `bad_image` rather than risking a worker's memory.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from mmlatent.data.sample import SampleError
from mmlatent.data.shard_writer import encode_image

ImageFormat = Literal["png", "jpeg", "webp"]

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
"""Our format name -> the name PIL reports in `Image.format`."""

_EXIF_ORIENTATION = 0x0112


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

    Raises `SampleError` "missing_image" (no image at all) or "missing_image_file" (a path that does
    not exist). `what` names the image in messages (a column or a path).
    """
    if isinstance(value, dict):  # HF Image struct {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value)
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise SampleError("missing_image_file", f"{what}: no file {path}", key, str(path)) from None
    raise SampleError("missing_image", f"{what}: no image (got {type(value).__name__})", key, what)


def reencode(data: bytes, options: ImageOptions, key: str, what: str) -> bytes:
    """Decode `data`, bound its size and encode it in `options.format`; raises SampleError "bad_image"."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            limit, drafted = options.max_size, False
            if img.format == "JPEG" and limit and max(img.size) > 2 * limit:
                scale = limit / max(img.size)
                # decode at 1/2, 1/4 or 1/8 scale, never below the final size
                drafted = img.draft("RGB", (round(img.width * scale), round(img.height * scale))) is not None
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise SampleError("bad_image", f"{what}: cannot decode ({err})", key, what) from None
    if img.width < 1 or img.height < 1:
        raise SampleError("bad_image", f"{what}: empty image {img.size}", key, what)
    rotated = img.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)
    fits = not options.max_size or max(img.size) <= options.max_size
    if img.format == _PIL_FORMAT[options.format] and fits and img.mode in ("RGB", "L") and not (rotated or drafted):
        return data  # already what we would write: keep the original bytes
    if rotated:
        img = ImageOps.exif_transpose(img)
    img = _to_rgb(img)
    if not fits:
        w, h = img.size
        scale = options.max_size / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    return encode_image(img, options.format)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def convert_image(value: object, root: str | os.PathLike | None, options: ImageOptions, key: str, what: str) -> bytes:
    """`load_image_bytes` then `reencode`: the bytes to store for one source image."""
    return reencode(load_image_bytes(value, root, key, what), options, key, what)
