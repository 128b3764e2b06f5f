"""Zebra-CoT (parquet, interleaved text-image reasoning traces) to mmlatent samples.

Each row has `Question`, `Text Reasoning Trace`, `Final Answer` and image columns `problem_image_N` and
`reasoning_image_N` (Hugging Face Image structs); the categories (one folder of parquet files each) have
different sets of image columns. Images are placed where the text names them,
`<image_start>[problem_image_1]<image_end>` or `<image_start>[reasoning_image_2]<image_end>`:
- the question becomes the user turn, with its images as question images (`img0`, `img1`, …);
- the trace becomes the assistant turn: reasoning images become auxiliary images (`aux0`, …) at their
  place in the text, a problem image referred to again is not repeated, and `answer_template` with the raw
  `Final Answer` closes the turn on a line of its own.
- Every image has a newline on each side where text touches it, as SkiLa's Zebra-CoT reader puts one, so
  text stays separated when a layout drops the aux images (`…known angles.\\n\\nTHOUGHT 1: Extend…`).
- Observation spans (`observations`): Zebra-CoT has none, but stage 1 weights observation tokens and
  stage 2 aligns at them. `first_sentence` wraps the first sentence after each reasoning image (after its
  `THOUGHT n:` label), the text that reads the image, in `<observation>…</observation>`; a trace that
  already holds observation tags keeps its own. `none` adds no spans.
- The sample's `answer` is `Final Answer` normalised (`answers.normalize_answer`: `$\\boxed{70^\\circ}$` ->
  `70^\\circ`); `meta.category` is the folder of the parquet file, also for a single-file source.
Sample keys are `zebra_cot-<category>-<parquet file>-<row>`, unique across categories converted apart.

Skips, counted by reason and listed in `skips.jsonl`: `missing_column` (the text refers to an image column
the file does not have), `missing_image` (the column is empty in this row), `bad_image` (undecodable),
`no_answer`, `bad_record`. A file without one of the three text columns is an error that names the column:
the whole file is unusable. The trade-off: images referred to nowhere in the text are dropped, since their
place in the chat is unknown (the dataset card promises a one-to-one mapping of placeholders and images).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Iterator, Literal

from mmlatent.data.convert.answers import normalize_answer
from mmlatent.data.convert.common import Converter, Record, make_key
from mmlatent.data.convert.images import convert_image
from mmlatent.data.convert.input_files import SourceInfo, resolve_source
from mmlatent.data.sample import OBSERVATION_CLOSE, OBSERVATION_OPEN, SampleError
from mmlatent.data.shard_writer import RawSample

REQUIRED_COLUMNS = ("Question", "Text Reasoning Trace", "Final Answer")
"""Text columns every Zebra-CoT parquet file has."""

IMAGE_REF = re.compile(r"<image_start>\s*\[((?:problem|reasoning)_image_\d+)\]\s*<image_end>")
"""An inline image placeholder; group 1 is the image column."""

STEP_LABEL = re.compile(r"^THOUGHT\s*\d+\s*:\s*")
"""The label a reasoning step starts with (`THOUGHT 2: `); the observation span starts after it."""

SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
"""Where the first sentence of a step ends (the mark is kept in the sentence; a newline is not)."""


@dataclass
class ZebraCoTConfig:
    """Which Zebra-CoT files to convert, how to phrase the answer and where observation spans go."""

    source: str
    """A local folder laid out like the Hub repository (one folder of parquet files per category), a
    single parquet file, or a Hub id (`multimodal-reasoning-lab/Zebra-CoT`)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); the commit it resolves to is written to the manifest."""
    files: list[str] = field(default_factory=lambda: ["**/*.parquet"])
    """Glob patterns of the parquet files to read, relative to the source; e.g.
    `["2D Visual Reasoning - Visual Search/*.parquet"]` for one category."""
    answer_template: str = "The answer is {answer}."
    """Text that closes the assistant turn, on its own line; `{answer}` is the row's `Final Answer` as written."""
    observations: Literal["first_sentence", "none"] = "first_sentence"
    """Observation spans: `first_sentence` wraps the first sentence after each reasoning image (after its
    `THOUGHT n:` label); `none` adds none. A trace with observation tags of its own is kept as it is."""


