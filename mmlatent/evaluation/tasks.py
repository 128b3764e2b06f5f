"""The registry of benchmarks and the loaded form of one split: questions plus lazy access to their images.

`load_eval_data("mmmu", "MMMU/MMMU", "validation")` finds the split's files (`sources`), lets the task pick
the ones to read, reads the text columns once to build the `Question`s, and keeps the dataset to decode a
question's images when a batch needs them. `shards` and `synthetic` read mmlatent's own shards instead
(`shards.py`). Tasks are looked up by exact name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from mmlatent.evaluation.mmmu import MMMUTask
from mmlatent.evaluation.question import Question, Task
from mmlatent.evaluation.scienceqa import ScienceQATask
from mmlatent.evaluation.shards import ShardsTask, SyntheticTask
from mmlatent.evaluation.parquet_splits import image_presence, open_image, read_parquet, resolve_root, split_files

TASKS: dict[str, type[Task]] = {t.name: t for t in (MMMUTask, ScienceQATask, ShardsTask, SyntheticTask)}
"""Benchmarks by `--task` name."""


def get_task(name: str, subset: str = "full", protocol: str | None = None) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](subset, protocol)


class ImageSource(Protocol):
    """Where a split's images are read from when a batch needs them."""

    def images(self, question: Question) -> dict[int, Image.Image]:
        """Decoded RGB images of `question`, by image number."""


@dataclass
class ParquetImages:
    """Images in a parquet split's image columns, decoded per question."""

    root: Path
    """Local root folder of the files (relative image paths resolve against it)."""
    image_data: Any
    """The split's image columns as a `datasets.Dataset` (undecoded), indexed by `Question.row`."""
    image_columns: tuple[str, ...]
    """The columns, in image-number order."""

    def images(self, question: Question) -> dict[int, Image.Image]:
        row = self.image_data[question.row]
        out = {}
        for k in set(question.image_slots):
            image = open_image(row[self.image_columns[k]], self.root)
            if image is None:
                raise ValueError(f"question {question.id}: image {k + 1} is missing")
            out[k] = image
        return out


@dataclass
class EvalData:
    """One split of one benchmark, ready to evaluate."""

    task: Task
    """The benchmark (prompt format, breakdown)."""
    data: str
    """Where it was read from (Hub id or folder), for the results file."""
    split: str
    """The split read."""
    image_source: ImageSource
    """Where the questions' images are read from (parquet columns, or shard members)."""
    questions: list[Question]
    """Questions in dataset order (after the subset and `limit`)."""

    def images(self, question: Question) -> dict[int, Image.Image]:
        """Decoded RGB images of `question`, by image number."""
        return self.image_source.images(question)

    def by_id(self) -> dict[str, Question]:
        return {q.id: q for q in self.questions}


def load_eval_data(
    task: str,
    data: str | None = None,
    split: str | None = None,
    subset: str = "full",
    limit: int | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    protocol: str | None = None,
    allow_partial: bool = False,
) -> EvalData:
    """Read a benchmark split. `data`/`split` default to the task's Hub id and usual split; `limit` keeps
    the first N questions (after the subset); `protocol` names the scorer (default: the task's first);
    `allow_partial` reads a shard set that may be partial."""
    t = get_task(task, subset, protocol)
    data = data or t.default_data
    split = split or t.default_split
    if isinstance(t, ShardsTask):
        questions, images = t.read(data, limit, allow_partial)
        return EvalData(task=t, data=data, split=split, image_source=images, questions=questions)
    root = resolve_root(data, split, revision)
    groups = split_files(root, split)
    if not groups:
        raise ValueError(f"no parquet files for split {split!r} under {root} (looked for {split}-*.parquet)")
    ds = read_parquet(t.select_files(groups), t.image_columns, cache_dir)
    present = [image_presence(ds, c) for c in t.image_columns]  # (columns, rows)
    text_columns = [c for c in ds.column_names if c not in t.image_columns]
    rows = ds.select_columns(text_columns).to_list()
    questions = t.questions(rows, [list(p) for p in zip(*present)], split)
    if limit is not None:
        questions = questions[:limit]
    image_data = ds.select_columns([c for c in t.image_columns if c in ds.column_names])
    images = ParquetImages(root=root, image_data=image_data, image_columns=t.image_columns)
    return EvalData(task=t, data=data, split=split, image_source=images, questions=questions)
