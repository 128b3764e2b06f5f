"""The converters' shared pieces: image loading and re-encoding (size bound, alpha, EXIF, pass-through,
errors as skip reasons), the incremental JSON reader, glob matching and source resolution."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from mmlatent.data.convert.images import ImageOptions, convert_image, load_image_bytes, reencode
from mmlatent.data.convert.input_files import glob_match, json_records, resolve_source
from mmlatent.data.sample import SampleError


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


def test_an_image_already_in_shape_keeps_its_bytes_and_others_are_bounded():
    small_png = encoded(noise(30, 20), "PNG")
    assert reencode(small_png, ImageOptions("png", 64), "k", "x") == small_png
    shrunk = Image.open(io.BytesIO(reencode(small_png, ImageOptions("png", 15), "k", "x")))
    assert shrunk.size == (15, 10) and shrunk.format == "PNG"
    as_jpeg = Image.open(io.BytesIO(reencode(small_png, ImageOptions("jpeg", 0), "k", "x")))
    assert as_jpeg.size == (30, 20) and as_jpeg.format == "JPEG"
    big_jpeg = encoded(noise(800, 400), "JPEG", quality=90)  # decoded at reduced scale, then resized exactly
    out = Image.open(io.BytesIO(reencode(big_jpeg, ImageOptions("jpeg", 100), "k", "x")))
    assert out.size == (100, 50)
    assert reencode(big_jpeg, ImageOptions("jpeg", 100), "k", "x") == reencode(big_jpeg, ImageOptions("jpeg", 100),
                                                                                 "k", "x")


def test_transparency_is_flattened_on_white_and_exif_rotation_applied():
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = Image.open(io.BytesIO(reencode(encoded(rgba, "PNG"), ImageOptions("png", 0), "k", "x")))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    rotated = encoded(noise(40, 20), "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(reencode(rotated, ImageOptions("jpeg", 0), "k", "x"))).size == (20, 40)


def test_bad_and_missing_images_raise_skip_reasons(tmp_path):
    with pytest.raises(SampleError) as err:
        reencode(b"\x89PNG\r\n\x1a\n broken", ImageOptions(), "k", "col")
    assert err.value.reason == "bad_image" and "col" in err.value.detail
    with pytest.raises(SampleError) as err:
        load_image_bytes("images/none.png", tmp_path, "k", "images/none.png")
    assert err.value.reason == "missing_image_file"
    with pytest.raises(SampleError) as err:
        load_image_bytes(None, tmp_path, "k", "image_2")
    assert err.value.reason == "missing_image"
    (tmp_path / "a.png").write_bytes(encoded(noise(4, 4), "PNG"))
    assert load_image_bytes({"bytes": None, "path": "a.png"}, tmp_path, "k", "x") == (tmp_path / "a.png").read_bytes()
    assert convert_image({"bytes": encoded(noise(4, 4), "PNG"), "path": None}, None, ImageOptions("png", 2), "k", "x")
    with pytest.raises(ValueError, match="image_format"):
        ImageOptions("gif", 10)


@pytest.mark.parametrize("chunk", [1, 5, 64, 1 << 20])
def test_json_records_streams_arrays_and_lines_across_chunk_boundaries(tmp_path, chunk):
    records = [{"i": i, "text": "é" * (i % 7), "n": [1.5, None, True]} for i in range(40)] + [123456, "tail"]
    (tmp_path / "a.json").write_text("\ufeff" + json.dumps(records, indent=2), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    assert list(json_records(tmp_path / "a.json", chunk)) == records
    assert list(json_records(tmp_path / "b.jsonl", chunk)) == records
    (tmp_path / "cut.json").write_text('[{"a": 1}, {"b": ')
    with pytest.raises(ValueError, match="invalid JSON"):
        list(json_records(tmp_path / "cut.json", chunk))


def test_glob_match_and_resolve_source(tmp_path):
    assert glob_match("Visual_CoT/train.json", "*/train.json") and not glob_match("a/b/train.json", "*/train.json")
    assert glob_match("dev-0.parquet", "**/dev-*.parquet") and glob_match("A/B/dev-0.parquet", "**/dev-*.parquet")
    assert not glob_match("A/validation-0.parquet", "**/dev-*.parquet")
    for rel in ("b/dev-1.parquet", "a/dev-0.parquet", "a/test-0.parquet", ".cache/dev-9.parquet"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * 3)
    info = resolve_source(str(tmp_path), None, ["**/dev-*.parquet"])
    assert info.files == ["a/dev-0.parquet", "b/dev-1.parquet"] and info.sizes == [3, 3] and info.kind == "local"
    assert info.url("a/dev-0.parquet") == str(tmp_path / "a" / "dev-0.parquet")
    single = resolve_source(str(tmp_path / "a" / "test-0.parquet"), None, ["**/dev-*.parquet"])
    assert single.files == ["test-0.parquet"]  # a file given directly is read whatever the patterns
    with pytest.raises(FileNotFoundError, match="no file matches"):
        resolve_source(str(tmp_path), None, ["**/train-*.parquet"])
