"""Zebra-CoT (parquet, interleaved text-image reasoning traces) to mmlatent samples.

Each row has `Question`, `Text Reasoning Trace`, `Final Answer` and image columns `problem_image_N` and
`reasoning_image_N` (Hugging Face Image structs). Images are placed where the text names them,
`<image_start>[problem_image_1]<image_end>` or `<image_start>[reasoning_image_2]<image_end>`:
- the question becomes the user turn, with its images as question images (`img0`, `img1`, …);
- the trace becomes the assistant turn: reasoning images become auxiliary images (`aux0`, …) at their
  place in the text, a problem image referred to again is not repeated, and the answer closes the turn
  (`answer_template`).
Zebra-CoT has no observation spans, so its samples suit stage 1 (and stage 3 without the observation
weight); Monet-SFT's Zebra-CoT subsets carry the spans.

Skips, counted by reason: `missing_column` (the text refers to an image column the file does not have),
`missing_image` (the column is empty in this row), `bad_image` (undecodable), `no_answer`, `bad_record`.
A file without one of the three text columns is an error that names the column: the whole file is unusable.
The trade-off: images referred to nowhere in the text are dropped, since their place in the chat is unknown
(the dataset card promises a one-to-one mapping of placeholders and images).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from mmlatent.data.convert.common import Converter
from mmlatent.data.convert.images import convert_image
from mmlatent.data.convert.sources import SourceInfo, resolve_source
from mmlatent.data.sample import SampleError
from mmlatent.data.shard_writer import RawSample

REQUIRED_COLUMNS = ("Question", "Text Reasoning Trace", "Final Answer")
"""Text columns every Zebra-CoT parquet file has."""

IMAGE_REF = re.compile(r"<image_start>\s*\[((?:problem|reasoning)_image_\d+)\]\s*<image_end>")
"""An inline image placeholder; group 1 is the image column."""


@dataclass
class ZebraCoTConfig:
    """Which Zebra-CoT files to convert and how to phrase the answer."""

    source: str
    """A local folder laid out like the Hub repository (one folder of parquet files per category), a
    single parquet file, or a Hub id (`multimodal-reasoning-lab/Zebra-CoT`)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); the commit it resolves to is written to the manifest."""
    files: list[str] = field(default_factory=lambda: ["**/*.parquet"])
    """Glob patterns of the parquet files to read, relative to the source; e.g.
    `["2D Visual Reasoning - Visual Search/*.parquet"]` for one category."""
    answer_template: str = "The answer is {answer}."
    """Text that closes the assistant turn; `{answer}` is the row's `Final Answer`."""


class ZebraCoTConverter(Converter):
    name = "zebra_cot"
    config_class = ZebraCoTConfig

    def open(self) -> SourceInfo:
        self.source = resolve_source(self.cfg.source, self.cfg.revision, self.cfg.files)
        return self.source

    def total(self) -> int | None:
        return self.parquet_total()

    def records(self) -> Iterator[tuple[str, int, dict]]:
        return self.parquet_records(REQUIRED_COLUMNS, "a Zebra-CoT file")

    def convert(self, record: tuple[str, int, dict], key: str) -> RawSample:
        rel, row, data = record
        question, trace = data["Question"], data["Text Reasoning Trace"]
        if not isinstance(question, str) or not isinstance(trace, str):
            raise SampleError("bad_record", f"{rel}#{row}: Question and Text Reasoning Trace must be strings", key)
        answer = "" if data["Final Answer"] is None else str(data["Final Answer"]).strip()
        if not answer:
            raise SampleError("no_answer", f"{rel}#{row}: empty Final Answer", key)
        images: dict[str, bytes] = {}
        placed: dict[str, str] = {}  # image column -> ref, so an image is shown once
        user = self._items(question, "user", data, images, placed, rel, key)
        assistant = self._items(trace, "assistant", data, images, placed, rel, key)
        assistant.append({"type": "text", "text": self.cfg.answer_template.format(answer=answer)})
        meta = {
            "id": f"{rel}#{row}",
            "source": "zebra_cot",
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            "answer": answer,
            "meta": {"category": rel.split("/")[0] if "/" in rel else "", "file": rel, "row": row},
        }
        return RawSample(key=key, meta=meta, images=images)

    def _items(self, text: str, role: str, data: dict[str, Any], images: dict[str, bytes],
               placed: dict[str, str], rel: str, key: str) -> list[dict]:
        """Content items of `text`: text pieces and the images its placeholders name."""
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
                raise SampleError("missing_column", detail, key)
            aux = role == "assistant" and column.startswith("reasoning_image_")
            kind, prefix = ("aux_image", "aux") if aux else ("image", "img")
            ref = f"{prefix}{sum(r.startswith(prefix) for r in images)}"
            images[ref] = convert_image(data[column], self.folder_of(rel), self.images, key, column)
            placed[column] = ref
            items.append({"type": kind, "ref": ref})
        add_text(text[pos:])
        return items
