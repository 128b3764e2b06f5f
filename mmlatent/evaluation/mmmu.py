"""MMMU (dev, validation, test): rows to questions and prompts, in the format the common harnesses use.

The prompt is lmms-eval's, built by `mmlatent.benchmark_prompts` (where the converter of MMMU training data builds
it too, to the character): the question, then for multiple choice the options as `A. …` lines, a blank line
and "Answer with the option's letter from the given choices directly."; for open questions a blank line and
"Answer the question using a single word or phrase.". Each `<image k>` tag in that text is replaced by
image k where the row has it, so images sit where the question refers to them (options may refer to images
too); an image referred to twice is shown once, at its first tag, and images the text never names first.

Column formats handled: `options` is a stringified Python list; `answer` is a letter, a string, or a
stringified list of acceptable answers; `image_1`..`image_7` are HF Image structs or null; the subject is
read from the id (`validation_Clinical_Medicine_12` -> `Clinical_Medicine`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from mmlatent.benchmark_prompts import (
    MMMU_IMAGE_COLUMNS, mmmu_content, mmmu_options, mmmu_question_type, parse_gold, subject_of,
)
from mmlatent.evaluation.metrics import MMMU_SUBJECT_DISCIPLINE, mmmu_breakdown
from mmlatent.evaluation.question import Question, Task


class MMMUTask(Task):
    """MMMU: 30 subjects in six disciplines; multiple-choice and open questions with up to 7 images."""

    name: ClassVar[str] = "mmmu"
    default_data: ClassVar[str] = "MMMU/MMMU"
    default_split: ClassVar[str] = "validation"
    image_columns: ClassVar[tuple[str, ...]] = MMMU_IMAGE_COLUMNS

    def questions(self, rows: list[dict[str, Any]], present: list[list[bool]], split: str) -> list[Question]:
        out = []
        for row_index, (row, has) in enumerate(zip(rows, present)):
            if self.subset == "img" and not any(has):
                continue
            qid = str(row["id"])
            question_type = mmmu_question_type(row)
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
                    content=mmmu_content(row, has),
                    question_type=question_type,
                    choices=mmmu_options(row),
                    gold=parse_gold(row.get("answer")),
                    fields=fields,
                )
            )
        return out

    def breakdown(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return mmmu_breakdown(records)
