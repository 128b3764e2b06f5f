"""MMMU (the `MMMU/MMMU` per-subject parquet layout) to mmlatent samples, for SFT on the dev split.

Columns: `id` (`dev_Accounting_1`), `question`, `options` (a stringified Python list), `explanation`,
`image_1` … `image_7` (HF Image structs or empty), `img_type`, `answer` (a letter for multiple choice, text
for open questions), `topic_difficulty`, `question_type` (`multiple-choice` or `open`) and `subfield`.

User turn: the question, the options as `A. …` lines and the instruction line, with each `<image k>`
placeholder (in the question or an option) replaced by the image itself, in place, as MMMU's prompts
interleave them; an image named twice is shown at its first place only. Assistant turn: the explanation,
when present, as the chain of thought, then `answer_template` with the answer. Multiple-choice answers
are letters; open answers keep their text (`answer_template` uses the first of a stringified list).

Skips, counted by reason: `missing_column` (a placeholder names an `image_k` column the file lacks),
`missing_image` (that column is empty in this row), `bad_options` (not a list), `bad_answer` (a letter
outside the options), `open_question` when `include_open` is off, `bad_image`. A file without `id`,
`question`, `options` or `answer` is an error naming the column.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Iterator

from mmlatent.data.convert.common import Converter, options_block
from mmlatent.data.convert.images import convert_image
from mmlatent.data.convert.sources import SourceInfo, resolve_source
from mmlatent.data.sample import SampleError
from mmlatent.data.shard_writer import RawSample

REQUIRED_COLUMNS = ("id", "question", "options", "answer")
"""Columns without which an MMMU file cannot be converted."""

META_FIELDS = ("subfield", "img_type", "topic_difficulty", "question_type")
"""Columns copied to the sample's `meta` (besides the subject, taken from the id)."""

PLACEHOLDER = re.compile(r"<image (\d+)>")
"""MMMU's inline image placeholder; group 1 is k of column `image_k`."""


def parse_list(value: object) -> list | None:
    """A list given as a list or as its Python string form (`"['a', 'b']"`); None if it is neither."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
        return parsed if isinstance(parsed, list) else None
    return None


def subject_of(sample_id: str) -> str:
    """`dev_Art_Theory_3` -> `Art_Theory`."""
    parts = sample_id.split("_")
    return "_".join(parts[1:-1]) if len(parts) > 2 else ""


@dataclass
class MMMUConfig:
    """Which MMMU split and subjects to convert and how to phrase them."""

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
    mc_instruction: str = "Answer with the option's letter from the given choices directly."
    """Last line of the user turn of a multiple-choice question (MMMU's prompt)."""
    open_instruction: str = "Answer the question using a single word or phrase."
    """Last line of the user turn of an open question (MMMU's prompt)."""
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

    def records(self) -> Iterator[tuple[str, int, dict]]:
        return self.parquet_records(REQUIRED_COLUMNS, "an MMMU file")

    def convert(self, record: tuple[str, int, dict], key: str) -> RawSample:
        rel, row, data = record
        sample_id = str(data["id"])
        where = f"{rel}#{row} ({sample_id})"
        options = parse_list(data["options"])
        if options is None or not all(isinstance(o, str) for o in options):
            detail = f"{where}: options {str(data['options'])[:60]!r} is not a list of strings"
            raise SampleError("bad_options", detail, key)
        qtype = data.get("question_type") or ("multiple-choice" if options else "open")
        raw_answer = "" if data["answer"] is None else str(data["answer"]).strip()
        if qtype == "multiple-choice":
            if len(raw_answer) != 1 or not 0 <= ord(raw_answer) - ord("A") < len(options):
                detail = f"{where}: answer {raw_answer!r} is not a letter of {len(options)} options"
                raise SampleError("bad_answer", detail, key)
            said, lines = raw_answer, [options_block(options), self.cfg.mc_instruction]
        else:
            if not self.cfg.include_open:
                raise SampleError("open_question", f"{where}: open question and include_open is off", key)
            answers = parse_list(raw_answer)
            said, lines = (str(answers[0]) if answers else raw_answer), [self.cfg.open_instruction]
            if not said:
                raise SampleError("bad_answer", f"{where}: empty answer", key)
        text = "\n".join([str(data["question"]).strip(), *lines])
        images: dict[str, bytes] = {}
        user = self._interleave(text, data, images, rel, where, key)
        thought = [(data.get("explanation") or "").strip(), self.cfg.answer_template.format(answer=said)]
        meta = {
            "id": sample_id,
            "source": "mmmu",
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": [{"type": "text", "text": "\n\n".join(t for t in thought if t)}]},
            ],
            "answer": raw_answer,
            "meta": {"subject": subject_of(sample_id),
                     **{name: data.get(name) for name in META_FIELDS if data.get(name) is not None}},
        }
        if qtype == "multiple-choice":
            meta["choices"] = list(options)
        return RawSample(key=key, meta=meta, images=images)

    def _interleave(self, text: str, data: dict, images: dict[str, bytes], rel: str, where: str,
                    key: str) -> list[dict]:
        """Text pieces and images at their `<image k>` placeholders."""
        items: list[dict] = []
        placed: set[str] = set()
        pos = 0
        for match in PLACEHOLDER.finditer(text):
            column = f"image_{match.group(1)}"
            if column in placed:
                continue  # keep the placeholder text; the image is shown where it first appears
            if text[pos : match.start()].strip():
                items.append({"type": "text", "text": text[pos : match.start()].strip()})
            pos = match.end()
            if column not in data:
                raise SampleError("missing_column", f"{where}: the text refers to <{match.group(0)[1:-1]}>, "
                                                    f"but the file has no column {column}", key)
            ref = f"img{len(images)}"
            images[ref] = convert_image(data[column], self.folder_of(rel), self.images, key, column)
            placed.add(column)
            items.append({"type": "image", "ref": ref})
        if text[pos:].strip():
            items.append({"type": "text", "text": text[pos:].strip()})
        return items
