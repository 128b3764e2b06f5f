"""MMMU (dev, validation, test): rows to questions and prompts, in the format the common harnesses use.

The prompt is lmms-eval's: the question, then for multiple choice the options as `A. …` lines, a blank
line and "Answer with the option's letter from the given choices directly."; for open questions a blank
line and "Answer the question using a single word or phrase.". Each `<image k>` tag in that text is
replaced by image k where the row has it, so images sit where the question refers to them (options may
refer to images too). The trade-off in that placement: an image referred to twice is shown once, at its
first tag (later tags stay as text), and images the text never names are shown first, so no picture is
dropped and none costs its tokens twice.

Column formats handled: `options` is a stringified Python list; `answer` is a letter, a string, or a
stringified list of acceptable answers; `image_1`..`image_7` are HF Image structs or null; the subject is
read from the id (`validation_Clinical_Medicine_12` -> `Clinical_Medicine`).
"""

from __future__ import annotations

import ast
import re
from typing import Any, ClassVar

from mmlatent.evaluation.metrics import MMMU_SUBJECT_DISCIPLINE, mmmu_breakdown
from mmlatent.evaluation.parsing import choice_letters, parse_gold
from mmlatent.evaluation.question import Question, Task

MULTI_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
"""Instruction line of multiple-choice questions."""
OPEN_ENDED_PROMPT = "Answer the question using a single word or phrase."
"""Instruction line of open questions."""

_IMAGE_TAG = re.compile(r"<image (\d+)>")


def parse_options(options: object) -> list[str]:
    """`options` as a list of strings (MMMU stores it as a stringified list)."""
    if options is None:
        return []
    if isinstance(options, (list, tuple)):
        return [str(o) for o in options]
    text = str(options).strip()
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"MMMU options {text[:80]!r} are not a list literal") from err
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"MMMU options {text[:80]!r} are not a list")
    return [str(o) for o in value]


def subject_of(question_id: str) -> str:
    """`validation_Clinical_Medicine_12` -> `Clinical_Medicine` (the official rule)."""
    return "_".join(question_id.split("_")[1:-1])


def prompt_text(question: str, options: list[str], question_type: str) -> str:
    """The text of the user turn, `<image k>` tags still in place."""
    if question_type == "multiple-choice":
        listed = "\n".join(f"{letter}. {option}" for letter, option in zip(choice_letters(len(options)), options))
        return f"{question}\n{listed}\n\n{MULTI_CHOICE_PROMPT}"
    return f"{question}\n\n{OPEN_ENDED_PROMPT}"


def interleave(text: str, present: list[bool]) -> list[str | int]:
    """Split `text` at `<image k>` tags into text pieces and image numbers (0-based). A tag whose image
    is missing, or was already placed, stays text; present images never named go first."""
    named = {int(m.group(1)) - 1 for m in _IMAGE_TAG.finditer(text)}
    content: list[str | int] = [k for k, has in enumerate(present) if has and k not in named]
    placed: set[int] = set()
    last = 0
    for m in _IMAGE_TAG.finditer(text):
        k = int(m.group(1)) - 1
        if 0 <= k < len(present) and present[k] and k not in placed:
            content.append(text[last : m.start()])
            content.append(k)
            placed.add(k)
            last = m.end()
    content.append(text[last:])
    return [item for item in content if item != ""]


class MMMUTask(Task):
    """MMMU: 30 subjects in six disciplines; multiple-choice and open questions with up to 7 images."""

    name: ClassVar[str] = "mmmu"
    default_data: ClassVar[str] = "MMMU/MMMU"
    default_split: ClassVar[str] = "validation"
    image_columns: ClassVar[tuple[str, ...]] = tuple(f"image_{i}" for i in range(1, 8))

    def questions(self, rows: list[dict[str, Any]], present: list[list[bool]], split: str) -> list[Question]:
        out = []
        for row_index, (row, has) in enumerate(zip(rows, present)):
            if self.subset == "img" and not any(has):
                continue
            qid = str(row["id"])
            is_mc = row.get("question_type", "multiple-choice") == "multiple-choice"
            question_type = "multiple-choice" if is_mc else "open"
            options = parse_options(row.get("options")) if question_type == "multiple-choice" else []
            subject = subject_of(qid)
            fields = {
                "subject": subject,
                "discipline": MMMU_SUBJECT_DISCIPLINE.get(subject, "Unknown"),
                "question_type": question_type,
            }
            for extra in ("subfield", "topic_difficulty", "img_type"):
                if row.get(extra) is not None:
                    fields[extra] = row[extra]
            out.append(
                Question(
                    id=qid,
                    row=row_index,
                    content=interleave(prompt_text(str(row["question"]), options, question_type), has),
                    question_type=question_type,
                    choices=options,
                    gold=parse_gold(row.get("answer")),
                    fields=fields,
                )
            )
        return out

    def breakdown(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return mmmu_breakdown(records)
