"""Evaluating on mmlatent's own shards: the synthetic held-out split, or any converted multiple-choice set.

Each sample's turns before the assistant's become the question (its system turn as the question's
`system`, the user turn's text and question images in order, so the prompt is exactly the training
prompt), its `choices` the options and its `answer` the gold letter; the
answer is parsed by the same MMMU parser as the benchmarks. Shards are read with the training pipeline's
own reader and validation (`decode_samples`), so a damaged shard is counted, not fatal. Only the question
images are kept in memory (aux images are the reasoning's, not the question's).

`shards` breaks results down by the samples' `source`; `synthetic` also by the task kind and the number
of hops in `meta`, the two things the synthetic task's difficulty is made of.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any, ClassVar

from PIL import Image

from mmlatent.data.pipeline import decode_samples
from mmlatent.data.shards import expand_shards
from mmlatent.data.skips import SkipCounter
from mmlatent.data.tar_reader import shard_samples
from mmlatent.evaluation.metrics import overall, tally
from mmlatent.evaluation.question import Question, Task


@dataclass
class ShardImages:
    """The question images of shard samples, by question id and image number."""

    by_id: dict[str, dict[int, Image.Image]]

    def images(self, question: Question) -> dict[int, Image.Image]:
        return self.by_id[question.id]


def question_of(sample: dict) -> tuple[Question, dict[int, Image.Image]]:
    """A decoded sample (`{"key", "meta", "images"}`) as a `Question` and its images by number."""
    meta = sample["meta"]
    content: list[str | int] = []
    images: dict[int, Image.Image] = {}
    system: list[str] = []
    for message in meta["messages"]:
        if message["role"] == "assistant":
            break
        if message["role"] == "system":
            system += [item["text"] for item in message["content"] if item["type"] == "text"]
            continue
        for item in message["content"]:
            if item["type"] == "text":
                content.append(item["text"])
            else:
                k = len(images)
                images[k] = sample["images"][item["ref"]]
                content.append(k)
    choices = [str(c) for c in meta.get("choices") or []]
    extra = meta.get("meta") or {}
    fields = {"source": meta.get("source", ""), **{k: extra[k] for k in ("task", "hops", "path") if k in extra}}
    question = Question(
        id=sample["key"], row=0, content=content, question_type="multiple-choice" if choices else "open",
        choices=choices, gold=str(meta["answer"]), fields=fields, system="".join(system) if system else None,
    )
    return question, images


class ShardsTask(Task):
    """mmlatent shards as a benchmark (`--data` is a shard folder or pattern)."""

    name: ClassVar[str] = "shards"
    default_data: ClassVar[str] = "data/synth/val"
    default_split: ClassVar[str] = "shards"
    image_columns: ClassVar[tuple[str, ...]] = ()

    def read(self, data: str, limit: int | None = None, allow_partial: bool = False) -> tuple[list[Question], ShardImages]:
        """The questions of the shards at `data` (in shard order) and their images; a partial shard set is an
        error unless `allow_partial` (`expand_shards`), and so is a sample key seen twice."""
        counter = SkipCounter()
        raw = (s for url in expand_shards(data, "--data", allow_partial) for s in shard_samples(url))
        decoded = decode_samples(raw, counter)
        questions, images, where = [], {}, {}
        for sample in islice(decoded, limit):
            q, imgs = question_of(sample)
            if q.id in where:
                raise ValueError(f"sample key {q.id!r} appears twice: {where[q.id]} and {sample['url']}; every question "
                                 f"needs its own key")
            where[q.id] = sample["url"]
            if self.subset == "img" and not imgs:
                continue
            questions.append(q)
            images[q.id] = imgs
        return questions, ShardImages(images)

    def questions(self, rows: list[dict[str, Any]], present: list[list[bool]], split: str) -> list[Question]:
        """Decoded samples -> questions (the parquet path's entry point; shards go through `read`)."""
        return [question_of(row)[0] for row in rows]

    def breakdown(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        sources = tally(records, lambda r: (str(r.get("source", "")),))
        return {"overall": overall(records).as_dict(), "sources": {k: v.as_dict() for k, v in sorted(sources.items())}}


class SyntheticTask(ShardsTask):
    """The synthetic reasoning set's shards, broken down by task kind and hops."""

    name: ClassVar[str] = "synthetic"

    def breakdown(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        kinds = tally(records, lambda r: [str(r["task"])] if "task" in r else [])
        hops = tally(records, lambda r: [str(r["hops"])] if "hops" in r else [])
        return {
            **super().breakdown(records),
            "tasks": {k: v.as_dict() for k, v in sorted(kinds.items())},
            "hops": {k: v.as_dict() for k, v in sorted(hops.items(), key=lambda kv: int(kv[0]))},
        }
