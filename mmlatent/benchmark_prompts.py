"""MMMU and ScienceQA prompts and their parsing, in one place for training data and evaluation.

A model fine-tuned on converted MMMU dev or ScienceQA train questions is scored on prompts built by the
evaluation; a training prompt that differs from the evaluation prompt by a blank line or a word teaches the
model a format it never sees at test time. So both the converters (`mmlatent.data.convert`) and the
evaluation tasks (`mmlatent.evaluation`) build the user turn here, from the same row, to the same
characters. The prompts are lmms-eval's:
- MMMU: the question, for multiple choice the options as `A. …` lines, then a blank line and the
  instruction; each `<image k>` tag is replaced by image k, in place (`interleave`).
- ScienceQA: the image first when there is one, `Context: {hint}` when the hint is not empty, the
  question, the options and the instruction, each on its own line.

A user turn is a list of text pieces and ints k standing for image k (0-based into the task's image
columns); a converter turns the ints into image items, the evaluation into images read from the dataset.
Option lists (`parse_options`), gold answers (`parse_gold`), subjects (`subject_of`) and option letters are
read here too, once.
The module depends on nothing else in mmlatent, so the data side never imports the evaluation side.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Literal

QuestionType = Literal["multiple-choice", "open"]

MMMU_MULTI_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
"""Instruction line of MMMU multiple-choice questions."""
MMMU_OPEN_PROMPT = "Answer the question using a single word or phrase."
"""Instruction line of MMMU open questions."""
SCIENCEQA_PROMPT = "Answer with the option's letter from the given choices directly."
"""Instruction line after the ScienceQA options."""

IMAGE_TAG = re.compile(r"<image (\d+)>")
"""MMMU's inline image tag; group 1 is k (1-based) of column `image_k`."""

MMMU_IMAGE_COLUMNS: tuple[str, ...] = tuple(f"image_{k}" for k in range(1, 8))
"""MMMU's image columns, in image-number order."""


def letter(i: int) -> str:
    """Option letter of index `i` (0 -> "A")."""
    return chr(ord("A") + i)


def choice_letters(n: int) -> list[str]:
    """The first `n` option letters: A, B, C, …"""
    return [letter(i) for i in range(n)]


def options_block(choices: list[str]) -> str:
    """Options as `A. first` lines."""
    return "\n".join(f"{letter(i)}. {c}" for i, c in enumerate(choices))


def parse_options(options: object) -> list[str]:
    """MMMU's `options` as a list of strings (the Hub stores a stringified Python list); raises ValueError."""
    if options is None:
        return []
    if isinstance(options, (list, tuple)):
        return [str(o) for o in options]
    text = str(options).strip()
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
        raise ValueError(f"MMMU options {text[:80]!r} are not a list literal") from err
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"MMMU options {text[:80]!r} are not a list")
    return [str(o) for o in value]


def parse_gold(answer: object) -> str | list[str] | None:
    """A dataset answer as the scorer wants it: a string, a list of acceptable strings (MMMU stores some
    as a stringified Python list), or None when the split hides its answers (MMMU test: "?" or empty)."""
    if answer is None:
        return None
    if isinstance(answer, (list, tuple)):
        return [str(a) for a in answer]
    text = str(answer).strip()
    if text in ("", "?"):
        return None
    if text.startswith("[") and text.endswith("]"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(value, (list, tuple)):
            return [str(a) for a in value]
    return text


def subject_of(question_id: str) -> str:
    """`validation_Clinical_Medicine_12` -> `Clinical_Medicine` (the official rule; "" for a short id)."""
    return "_".join(question_id.split("_")[1:-1])


def mmmu_question_type(row: dict[str, Any]) -> QuestionType:
    """`multiple-choice` unless the row's `question_type` says otherwise."""
    return "multiple-choice" if row.get("question_type", "multiple-choice") == "multiple-choice" else "open"


def mmmu_prompt_text(question: str, options: list[str], question_type: QuestionType) -> str:
    """The text of an MMMU user turn, `<image k>` tags still in place."""
    if question_type == "multiple-choice":
        return f"{question}\n{options_block(options)}\n\n{MMMU_MULTI_CHOICE_PROMPT}"
    return f"{question}\n\n{MMMU_OPEN_PROMPT}"


def interleave(text: str, present: list[bool]) -> list[str | int]:
    """Split `text` at `<image k>` tags into text pieces and image numbers (0-based). A tag whose image
    is missing, or was already placed, stays text; present images never named go first.

    The trade-off: an image referred to twice is shown once, at its first tag, and images the text never
    names are shown first, so no picture is dropped and none costs its tokens twice.
    """
    named = {int(m.group(1)) - 1 for m in IMAGE_TAG.finditer(text)}
    content: list[str | int] = [k for k, has in enumerate(present) if has and k not in named]
    placed: set[int] = set()
    last = 0
    for m in IMAGE_TAG.finditer(text):
        k = int(m.group(1)) - 1
        if 0 <= k < len(present) and present[k] and k not in placed:
            content.append(text[last : m.start()])
            content.append(k)
            placed.add(k)
            last = m.end()
    content.append(text[last:])
    return [item for item in content if item != ""]


def mmmu_options(row: dict[str, Any]) -> list[str]:
    """The options of an MMMU row (none for an open question); raises ValueError for unparsable options."""
    return parse_options(row.get("options")) if mmmu_question_type(row) == "multiple-choice" else []


def mmmu_content(row: dict[str, Any], present: list[bool]) -> list[str | int]:
    """The user turn of an MMMU row whose image k is there where `present[k]`."""
    qtype = mmmu_question_type(row)
    return interleave(mmmu_prompt_text(str(row["question"]), mmmu_options(row), qtype), present)


def scienceqa_hint(row: dict[str, Any]) -> str:
    """The row's context (`hint`), stripped; "" when there is none."""
    return str(row.get("hint") or "").strip()


def scienceqa_prompt_text(hint: str, question: str, choices: list[str]) -> str:
    """Text of a ScienceQA user turn (the image, if any, goes before it)."""
    context = f"Context: {hint}\n" if hint else ""
    return f"{context}{question}\n{options_block(choices)}\n{SCIENCEQA_PROMPT}"


def scienceqa_content(row: dict[str, Any], has_image: bool) -> list[str | int]:
    """The user turn of a ScienceQA row: image 0 first when it has one, then the text."""
    text = scienceqa_prompt_text(scienceqa_hint(row), str(row["question"]), [str(c) for c in row["choices"]])
    return [0, text] if has_image else [text]
