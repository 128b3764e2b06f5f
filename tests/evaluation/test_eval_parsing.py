"""The official MMMU answer parsing, case by case: what the official scorer picks, we pick (or None where
it would guess at random)."""

from __future__ import annotations

import pytest

from mmlatent.evaluation.parsing import (
    eval_open,
    extract_numbers,
    parse_gold,
    parse_multi_choice_response,
    parse_open_response,
)
from mmlatent.evaluation.protocols import judge

LETTERS = ["A", "B", "C", "D"]
ANIMALS = dict(zip(LETTERS, ["cat", "dog", "bird", "big fish"]))


@pytest.mark.parametrize(
    "response, expected",
    [
        ("B", "B"),
        ("A.", "A"),  # end punctuation is stripped
        ("(C)", "C"),
        ("Answer: C", "C"),
        ("The answer is (A), not (B).", "B"),  # several bracketed letters: the last mentioned wins
        ("A or B? I think B", "B"),  # several bare letters: the last ` B ` wins
        ("A is wrong, (C) is right", "C"),  # a bracketed letter beats bare ones
        ("Because", None),  # the B inside a word is no letter
        ("BAD CAB, so it is A", "A"),  # letters inside words ignored, the bare one counts
        ("D) big fish", None),  # "D)" is neither "(D)" nor " D ", and 2 words is too short for option text
        ("(a)", None),  # letters are case-sensitive
        ("I believe the right animal here is the dog, clearly.", "B"),  # option text, > 5 words
        ("It is not a cat but a bird in this picture", "C"),  # option texts: the last mentioned wins
        ("dog", None),  # option text alone is too short to count
        ("", None),
    ],
)
def test_multi_choice_parsing(response, expected):
    assert parse_multi_choice_response(response, LETTERS, ANIMALS) == expected


def test_option_text_inside_another_option_follows_the_official_rfind():
    """With options "red" and "dark red", the last "red" sits inside "dark red", so "red" (A) wins."""
    colours = {"A": "red", "B": "dark red"}
    assert parse_multi_choice_response("the colour we see here is dark red", ["A", "B"], colours) == "A"


@pytest.mark.parametrize(
    "text, numbers",
    [
        ("1,234.5 and 7e-2 and .5", ["1,234", "7e-2", "234.5", "-2", ".5"]),
        ("costs 12,345,678 dollars", ["12,345,678", "678"]),
        ("x = -3.25", ["-3.25"]),
        ("no digits", []),
    ],
)
def test_number_extraction(text, numbers):
    assert extract_numbers(text) == numbers


@pytest.mark.parametrize(
    "response, candidates",
    [
        ("The answer is 1,000.", [1000.0, 0.0]),  # "1,000" as one number; the official simple pattern adds "000"
        ("1.5e3", [1500.0, 1.0, 3.0]),
        ("So the total is 12. Therefore the answer is 13.", [13.0]),  # the shortest tail after an indicator
        ("x = 4", [4.0]),  # "=" counts in the last sentence
        ("-0.333", [-0.33]),  # rounded to 2 decimals
        ("the answer is c", [" c", "c "]),  # a single character is padded so it cannot match inside a word
        ("Paris.\nSo the capital is Paris", ["paris"]),
        ("The population is 12,345,678 people", ["12,345,678 people", 12345678.0, 678.0]),
    ],
)
def test_open_parsing(response, candidates):
    assert parse_open_response(response) == candidates


@pytest.mark.parametrize(
    "gold, response, correct",
    [
        ("1000", "The answer is 1,000.", True),  # commas
        (["1,000", "1000.5"], "so it is 1000.5", True),  # a list of acceptable answers
        (["1,000", "1000.5"], "so it is 1000.25", False),
        ("1500", "1.5e3", True),  # scientific notation
        ("0.0025", "The result is 2.5e-3", True),
        ("0.33", "about 0.3333", True),  # both sides rounded to 2 decimals
        ("12", "So the total is 12. Therefore the answer is 13.", False),  # only the key tail counts
        ("Paris", "I think the capital is Paris.", True),  # gold text inside the prediction, case-folded
        ("c", "the answer is c", True),
        ("c", "abc", False),  # a one-letter gold answer does not match inside a word
        ("blue", "", False),
    ],
)
def test_open_matching(gold, response, correct):
    assert eval_open(gold, parse_open_response(response)) is correct


@pytest.mark.parametrize(
    "raw, gold",
    [
        ("A", "A"),
        ("['24/7', '3.429']", ["24/7", "3.429"]),
        ("[1, 2]", ["1", "2"]),
        ("[not a list", "[not a list"),
        ("?", None),
        ("", None),
        (None, None),
        (["x", "y"], ["x", "y"]),
    ],
)
def test_gold_answers(raw, gold):
    assert parse_gold(raw) == gold


def test_judge_counts_unparsed_as_wrong_and_hidden_gold_as_unscored():
    choices = ["cat", "dog", "bird"]
    v = judge("multiple-choice", choices, "B", "I refuse")
    assert v.prediction is None and v.unparsed and v.correct is False
    v = judge("multiple-choice", choices, ["A", "B"], "(B)")
    assert v.prediction == "B" and v.correct is True and not v.unparsed
    v = judge("multiple-choice", choices, None, "(B)")
    assert v.prediction == "B" and v.correct is None
    v = judge("open", [], "2.5", "The dose is 2.50 mg")
    assert v.prediction == "The dose is 2.50 mg" and v.correct is True and 2.5 in v.parsed
    v = judge("open", [], "2.5", "  ")
    assert v.unparsed and v.correct is False
