"""Image bytes to an upright 8-bit RGB picture: one decoding rule for the shard reader and the converters.

`Image.convert("RGB")` is not faithful for every mode Pillow opens: 16- and 32-bit greyscale (`I;16`, `I`)
are clipped at 255, so a 16-bit gradient turns almost white, and transparency is dropped, so the colour
under a transparent pixel shows (often black). `to_rgb` scales high bit depths down to 8 bits and
composites any alpha (an alpha band, a palette's or a greyscale's transparent colour) onto white, the
background diagrams are drawn for; every other mode (1-bit, CMYK, YCbCr, CIELAB) goes through Pillow's
own conversion. `open_image` refuses decompression bombs (over Pillow's pixel limit, the warning level
included) before anything is decoded, and every failure is an `ImageError`, which callers skip and count.

The trade-off: white is a guess for what lies behind a transparent pixel; it is right for diagrams and
scans, the common case in reasoning corpora, and it is the same guess at conversion and at training time.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
                  TypeError, KeyError, Image.DecompressionBombError, Image.DecompressionBombWarning)
"""What Pillow raises on damaged, unsupported or oversized input (plugins differ)."""


class ImageError(ValueError):
    """Image bytes that cannot be decoded (damaged, an unsupported mode) or are too large to decode safely."""


def open_image(data: bytes) -> Image.Image:
    """Open `data` lazily (size and mode known, pixels not decoded); a decompression bomb is an `ImageError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"decompression bomb: {err}") from None
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot decode ({err})") from None


def load_image(img: Image.Image) -> Image.Image:
    """Decode an opened image's pixels now, so that a truncated file fails here."""
    try:
        img.load()
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot decode ({err})") from None
    if img.width < 1 or img.height < 1:
        raise ImageError(f"empty image {img.size}")
    return img


def is_rotated(img: Image.Image) -> bool:
    """Whether the image's EXIF orientation asks for a rotation or flip."""
    return img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)


def _eight_bit(img: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer greyscale image as 8-bit `L`, full range to full range (`I` as 16-bit)."""
    a = np.asarray(img).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded image as upright 8-bit RGB: EXIF orientation applied, high bit depths scaled, alpha
    composited onto white."""
    if is_rotated(img):
        img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT:
        img = _eight_bit(img)
    elif img.mode == "F":  # float intensities in [0, 1]
        img = Image.fromarray((np.asarray(img).clip(0.0, 1.0) * 255 + 0.5).astype(np.uint8), mode="L")
    elif img.mode == "La":  # premultiplied: Pillow reaches RGBA from it through LA
        img = img.convert("LA")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")  # a palette's or a colour key's transparent colour
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Image bytes as upright 8-bit RGB (`open_image`, `load_image`, `to_rgb`); raises `ImageError`."""
    img = load_image(open_image(data))
    try:
        return to_rgb(img)
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot convert mode {img.mode} to RGB ({err})") from None
