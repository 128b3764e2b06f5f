"""How fast does `mmlatent data convert` turn Zebra-CoT-shaped parquet into shards?

Writes a Zebra-CoT-shaped parquet file (HF Image struct columns `problem_image_1`, `reasoning_image_1..K`,
inline `<image_start>[…]<image_end>` references, PNG diagrams of `--image-px` pixels), then converts it
twice in one run, the same work two ways:
- `samples_per_s`: with `--workers` converter processes (default 2: image decode, resize, JPEG encode);
- `samples_per_s_1_process`: everything in the main process;
- `speedup`: the ratio, and `identical_shards`: whether both wrote the same bytes (they must);
- `free_cores_probe`: how many cores `--workers` processes actually got during the run (a CPU-bound probe),
  the ceiling of `speedup` on a shared machine.
Times include starting the worker pool. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def diagram(seed: int, px: int) -> bytes:
    """A PNG that looks like a sketch: a soft background, filled shapes and lines (compresses like one)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, px, dtype=np.float32)
    base = (200 + 40 * np.outer(ramp, ramp))[..., None] * np.ones(3, dtype=np.float32)  # (px, px, 3)
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, px - 40, 2)
        w, h = rng.integers(20, px // 3, 2)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.rectangle([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=colour, outline=(0, 0, 0), width=3)
        draw.line([tuple(int(v) for v in rng.integers(0, px, 2)), tuple(int(v) for v in rng.integers(0, px, 2))],
                  fill=(0, 0, 0), width=4)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def write_parquet(path: Path, samples: int, reasoning_images: int, px: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image as HFImage, Value

    pool = [diagram(seed, px) for seed in range(16)]
    reasoning = [f"reasoning_image_{k}" for k in range(1, reasoning_images + 1)]
    columns = ["problem_image_1", *reasoning]
    features = Features({"Question": Value("string"), "Text Reasoning Trace": Value("string"),
                         "Final Answer": Value("string"), **{c: HFImage() for c in columns}})
    trace = " ".join(f"THOUGHT {k}: draw step {k}. <image_start>[reasoning_image_{k}]<image_end>"
                     for k in range(1, reasoning_images + 1))
    data = {
        "Question": [f"<image_start>[problem_image_1]<image_end> Puzzle {i}: which path is shortest?"
                     for i in range(samples)],
        "Text Reasoning Trace": [f"{trace} THOUGHT {reasoning_images + 1}: compare." for _ in range(samples)],
        "Final Answer": ["B"] * samples,
        **{c: [{"bytes": pool[(i * len(columns) + j) % len(pool)], "path": None} for i in range(samples)]
           for j, c in enumerate(columns)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(data, schema=features.arrow_schema), path, row_group_size=64)


def _spin(_: int) -> float:
    t0 = time.perf_counter()
    total = 0
    for i in range(3_000_000):
        total += i
    return time.perf_counter() - t0


def free_cores(workers: int) -> float:
    """How many cores `workers` processes really get now (a CPU-bound probe; the machine may be shared)."""
    import multiprocessing

    one = _spin(0)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        t0 = time.perf_counter()
        pool.map(_spin, range(workers))
        many = time.perf_counter() - t0
    return workers * one / many


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.tar")):
        h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=192, help="rows of the parquet file")
    ap.add_argument("--reasoning-images", type=int, default=2,
                    help="reasoning images per row (plus one problem image)")
    ap.add_argument("--image-px", type=int, default=1024, help="side of the source PNG images")
    ap.add_argument("--max-image-size", type=int, default=768, help="longest side written (images are shrunk)")
    ap.add_argument("--image-format", default="jpeg", choices=["jpeg", "png", "webp"])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from mmlatent.data.convert import ConvertOptions, ZebraCoTConfig, convert

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "zebra"
        write_parquet(src / "Category - Bench" / "train-00000-of-00001.parquet", args.samples, args.reasoning_images,
                      args.image_px)
        cfg = ZebraCoTConfig(source=str(src))

        def run(workers: int, out: str) -> float:
            opts = ConvertOptions(image_format=args.image_format, max_image_size=args.max_image_size,
                                  samples_per_shard=64, workers=workers, progress=False)
            t0 = time.perf_counter()
            manifest = convert("zebra_cot", cfg, str(Path(tmp) / out), opts)
            seconds = time.perf_counter() - t0
            assert manifest["written"] == args.samples, manifest["skipped"]
            return seconds

        run(0, "warmup")  # imports and `datasets` set-up are not throughput
        serial = run(0, "serial")
        parallel = run(args.workers, "parallel")
        cores = free_cores(max(1, args.workers))
        identical = digest(Path(tmp) / "serial") == digest(Path(tmp) / "parallel")
        out_bytes = sum(p.stat().st_size for p in (Path(tmp) / "parallel").glob("*.tar"))

    result = {
        "samples_per_s": round(args.samples / parallel, 1),
        "samples_per_s_1_process": round(args.samples / serial, 1),
        "speedup": round(serial / parallel, 2),
        "identical_shards": identical,
        "workers": args.workers,
        "samples": args.samples,
        "images_per_sample": 1 + args.reasoning_images,
        "image_px": args.image_px,
        "max_image_size": args.max_image_size,
        "image_format": args.image_format,
        "kb_per_sample": round(out_bytes / args.samples / 1024, 1),
        "cpu_count": os.cpu_count(),
        "free_cores_probe": round(cores, 2),  # speedup cannot exceed this
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
