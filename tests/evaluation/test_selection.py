"""`selection_on_path`: the lenient (any cell of the path) and strict (the block's own hop's cell) scores
against a count by hand."""

from __future__ import annotations

import pytest
import torch

from mmlatent.evaluation.selection import selection_on_path


def one_hot(token: int, m: int = 9) -> torch.Tensor:
    rel = torch.full((m,), 0.01)
    rel[token] = 0.9
    return rel


def test_strict_and_lenient_scores_equal_a_hand_count():
    # 3x3 tokens on a 3x3 grid: token t is cell (t // 3, t % 3)
    walk = [(0, 0), (0, 1), (1, 1)]
    thoughts = [
        (0, one_hot(0)),  # block 0 on cell (0, 0), its own: on the path, on its cell
        (0, one_hot(1)),  # block 0 on (0, 1): on the path (block 1's cell), not its own
        (1, one_hot(1)),  # block 1 on (0, 1): both
        (2, one_hot(8)),  # block 2 on (2, 2): neither
        (3, one_hot(4)),  # a block past the walk's end on (1, 1): on the path, not its own (it has none)
        (2, None),  # no relevance map (sketch mode): not counted
    ]
    single = [(0, one_hot(8))]  # a walk of one cell, (2, 2): both
    out = selection_on_path([(thoughts, walk), (single, [(2, 2)])], token_grid=(3, 3), cells=3)
    assert out["thoughts"] == 6
    assert out["selection_on_path"] == pytest.approx(5 / 6)
    assert out["selection_on_own_cell"] == pytest.approx(3 / 6)
    assert out["chance"] == pytest.approx((5 * 3 / 9 + 1 * 1 / 9) / 6)
    assert out["chance_own_cell"] == pytest.approx(1 / 9)


def test_no_thoughts_gives_no_scores():
    out = selection_on_path([([], [(0, 0)])], token_grid=(3, 3), cells=3)
    assert out == {"selection_on_path": None, "selection_on_own_cell": None, "thoughts": 0, "chance": None,
                   "chance_own_cell": None}
