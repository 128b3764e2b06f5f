"""Answer parsing and matching exactly as the official MMMU scorer does it (MMMU-Benchmark/MMMU, eval_utils).

Multiple choice (`parse_multi_choice_response`): strip punctuation at the ends, pad with spaces, then look
for candidates in three tiers: a bracketed letter `(A)`; else a bare letter ` A `; else, only for responses
longer than 5 words, the option text (case-insensitive). With several candidates the one mentioned last
wins (largest `rfind` index of the form that matched). lmms-eval's `mmmu_val` parses with a variant of it
(`lmms_eval=True`, its `_task_utils/mmmu_mcq_utils.parse_mmmu_multi_choice_response`): the bare-letter tier
asks only for a space after the letter (`A `, so also `CAB `), and a tier `A.` comes before the option text.
Open questions (`parse_open_response`, the same in both): keep the tail after indicator phrases ("so ",
"is ", "answer ", "=" in the last sentence, …), add every number found in it (commas, scientific notation,
plain), normalise (numbers to floats rounded to 2 decimals, text to lower case), and `eval_open` accepts a
numeric equality or a gold string contained in a predicted string.

The one departure, and its trade-off: where the official scorer picks a random letter for an unparsable
multiple-choice response (seed 42, so scores shift with the order of questions), we return None; the
protocol (`protocols.py`) counts the answer wrong, reports how many were unparsed and the expected accuracy
had they been guessed. Scores are then reproducible and order-independent.
"""

from __future__ import annotations

import re

from mmlatent.benchmarks import QuestionType, choice_letters, parse_gold

__all__ = ["QuestionType", "choice_letters", "parse_gold", "parse_multi_choice_response", "parse_open_response",
           "eval_multi_choice", "eval_open"]

_STRIP_CHARS = (",", ".", "!", "?", ";", ":", "'")
"""Characters stripped, one after the other, from both ends of a multiple-choice response."""

_OPEN_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
"""Phrases after which an open response states its answer (the official list, in its order)."""

_TRIVIAL = (":", ",", ".", "!", "?", ";", ":", "'")
"""Key sub-responses that are only punctuation are dropped."""

_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def parse_multi_choice_response(
    response: str, all_choices: list[str], index2ans: dict[str, str], lmms_eval: bool = False
) -> str | None:
    """The letter the response picks, or None where the scorer would guess at random. `lmms_eval`: the
    variant of lmms-eval's `mmmu_val` (bare letter `A ` without the space before it, then `A.`)."""
    for char in _STRIP_CHARS:
        response = response.strip(char)
    response = " " + response + " "  # spaces on both ends let ` A ` match at the edges

    index_ans = True
    ans_with_brack = False
    candidates: list[str] = []
    for choice in all_choices:  # (A) (B) (C) (D)
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    bare_tiers = (" {} ",) if not lmms_eval else ("{} ", "{}.")
    for tier in bare_tiers:  # A B C D as words (lmms-eval: "A " anywhere, then "A.")
        if not candidates:
            candidates = [choice for choice in all_choices if tier.format(choice) in response]
    if not candidates and len(response.split()) > 5:  # a longer response may name the option's text
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if index_ans and ans_with_brack:
        starts = [response.rfind(f"({c})") for c in candidates]
    elif index_ans:  # both variants rank bare letters by " A " (-1 when only "A." or "CAB " matched)
        starts = [response.rfind(f" {c} ") for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[max(range(len(candidates)), key=starts.__getitem__)]  # first of the latest, as np.argmax


def check_is_number(string: str) -> bool:
    """True when `string` reads as a float once commas are removed."""
    try:
        float(string.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(string: str) -> list[str | float]:
    """A number becomes [its float rounded to 2 decimals]; text is lower-cased (a single character is
    padded with a space on either side, so that it cannot match inside a word)."""
    string = string.strip()
    if check_is_number(string):
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    if len(string) == 1:
        return [" " + string, string + " "]
    return [string]


def extract_numbers(string: str) -> list[str]:
    """Every number in `string`: with thousands commas, in scientific notation, then plain ones."""
    return _NUM_COMMAS.findall(string) + _NUM_SCIENTIFIC.findall(string) + _NUM_SIMPLE.findall(string)


def key_subresponses(response: str) -> list[str]:
    """The parts of a response that likely hold the answer: per sentence, the shortest tail after an
    indicator phrase (`=` counts too in the last sentence); the whole response when there is none."""
    response = response.strip().strip(".").lower()
    sub_responses = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = list(_OPEN_INDICATORS)
    keys: list[str] = []
    for index, resp in enumerate(sub_responses):
        if index == len(sub_responses) - 1:
            indicators.append("=")  # the last sentence may be a bare equation
        shortest: str | None = None
        for indicator in indicators:
            if indicator in resp:
                tail = resp.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list[str | float]:
    """Normalised candidate answers of an open response (strings and floats, deduplicated).

    The official scorer deduplicates with a set; we keep first-seen order instead, which changes no
    verdict (`eval_open` accepts when any candidate matches) and makes the saved output deterministic.
    """
    keys = key_subresponses(response)
    raw = list(keys)
    for resp in keys:
        raw.extend(extract_numbers(resp))
    out: list[str | float] = []
    for item in raw:
        for norm in normalize_str(item):
            if norm not in out:
                out.append(norm)
    return out


def eval_multi_choice(gold: str | list[str], pred: str | None) -> bool:
    """Exact match of the letter (any of the gold letters when there are several)."""
    if isinstance(gold, list):
        return any(answer == pred for answer in gold)
    return gold == pred


def eval_open(gold: str | list[str], preds: list[str | float]) -> bool:
    """A float candidate equal to a numeric gold answer, or a gold string inside a string candidate."""
    norm_answers: list[str | float] = []
    for answer in gold if isinstance(gold, list) else [gold]:
        norm_answers.extend(normalize_str(answer))
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(ans, str) and ans in pred for ans in norm_answers):
                return True
        elif pred in norm_answers:
            return True
    return False
