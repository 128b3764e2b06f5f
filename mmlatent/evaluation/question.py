"""One benchmark question as the evaluation sees it, and the interface every task implements.

A `Question` holds text only: the user turn as text pieces interleaved with image numbers, the options, the
gold answer and the category fields the breakdowns group by. Images stay in the memory-mapped dataset and
are decoded per batch (`EvalData.images`), so a 10k-question split with pictures costs no more memory than
one batch of them; the trade-off is a random access into Arrow per question at generation time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mmlatent.evaluation.parsing import QuestionType
from mmlatent.evaluation.protocols import MMMU_PROTOCOLS, Judgement, Protocol, judge


@dataclass
class Question:
    """A question ready to be rendered into a prompt and scored."""

    id: str
    """The dataset's id (MMMU: `validation_Accounting_1`), or `{split}_{row}` where the data has none."""
    row: int
    """Row of the question in the loaded dataset (where its images are read from)."""
    content: list[str | int]
    """The user turn in order: text pieces, and ints k standing for image k (0-based into the task's
    image columns)."""
    question_type: QuestionType
    """`multiple-choice` (answer is a letter) or `open` (free-form answer)."""
    choices: list[str] = field(default_factory=list)
    """Option texts in letter order (A, B, …); empty for open questions."""
    gold: str | list[str] | None = None
    """Gold answer: a letter or string, a list of acceptable ones, or None where the split hides answers."""
    fields: dict[str, Any] = field(default_factory=dict)
    """Category fields copied into each output line (subject, discipline, grade, context flags, …)."""
    system: str | None = None
    """The question's own system turn (a converted sample's); None: the model's `system_prompt`, if any."""

    @property
    def image_slots(self) -> list[int]:
        """The image numbers in the order they appear in the prompt."""
        return [item for item in self.content if isinstance(item, int)]

    def prompt_text(self) -> str:
        """The user turn as readable text, each image shown as `<image k>` (1-based, MMMU's own tag)."""
        return "".join(item if isinstance(item, str) else f"<image {item + 1}>" for item in self.content)


class Task(ABC):
    """A benchmark: which parquet files to read, how rows become questions, how answers are judged (the
    protocol), how results break down."""

    name: ClassVar[str]
    """Registry name (`--task`)."""
    default_data: ClassVar[str]
    """Hub id read when `--data` is not given."""
    default_split: ClassVar[str]
    """Split read when `--split` is not given."""
    image_columns: ClassVar[tuple[str, ...]]
    """Columns holding images, in image-number order."""
    protocols: ClassVar[dict[str, Protocol]] = MMMU_PROTOCOLS
    """The scoring protocols that apply, by name; the first is the default."""

    def __init__(self, subset: str = "full", protocol: str | None = None):
        if subset not in ("full", "img"):
            raise ValueError(f"subset must be 'full' or 'img', got {subset!r}")
        if protocol is not None and protocol not in self.protocols:
            raise ValueError(f"--protocol {protocol!r} does not apply to {self.name}; choose from {list(self.protocols)}")
        self.subset = subset
        """`full`: every question; `img`: only questions with at least one image (ScienceQA's IMG set)."""
        self.protocol = self.protocols[protocol or next(iter(self.protocols))]
        """The official scorer whose rules judge the answers (`protocols.py`)."""

    def judge(self, question: Question, response: str) -> Judgement:
        """The verdict on `response` under this task's protocol."""
        return judge(question.question_type, question.choices, question.gold, response, self.protocol)

    def select_files(self, groups: dict[str, list[Path]]) -> list[Path]:
        """Parquet files to read, from the split's files grouped by folder (config). Default: all of them."""
        return [f for files in groups.values() for f in files]

    @abstractmethod
    def questions(self, rows: list[dict[str, Any]], present: list[list[bool]], split: str) -> list[Question]:
        """Questions of the split from its text columns (`rows`) and which images each row has
        (`present[i][k]`: row i has an image in column k). Applies the subset."""

    @abstractmethod
    def breakdown(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Accuracy by category from scored output lines (see `metrics`)."""
