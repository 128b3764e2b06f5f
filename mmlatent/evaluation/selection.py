"""Where thoughts look: does each LQ-Former thought select the image region its step is about?

For a question whose reasoning visits known cells of a grid image in order (the synthetic task's `path`:
the start cell, then one per move), every thought of the generated answer has a relevance map over the
prompt's visual tokens and belongs to a numbered latent block. Two scores of the thoughts' most relevant
token:
- lenient, `selection_on_path`: the share of thoughts that look at any cell of the path (chance about
  |path| / cells);
- strict, `selection_on_own_cell`: the share of thoughts of block b that look at the path's b-th cell, the
  cell that block stands for (chance 1 / cells); thoughts of blocks past the end of the path count as misses.
Tokens map to cells by position in the token grid, so a grid of cells and a grid of tokens of different sizes
still line up (each token takes the cell under its centre).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import Tensor


def token_cell(token: int, token_grid: tuple[int, int], cells: int) -> tuple[int, int]:
    """The (row, col) of the `cells × cells` grid under visual token `token` of a row-major `token_grid`."""
    gh, gw = token_grid
    i, j = divmod(token, gw)
    return (2 * i + 1) * cells // (2 * gh), (2 * j + 1) * cells // (2 * gw)


@dataclass
class ThoughtHits:
    """Counts of one or many answers' thoughts."""

    on_path: int = 0
    """Thoughts whose top token lies on any cell of the path."""
    on_own_cell: int = 0
    """Thoughts of block b whose top token lies on the path's b-th cell."""
    thoughts: int = 0
    """Thoughts with a relevance map over the question image."""


def thoughts_on_path(
    thoughts: Iterable[tuple[int, Tensor | None]], path: Sequence[Sequence[int]], token_grid: tuple[int, int], cells: int
) -> ThoughtHits:
    """The counts for one answer: `thoughts` holds each thought's (block index, (M,) relevance map); the
    first image's `gh × gw` tokens are the question image's."""
    cells_on_path = [tuple(cell) for cell in path]
    hits = ThoughtHits()
    image_tokens = token_grid[0] * token_grid[1]
    for block, rel in thoughts:
        if rel is None or rel.numel() < image_tokens:
            continue
        cell = token_cell(int(rel[:image_tokens].argmax()), token_grid, cells)
        hits.thoughts += 1
        hits.on_path += cell in cells_on_path
        hits.on_own_cell += 0 <= block < len(cells_on_path) and cell == cells_on_path[block]
    return hits


def selection_on_path(
    answers: Iterable[tuple[Iterable[tuple[int, Tensor | None]], Sequence[Sequence[int]]]],
    token_grid: tuple[int, int], cells: int,
) -> dict[str, float | int | None]:
    """`{"selection_on_path", "selection_on_own_cell", "thoughts", "chance", "chance_own_cell"}` over
    (thoughts, path) pairs of many answers (see `thoughts_on_path`); `chance` is the share a uniformly random
    choice of cell would get on the path on average, `chance_own_cell` on a given cell."""
    total = ThoughtHits()
    chance_sum = 0.0
    for thoughts, path in answers:
        h = thoughts_on_path(thoughts, path, token_grid, cells)
        total.on_path += h.on_path
        total.on_own_cell += h.on_own_cell
        total.thoughts += h.thoughts
        chance_sum += h.thoughts * len({tuple(c) for c in path}) / (cells * cells)
    n = total.thoughts
    return {
        "selection_on_path": total.on_path / n if n else None,
        "selection_on_own_cell": total.on_own_cell / n if n else None,
        "thoughts": n,
        "chance": chance_sum / n if n else None,
        "chance_own_cell": 1 / (cells * cells) if n else None,
    }
