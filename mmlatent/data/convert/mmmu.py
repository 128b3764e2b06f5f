"""MMMU (the `MMMU/MMMU` per-subject parquet layout) to mmlatent samples, for SFT on the dev split.

Columns: `id` (`dev_Accounting_1`), `question`, `options` (a stringified Python list), `explanation`,
`image_1` … `image_7` (HF Image structs or empty), `img_type`, `answer` (a letter for multiple choice, text
for open questions), `topic_difficulty`, `question_type` (`multiple-choice` or `open`) and `subfield`.

User turn: exactly the evaluation's prompt (`mmlatent.benchmark_prompts.mmmu_content`, the one `mmlatent eval`
scores with): the question, the options as `A. …` lines, a blank line and the instruction, with each
`<image k>` tag (in the question or an option) replaced by the image itself, in place; an image named twice
is shown at its first place only, and images the text never names come first. Assistant turn: the
explanation, when present, as the chain of thought, then `answer_template` with the answer. The `answer`
field is the letter, or the open answer as the dataset states it (normalised); `answer_template` says the
first of a stringified list. Sample keys are `mmmu-<id>`.

Skips, counted by reason: `missing_column` (a tag names an `image_k` column the file lacks),
`missing_image` (that column is empty in this row: training data is kept only with all its pictures),
`bad_options` (not a list), `bad_answer` (a letter outside the options), `open_question` when
`include_open` is off, `bad_image`. A file without `id`, `question`, `options` or `answer` is an error naming
the column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from mmlatent.benchmark_prompts import (
    IMAGE_TAG, MMMU_IMAGE_COLUMNS, mmmu_content, mmmu_options, mmmu_question_type, parse_gold, subject_of,
)
from mmlatent.data.convert.answers import normalize_answer
from mmlatent.data.convert.common import Converter, Record, make_key
from mmlatent.data.convert.images import convert_image
from mmlatent.data.convert.input_files import SourceInfo, resolve_source
from mmlatent.data.sample import SampleError
from mmlatent.data.shard_writer import RawSample

REQUIRED_COLUMNS = ("id", "question", "options", "answer")
"""Columns without which an MMMU file cannot be converted."""

META_FIELDS = ("subfield", "img_type", "topic_difficulty", "question_type")
"""Columns copied to the sample's `meta` (besides the subject, taken from the id)."""


@dataclass
class MMMUConfig:
    """Which MMMU split and subjects to convert and how to phrase the answer (the prompt is the evaluation's)."""

    source: str
    """A local folder laid out like the Hub repository (one folder per subject holding `SPLIT-*.parquet`,
    or a single `data/` folder), a single parquet file, or a Hub id (`MMMU/MMMU`)."""
    split: str = "dev"
    """Split to convert; `dev` (5 solved questions per subject) is the one meant for training."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); the commit it resolves to is written to the manifest."""
    subjects: list[str] = field(default_factory=list)
    """Subject folders to read (e.g. `["Accounting", "Art_Theory"]`); empty reads all."""
    include_open: bool = True
    """Keep open (free-answer) questions; off skips them as `open_question`."""
    answer_template: str = "The answer is {answer}."
    """Text that closes the assistant turn; `{answer}` is the letter or the open answer."""


class MMMUConverter(Converter):
    name = "mmmu"
    config_class = MMMUConfig

    def open(self) -> SourceInfo:
        split = self.cfg.split
        patterns = [f"{s}/**/{split}-*.parquet" for s in self.cfg.subjects] or [f"**/{split}-*.parquet"]
        self.source = resolve_source(self.cfg.source, self.cfg.revision, patterns)
        return self.source

    def total(self) -> int | None:
        return self.parquet_total()

    def records(self) -> Iterator[Record]:
        return self.parquet_records(REQUIRED_COLUMNS, "an MMMU file")

    def key(self, record: Record) -> str:
        return make_key(self.name, record.data["id"])

    def convert(self, record: Record, key: str) -> RawSample:
        rel, row, data = record
        sample_id = str(data["id"])
        where = f"{rel}#{row} ({sample_id})"
        try:
            options = mmmu_options(data)
        except ValueError as err:
            raise SampleError("bad_options", f"{where}: {err}", key, "options") from None
        qtype = mmmu_question_type(data)
        raw_answer = "" if data["answer"] is None else str(data["answer"]).strip()
        if qtype == "multiple-choice":
            if len(raw_answer) != 1 or not 0 <= ord(raw_answer) - ord("A") < len(options):
                detail = f"{where}: answer {raw_answer!r} is not a letter of {len(options)} options"
                raise SampleError("bad_answer", detail, key, "answer")
            said = raw_answer
        else:
            if not self.cfg.include_open:
                raise SampleError("open_question", f"{where}: open question and include_open is off", key)
            gold = parse_gold(raw_answer)
            said = (gold[0] if gold else "") if isinstance(gold, list) else (gold or "")
            if not said:
                raise SampleError("bad_answer", f"{where}: empty answer", key, "answer")
        user, images = self._user_turn(data, rel, where, key)
        thought = [(data.get("explanation") or "").strip(), self.cfg.answer_template.format(answer=said)]
        meta = {
            "id": sample_id,
            "source": "mmmu",
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": [{"type": "text", "text": "\n\n".join(t for t in thought if t)}]},
            ],
            "answer": normalize_answer(raw_answer),
            "meta": {"subject": subject_of(sample_id),
                     **{name: data.get(name) for name in META_FIELDS if data.get(name) is not None}},
        }
        if qtype == "multiple-choice":
            meta["choices"] = list(options)
        return RawSample(key=key, meta=meta, images=images)

    def _user_turn(self, data: dict, rel: str, where: str, key: str) -> tuple[list[dict], dict[str, bytes]]:
        """The evaluation's user turn as content items, and its images by ref. Every image the prompt names
        must be there (`missing_column`, `missing_image`)."""
        present = [data.get(column) is not None for column in MMMU_IMAGE_COLUMNS]
        text = f"{data['question']} {data['options']}"
        for match in IMAGE_TAG.finditer(text):
            column = f"image_{match.group(1)}"
            if column not in data:
                raise SampleError("missing_column", f"{where}: the text refers to {match.group(0)}, "
                                                    f"but the file has no column {column}", key, column)
            if data[column] is None:
                raise SampleError("missing_image", f"{where}: {match.group(0)} names an empty {column}", key, column)
        items: list[dict] = []
        images: dict[str, bytes] = {}
        for piece in mmmu_content(data, present):
            if isinstance(piece, str):
                items.append({"type": "text", "text": piece})
                continue
            column, ref = MMMU_IMAGE_COLUMNS[piece], f"img{len(images)}"
            images[ref] = convert_image(data[column], self.folder_of(rel), self.images, key, column)
            items.append({"type": "image", "ref": ref})
        return items, images