class ZebraCoTConverter(Converter):
    name = "zebra_cot"
    config_class = ZebraCoTConfig

    def open(self) -> SourceInfo:
        self.source = resolve_source(self.cfg.source, self.cfg.revision, self.cfg.files)
        return self.source

    def total(self) -> int | None:
        return self.parquet_total()

    def records(self) -> Iterator[Record]:
        return self.parquet_records(REQUIRED_COLUMNS, "a Zebra-CoT file")

    def key(self, record: Record) -> str:
        return make_key(self.name, self.folder_name(record.file), PurePosixPath(record.file).stem, record.row)

    def convert(self, record: Record, key: str) -> RawSample:
        rel, row, data = record
        question, trace = data["Question"], data["Text Reasoning Trace"]
        if not isinstance(question, str) or not isinstance(trace, str):
            raise SampleError("bad_record", f"{rel}#{row}: Question and Text Reasoning Trace must be strings", key)
        raw_answer = "" if data["Final Answer"] is None else str(data["Final Answer"]).strip()
        answer = normalize_answer(raw_answer)
        if not answer:
            raise SampleError("no_answer", f"{rel}#{row}: empty Final Answer", key, "Final Answer")
        images: dict[str, bytes] = {}
        placed: dict[str, str] = {}  # image column -> ref, so an image is shown once
        user = self._items(question, "user", data, images, placed, rel, key)
        assistant = self._items(trace, "assistant", data, images, placed, rel, key)
        if self.cfg.observations == "first_sentence" and OBSERVATION_OPEN not in trace:
            assistant = _observe_after_images(assistant)
        assistant.append({"type": "text", "text": self.cfg.answer_template.format(answer=raw_answer)})
        meta = {
            "id": f"{rel}#{row}",
            "source": "zebra_cot",
            "messages": [{"role": "user", "content": _separate(user)},
                         {"role": "assistant", "content": _separate(assistant)}],
            "answer": answer,
            "meta": {"category": self.folder_name(rel), "file": rel, "row": row},
        }
        return RawSample(key=key, meta=meta, images=images)

    def _items(self, text: str, role: str, data: dict[str, Any], images: dict[str, bytes],
               placed: dict[str, str], rel: str, key: str) -> list[dict]:
        """Content items of `text`: its text pieces (stripped) and the images its placeholders name."""
        items: list[dict] = []

        def add_text(piece: str) -> None:
            if piece.strip():
                items.append({"type": "text", "text": piece.strip()})

        pos = 0
        for match in IMAGE_REF.finditer(text):
            add_text(text[pos : match.start()])
            pos = match.end()
            column = match.group(1)
            if column in placed:
                continue  # shown already (a problem image the trace points back to)
            if column not in data:
                detail = f"{rel}: the text refers to [{column}], a column the file lacks"
                raise SampleError("missing_column", detail, key, column)
            aux = role == "assistant" and column.startswith("reasoning_image_")
            kind, prefix = ("aux_image", "aux") if aux else ("image", "img")
            ref = f"{prefix}{sum(r.startswith(prefix) for r in images)}"
            images[ref] = convert_image(data[column], self.folder_of(rel), self.images, key, column)
            placed[column] = ref
            items.append({"type": kind, "ref": ref})
        add_text(text[pos:])
        return items


def observe_first_sentence(text: str) -> str:
    """`text` with its first sentence (after a `THOUGHT n:` label) wrapped in observation tags."""
    label = STEP_LABEL.match(text)
    head, body = (text[: label.end()], text[label.end() :]) if label else ("", text)
    end = SENTENCE_END.search(body)
    cut = len(body) if end is None else end.end() if end.group() != "\n" else end.start()
    sentence = body[:cut].rstrip()
    if not sentence:
        return text
    return f"{head}{OBSERVATION_OPEN}{sentence}{OBSERVATION_CLOSE}{body[len(sentence):]}"


def _observe_after_images(items: list[dict]) -> list[dict]:
    """The first sentence of each text item right after an aux image becomes an observation span."""
    return [
        {"type": "text", "text": observe_first_sentence(it["text"])}
        if it["type"] == "text" and i > 0 and items[i - 1]["type"] == "aux_image" else it
        for i, it in enumerate(items)
    ]


def _separate(items: list[dict]) -> list[dict]:
    """A newline on each side of every image where text touches it, and between two text items."""
    out = []
    for i, it in enumerate(items):
        if it["type"] == "text":
            text = it["text"]
            if i > 0:
                text = "\n" + text  # after an image, or after the previous text item (the answer line)
            if i + 1 < len(items) and items[i + 1]["type"] != "text":
                text += "\n"
            it = {"type": "text", "text": text}
        out.append(it)
    return out
