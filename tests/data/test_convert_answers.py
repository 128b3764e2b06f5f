"""One answer normalisation for every converter (issue 14, item 7): nested braces, math wrappers, plain answers."""

from __future__ import annotations

import pytest

from mmlatent.data.convert.answers import last_boxed, normalize_answer


@pytest.mark.parametrize("raw, answer", [
    ("$\\boxed{70^\\circ}$", "70^\\circ"),                       # Zebra-CoT's Final Answer
    ("So the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # Monet's last assistant text, nested braces
    ("\\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),
    ("first \\boxed{A}, then \\boxed{B}", "B"),                  # the last box wins
    ("\\boxed{ $5$ }", "5"),
    ("$5$", "5"),
    ("$$x + 1$$", "x + 1"),
    ("\\(42\\)", "42"),
    ("  B ", "B"),
    ("['24/7', '3.429']", "['24/7', '3.429']"),                  # MMMU's stringified list stays for its scorer
    ("$", "$"),
    ("\\boxed{never closed", "\\boxed{never closed"),
    (None, ""),
])
def test_normalize_answer(raw, answer):
    assert normalize_answer(raw) == answer


def test_last_boxed():
    assert last_boxed("no box") is None and last_boxed("\\boxed{a{b}c} and \\boxed{d}") == "d"
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c" and last_boxed("\\boxed{open") is None


def test_monet_and_zebra_cot_store_the_same_answer_for_the_same_box():
    """Monet's `\\boxed{}` in the reasoning and Zebra-CoT's `$\\boxed{}$` column end up the same."""
    from mmlatent.data.convert.monet import _answer

    messages = [{"role": "assistant", "content": [{"type": "text", "text": "So ∠C = \\boxed{70^\\circ}."}]}]
    assert _answer(messages) == normalize_answer("$\\boxed{70^\\circ}$") == "70^\\circ"
    assert _answer([{"role": "assistant", "content": [{"type": "text", "text": "no box"}]}]) == ""
