"""ScienceQA (the `derek-thomas/ScienceQA` parquet layout) to mmlatent samples, for SFT without aux images.

Columns: `image` (HF Image struct or empty), `question`, `choices` (list of strings), `answer` (index into
`choices`), `hint` (the context), `lecture`, `solution`, and the category fields `task`, `grade`,
`subject`, `topic`, `category`, `skill`.

User turn: exactly the evaluation's prompt (`mmlatent.benchmark_prompts.scienceqa_content`, the one `mmlatent eval`
scores with): the image (when there is one), then `Context: <hint>` (when there is one), the question, the
options as `A. …` lines and the instruction line. Assistant turn: the lecture and the solution, when
present, as the chain of thought, then `answer_template` with the answer letter. The answer is the letter;
`choices` keeps the option texts and `meta` the category fields (what the evaluation breaks results down by).
Sample keys are `scienceqa-<parquet file>-<row>`.

Skips, counted by reason: `bad_answer` (index outside the choices), `bad_record` (choices not a list of
strings, question not a string), `bad_image`, and `no_image` when `image_only` is set. A file without
`question`, `choices` or `answer` is an error naming the column; the other columns are optional.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterator

from mmlatent.benchmark_prompts import letter, scienceqa_content
from mmlatent.data.convert.common import Converter, Record, make_key
from mmlatent.data.convert.images import convert_image
from mmlatent.data.convert.input_files import SourceInfo, resolve_source
from mmlatent.data.sample import SampleError
from mmlatent.data.shard_writer import RawSample

REQUIRED_COLUMNS = ("question", "choices", "answer")
"""Columns without which a ScienceQA file cannot be converted."""

CATEGORY_FIELDS = ("task", "grade", "subject", "topic", "category", "skill")
"""Columns copied to the sample's `meta`."""


@dataclass
class ScienceQAConfig:
    """Which ScienceQA split to convert and how to phrase the answer (the prompt is the evaluation's)."""

    source: str
    """A local folder laid out like the Hub repository (parquet files named `SPLIT-*.parquet`, e.g. under
    `data/`), a single parquet file, or a Hub id (`derek-thomas/ScienceQA`)."""
    split: str = "train"
    """Split to convert: `train`, `validation` (or `test`, which is for evaluation only)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); the commit it resolves to is written to the manifest."""
    image_only: bool = False
    """Skip questions without an image (`no_image`); by default text-only questions are kept."""
    use_lecture: bool = True
    """Put the lecture before the solution in the chain of thought."""
    answer_template: str = "The answer is {answer}."
    """Text that closes the assistant turn; `{answer}` is the letter."""
    files: list[str] = field(default_factory=list)
    """Glob patterns of the parquet files, relative to the source; empty: `**/SPLIT-*.parquet`."""


class ScienceQAConverter(Converter):
    name = "scienceqa"
    config_class = ScienceQAConfig

    def open(self) -> SourceInfo:
        patterns = self.cfg.files or [f"**/{self.cfg.split}-*.parquet"]
        self.source = resolve_source(self.cfg.source, self.cfg.revision, patterns)
        return self.source

    def total(self) -> int | None:
        return self.parquet_total()

    def records(self) -> Iterator[Record]:
        return self.parquet_records(REQUIRED_COLUMNS, "a ScienceQA file")

    def key(self, record: Record) -> str:
        return make_key(self.name, PurePosixPath(record.file).stem, record.row)

    def convert(self, record: Record, key: str) -> RawSample:
        rel, row, data = record
        where = f"{rel}#{row}"
        question, choices, answer = data["question"], data["choices"], data["answer"]
        if not isinstance(question, str):
            raise SampleError("bad_record", f"{where}: question is {type(question).__name__}", key)
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise SampleError("bad_record", f"{where}: choices must be a non-empty list of strings", key)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            detail = f"{where}: answer {answer!r} is not an index into {len(choices)} choices"
            raise SampleError("bad_answer", detail, key)
        image = data.get("image")
        if image is None and self.cfg.image_only:
            raise SampleError("no_image", f"{where}: no image and image_only is set", key)
        images = {}
        if image is not None:
            images["img0"] = convert_image(image, self.folder_of(rel), self.images, key, "image")
        user = [{"type": "image", "ref": "img0"} if isinstance(item, int) else {"type": "text", "text": item}
                for item in scienceqa_content(data, image is not None)]
        thought = [(data.get("lecture") or "").strip()] if self.cfg.use_lecture else []
        thought += [(data.get("solution") or "").strip(), self.cfg.answer_template.format(answer=letter(answer))]
        meta = {
            "id": f"{self.cfg.split}-{row}" if len(self.source.files) == 1 else f"{rel}#{row}",
            "source": "scienceqa",
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": [{"type": "text", "text": "\n\n".join(t for t in thought if t)}]},
            ],
            "answer": letter(answer),
            "choices": list(choices),
            "meta": {name: data.get(name) for name in CATEGORY_FIELDS if data.get(name) is not None},
        }
        return RawSample(key=key, meta=meta, images=images)
