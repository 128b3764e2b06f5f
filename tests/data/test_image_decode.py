"""Every image mode Pillow opens decodes faithfully, by one rule in the shard reader and in the converters, and a
decompression bomb is skipped and counted by both."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mmlatent.data.convert.images import ImageOptions, reencode
from mmlatent.data.pipeline import decode_samples
from mmlatent.data.sample import SampleError
from mmlatent.data.skips import SkipCounter

META = {"id": "x", "source": "test", "answer": "A", "messages": [
    {"role": "user", "content": [{"type": "image", "ref": "img0"}, {"type": "text", "text": "Q?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]}


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def read(data: bytes, name: str = "img0.png") -> tuple[Image.Image | None, dict]:
    """What the shard reader makes of one sample holding `data` as its image: (RGB image or None, skip counts)."""
    counter = SkipCounter()
    out = list(decode_samples([{"__key__": "k", "__url__": "u", "json": json.dumps(META).encode(), name: data}], counter))
    return (out[0]["images"]["img0"] if out else None), counter.drain()


def converted(data: bytes) -> Image.Image:
    """What the converters store for `data` (lossless PNG, any size), decoded."""
    return Image.open(io.BytesIO(reencode(data, ImageOptions(format="png", max_size=0), "k", "img"))).convert("RGB")


def gradient16() -> Image.Image:
    return Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16))  # mode I;16


def two_levels16() -> Image.Image:
    a = np.zeros((8, 8), np.uint16)
    a[:, 4:] = 128 * 257  # 16-bit mid grey on the right
    return Image.fromarray(a)  # mode I;16


def palette_with_transparency() -> Image.Image:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    img.paste(0, (0, 0, 4, 8))  # left half: index 0, the transparent one
    img.info["transparency"] = 0
    return img


def with_alpha(mode: str) -> Image.Image:
    colour = (0, 0, 0, 0) if mode == "RGBA" else (0, 0)  # transparent black on the left
    img = Image.new(mode, (8, 8), colour)
    img.paste((40, 120, 200, 255) if mode == "RGBA" else (90, 255), (4, 0, 8, 8))
    return img


CASES = {
    # name: (bytes, the RGB of the pixels at (0, 0) and (7, 0) a faithful decode gives)
    "16-bit grey": (lambda: encoded(two_levels16()), [(0, 0, 0), (128, 128, 128)]),
    "palette with a transparent colour": (lambda: encoded(palette_with_transparency()), [(255, 255, 255), (200, 30, 30)]),
    "RGBA": (lambda: encoded(with_alpha("RGBA")), [(255, 255, 255), (40, 120, 200)]),
    "LA": (lambda: encoded(with_alpha("LA")), [(255, 255, 255), (90, 90, 90)]),
    "1-bit": (lambda: encoded(Image.new("1", (8, 8), 1)), [(255, 255, 255), (255, 255, 255)]),
    "CMYK JPEG": (lambda: encoded(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", quality=100), [(255, 255, 255)] * 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mode_decodes_faithfully_and_alike_in_reader_and_converter(case):
    make, expected = CASES[case]
    data = make()
    img, skipped = read(data, "img0.jpg" if "JPEG" in case else "img0.png")
    assert skipped == {} and img.mode == "RGB"
    stored = converted(data)
    assert np.array_equal(np.asarray(img), np.asarray(stored))  # one rule: reading equals converting
    got = [img.getpixel((0, 0)), img.getpixel((7, 0))]
    assert all(np.abs(np.subtract(g, e)).max() <= 2 for g, e in zip(got, expected)), got


def test_a_16_bit_gradient_keeps_its_grey_levels():
    img, _ = read(encoded(gradient16()))
    a = np.asarray(img)[..., 0].astype(float)
    assert abs(a.mean() - 127.5) < 1.0 and (a == 255).mean() < 0.01  # was 99.6% white
    assert len(np.unique(a)) == 256


def bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side × side pixels (about 50 kB): over Pillow's decompression-bomb limit."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = zlib.compress(bytes(side * (1 + side // 8)), 6)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_skipped_and_counted_by_reader_and_converter():
    img, skipped = read(bomb_png())
    assert img is None and skipped == {"bad_image": 1}
    with pytest.raises(SampleError, match="decompression bomb"):
        reencode(bomb_png(), ImageOptions(), "k", "img")
