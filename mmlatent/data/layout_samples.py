"""Shards of samples in the Monet-SFT layout with random pixels: real shapes, no content.

A converted Monet-SFT or Zebra-CoT sample is a system prompt, a question with one or more images, and a
reasoning turn that interleaves text, auxiliary images and `<observation>` spans before a boxed answer,
with images of any size up to the converter's `max_image_size` (1024 px in the recipes). The recipe tests
and the full-size rehearsal (`benchmarks/rehearsal.py`) train on exactly that layout at exactly those
sizes, without the corpus: what they measure (shapes, memory, time, whether a stage runs) does not depend
on what the pixels and words say. `LayoutConfig` sets the counts and sizes; the text is filler of a given
number of words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mmlatent.atomic import write_json
from mmlatent.data.shard_writer import RawSample, WriteStats, write_shards
from mmlatent.data.shards import MANIFEST

WORDS = "the region shows a small object next to the marked line so we look closer at it and compare".split()


@dataclass
class LayoutConfig:
    """How many images of which sizes, and how much text, each sample has."""

    question_images: list[tuple[int, int]] = field(default_factory=lambda: [(1024, 768), (640, 480)])
    """(width, height) of each question image."""
    aux_images: list[tuple[int, int]] = field(default_factory=lambda: [(1024, 1024), (512, 384)])
    """(width, height) of each auxiliary image in the reasoning (one reasoning step each)."""
    question_words: int = 24
    """Words of the question text."""
    step_words: int = 24
    """Words of reasoning text before each auxiliary image (plus one observation sentence after it)."""


def _image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def layout_sample(key: str, cfg: LayoutConfig, seed: int) -> RawSample:
    """One sample: question images and text, then per aux image a reasoning step, the image and an observation."""
    rng = np.random.default_rng(seed)
    images = {f"img{i}": _image(rng, s) for i, s in enumerate(cfg.question_images)}
    question = [{"type": "image", "ref": ref} for ref in images]
    question.append({"type": "text", "text": _words(rng, cfg.question_words) + "? Options: A. left B. right"})
    reasoning = []
    for i, size in enumerate(cfg.aux_images):
        images[f"aux{i}"] = _image(rng, size)
        reasoning += [
            {"type": "text", "text": _words(rng, cfg.step_words) + "\n"},
            {"type": "aux_image", "ref": f"aux{i}"},
            {"type": "text", "text": f"\n<observation>{_words(rng, 8)}.</observation> "},
        ]
    answer = "AB"[seed % 2]
    reasoning.append({"type": "text", "text": f"So the answer is \\boxed{{{answer}}}."})
    meta = {
        "id": key, "source": "layout", "answer": answer, "choices": ["left", "right"],
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": question},
            {"role": "assistant", "content": reasoning},
        ],
    }
    return RawSample(key=key, meta=meta, images=images)


def write_layout_shards(out: str | Path, n: int, cfg: LayoutConfig | None = None, seed: int = 0,
                        samples_per_shard: int = 4, name: str = "layout") -> WriteStats:
    """Write `n` layout samples (keys `{name}-00000000`, …; give each split its own `name`, as a teacher cache
    is keyed by sample key across splits) as shards into `out` (JPEG images, as converted), then the
    `manifest.json` that marks the set complete (the data module reads no partial set)."""
    cfg = cfg or LayoutConfig()
    samples = (layout_sample(f"{name}-{i:08d}", cfg, seed + i) for i in range(n))
    stats = write_shards(samples, out, samples_per_shard=samples_per_shard, image_format="jpeg", progress=False)
    write_json(Path(out) / MANIFEST, {"written": stats.written, "skipped": dict(sorted(stats.skipped.items())),
                                      "shards": [Path(s).relative_to(out).as_posix() for s in stats.shards]})
    return stats
