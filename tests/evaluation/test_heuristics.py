"""The reference rows: the majority-colour heuristic reads a rendered grid's colours and scores ties fairly."""

from __future__ import annotations

import pytest

from mmlatent.data.synthetic import SynthConfig, TaskMix, make_puzzle, render_images
from mmlatent.evaluation.heuristics import chance, grid_colours, majority_colour


def test_grid_colours_read_a_rendered_question_image():
    cfg = SynthConfig(image_size=48, grid_size=3, palette=("red", "green", "blue", "yellow"), moves="colours",
                      task_mix=TaskMix(chase=0.0, walk=1.0), hops=(1, 2), option_order="palette")
    for index in range(5):
        p = make_puzzle(cfg, 0, "test", index)
        image = render_images(cfg, p)["img0"]  # the framed start cell included
        assert grid_colours(image, 3, cfg.palette) == [cfg.palette[i] for i in p.colours.flatten()]


def test_majority_colour_breaks_ties_at_random_in_expectation():
    choices = ["red", "green", "blue", "yellow"]
    grid = ["red", "red", "red", "blue", "blue", "green", "green", "yellow", "yellow"]
    assert majority_colour(grid, choices, "A") == 1.0 and majority_colour(grid, choices, "C") == 0.0
    tied = ["red", "red", "blue", "blue", "green", "yellow", "yellow", "green", "purple"]  # 2 each: 4 tied
    assert majority_colour(tied, choices, "B") == pytest.approx(0.25)
    assert chance(choices) == 0.25
