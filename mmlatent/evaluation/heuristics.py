"""Reference rows for the synthetic grid questions: what guessing and the obvious shortcut score.

A model's accuracy means little without them: with four colours on a 3×3 grid, always naming the grid's most
common colour is right far more often than a guess. `majority_colour` reads each cell's colour off the
question image (the centre pixel, nearest palette colour) and scores that answer, ties between colours broken
uniformly at random (its expected score, so the row does not depend on a draw). `chance` is one over the
number of options.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from PIL import Image

from mmlatent.benchmark_prompts import choice_letters
from mmlatent.data.synthetic import COLOURS


def grid_colours(image: Image.Image, grid: int, palette: Iterable[str]) -> list[str]:
    """Row-major colour names of a `grid × grid` image's cells: the palette colour nearest each centre pixel."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    names = list(palette)
    out = []
    for r in range(grid):
        for c in range(grid):
            px = rgb.getpixel((int((c + 0.5) * w / grid), int((r + 0.5) * h / grid)))
            out.append(min(names, key=lambda n: sum((a - b) ** 2 for a, b in zip(px, COLOURS[n]))))
    return out


def majority_colour(colours: list[str], choices: list[str], gold: str) -> float:
    """Expected correctness of answering the most common of `colours` that is an option (ties at random)."""
    counts = Counter(c for c in colours if c in choices)
    if not counts:
        return 1 / len(choices)
    top = max(counts.values())
    tied = [c for c, n in counts.items() if n == top]
    letters = choice_letters(len(choices))
    return sum(letters[choices.index(c)] == gold for c in tied) / len(tied)


def chance(choices: list[str]) -> float:
    """A uniform guess among the options."""
    return 1 / len(choices)
