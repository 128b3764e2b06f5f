"""ScienceQA (the full test set, or its image subset): rows to questions and prompts.

The prompt is the LLaVA / lmms-eval one, built by `mmlatent.benchmarks` (as for converted ScienceQA training
data): the image first when there is one, then `Context: {hint}` when the hint is not empty, the question,
the options as `A. …` lines and "Answer with the option's letter from the given choices directly.". The
answer column is the index of the right choice; it becomes a letter, compared with the letter the chosen
protocol's official scorer reads from the response (LLaVA's by default; `protocols.py`).

Category fields follow the official `get_scores`: `subject`, `grade`, and three context flags, `has_text`
(hint not empty), `has_image` and `no_context` (neither). The image subset is the questions that have an
image; it is taken by filtering, so the same ids (`{split}_{row}` where the data has no id column) come out
of the full set and of the subset, at the cost of reading the full split's text columns to make the
subset. A folder holding both `ScienceQA-FULL` and `ScienceQA-IMG` configs (lmms-lab's layout) is read from
its FULL config, for that reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from mmlatent.benchmarks import letter, scienceqa_content, scienceqa_hint
from mmlatent.evaluation.metrics import scienceqa_breakdown
from mmlatent.evaluation.protocols import SCIENCEQA_PROTOCOLS
from mmlatent.evaluation.question import Question, Task

FULL_CONFIG = "ScienceQA-FULL"
"""Folder (config) name of the full set where a repository holds several configs."""


class ScienceQATask(Task):
    """ScienceQA: multiple-choice science questions, some with an image and a textual context (hint)."""

    name: ClassVar[str] = "scienceqa"
    default_data: ClassVar[str] = "derek-thomas/ScienceQA"
    default_split: ClassVar[str] = "test"
    image_columns: ClassVar[tuple[str, ...]] = ("image",)
    protocols = SCIENCEQA_PROTOCOLS

    def select_files(self, groups: dict[str, list[Path]]) -> list[Path]:
        if len(groups) <= 1:
            return [f for files in groups.values() for f in files]
        for folder, files in groups.items():
            if Path(folder).name == FULL_CONFIG:
                return files
        raise ValueError(
            f"ScienceQA files in several folders {sorted(groups)} and none is {FULL_CONFIG!r}; "
            "point --data at one of them"
        )

    def questions(self, rows: list[dict[str, Any]], present: list[list[bool]], split: str) -> list[Question]:
        out = []
        for row_index, (row, has) in enumerate(zip(rows, present)):
            has_image = bool(has[0])
            if self.subset == "img" and not has_image:
                continue
            hint = scienceqa_hint(row)
            answer = row.get("answer")
            out.append(
                Question(
                    id=str(row["id"]) if row.get("id") is not None else f"{split}_{row_index}",
                    row=row_index,
                    content=scienceqa_content(row, has_image),
                    question_type="multiple-choice",
                    choices=[str(c) for c in row["choices"]],
                    gold=None if answer is None or int(answer) < 0 else letter(int(answer)),
                    fields={
                        "subject": row.get("subject"),
                        "grade": row.get("grade"),
                        "has_text": bool(hint),
                        "has_image": has_image,
                        "no_context": not hint and not has_image,
                    },
                )
            )
        return out

    def breakdown(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return scienceqa_breakdown(records)
