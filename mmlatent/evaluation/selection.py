"""Where thoughts look: does each LQ-Former thought select the image regions its question is about?

For a question whose reasoning visits known cells of a grid image (the synthetic task's `path`), every
thought of the generated answer has a relevance map over the prompt's visual tokens. `selection_on_path`
is the share of thoughts whose most relevant token lies on one of the path's cells; a model whose thoughts
look at random would score about |path| / cells. Tokens map to cells by position in the token grid, so a
grid of cells and a grid of tokens of different sizes still line up (each token takes the cell under its
centre).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import Tensor


def token_cell(token: int, token_grid: tuple[int, int], cells: int) -> tuple[int, int]:
    """The (row, col) of the `cells × cells` grid under visual token `token` of a row-major `token_grid`."""
    gh, gw = token_grid
    i, j = divmod(token, gw)
    return (2 * i + 1) * cells // (2 * gh), (2 * j + 1) * cells // (2 * gw)


def thoughts_on_path(
    relevance: Iterable[Tensor], path: Sequence[Sequence[int]], token_grid: tuple[int, int], cells: int
) -> tuple[int, int]:
    """(on path, thoughts) for one answer: `relevance` holds each thought's (M,) map; the first image's
    `gh × gw` tokens are the question image's."""
    on_path = {tuple(cell) for cell in path}
    n = hits = 0
    image_tokens = token_grid[0] * token_grid[1]
    for rel in relevance:
        if rel is None or rel.numel() < image_tokens:
            continue
        n += 1
        hits += token_cell(int(rel[:image_tokens].argmax()), token_grid, cells) in on_path
    return hits, n


def selection_on_path(
    answers: Iterable[tuple[Iterable[Tensor], Sequence[Sequence[int]]]], token_grid: tuple[int, int], cells: int
) -> dict[str, float | int | None]:
    """`{"selection_on_path", "thoughts", "chance"}` over (relevance maps, path) pairs of many answers;
    `chance` is the share a uniformly random choice of cell would get on average."""
    hits = n = 0
    chance_sum = 0.0
    for relevance, path in answers:
        h, k = thoughts_on_path(relevance, path, token_grid, cells)
        hits, n = hits + h, n + k
        chance_sum += k * len({tuple(c) for c in path}) / (cells * cells)
    return {
        "selection_on_path": hits / n if n else None,
        "thoughts": n,
        "chance": chance_sum / n if n else None,
    }
