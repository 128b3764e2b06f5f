"""ScienceQA parquet (derek-thomas/ScienceQA layout) to shards: the user turn (image, context, question,
options), lecture and solution as the chain of thought, the answer as a letter; bad rows counted; the training
prompt is the evaluation prompt, character for character."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmlatent.data.convert import ConvertOptions, ScienceQAConfig, convert
from tests.conftest import random_png as png, read_samples

CATEGORIES = ("task", "grade", "subject", "topic", "category", "skill")

KEY = "scienceqa-train-00000-of-00001"
"""Key prefix of the fixture's train file: keys are `scienceqa-<file>-<row>`."""


def write_scienceqa(path: Path, rows: list[dict], drop: tuple[str, ...] = ()) -> None:
    """A parquet file with the Hub's columns and `datasets`' schema metadata (image as an HF Image struct)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image as HFImage, Sequence, Value

    spec = {"image": HFImage(), "question": Value("string"), "choices": Sequence(Value("string")),
            "answer": Value("int64"), "hint": Value("string"), **{c: Value("string") for c in CATEGORIES},
            "lecture": Value("string"), "solution": Value("string")}
    features = Features({k: v for k, v in spec.items() if k not in drop})
    data = {c: [r.get(c) for r in rows] for c in features}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(data, schema=features.arrow_schema), path)


def sqa(question: str, choices: list[str], answer: int, image=None, hint="", lecture="", solution="") -> dict:
    return {"image": image, "question": question, "choices": choices, "answer": answer, "hint": hint,
            "lecture": lecture, "solution": solution, "task": "closed choice", "grade": "grade4",
            "subject": "natural science", "topic": "physics", "category": "Velocity", "skill": "Compare speeds"}


@pytest.fixture()
def scienceqa_root(tmp_path) -> Path:
    root = tmp_path / "ScienceQA"
    train = [
        sqa("Which is faster?", ["the car", "the snail"], 0, image={"bytes": png(1), "path": None},
            hint="A car and a snail race.", lecture="Speed is distance over time.",
            solution="The car covers more ground."),
        sqa("Which word is a noun?", ["run", "dog", "blue"], 1, solution="A dog is a thing."),
        sqa("Out of range answer?", ["yes", "no"], 2),
        sqa("Broken image?", ["yes", "no"], 0, image={"bytes": b"\x89PNG broken", "path": None}),
        sqa("Image file gone?", ["yes", "no"], 0, image={"bytes": None, "path": "images/gone.png"}),
    ]
    write_scienceqa(root / "data" / "train-00000-of-00001.parquet", train)
    write_scienceqa(root / "data" / "validation-00000-of-00001.parquet", [sqa("Val?", ["a", "b"], 1)])
    return root


def test_train_split_becomes_letter_answer_sft_samples(scienceqa_root, tmp_path):
    out = tmp_path / "train"
    manifest = convert("scienceqa", ScienceQAConfig(source=str(scienceqa_root), split="train"), str(out),
                       ConvertOptions(image_format="png", workers=0, progress=False))
    assert [f["path"] for f in manifest["source"]["files"]] == ["data/train-00000-of-00001.parquet"]
    assert manifest["written"] == 2
    assert manifest["skipped"] == {"bad_answer": 1, "bad_image": 1, "missing_image_file": 1}
    samples = read_samples(out)
    first = samples[f"{KEY}-0"]
    meta = first["json"]
    assert meta["answer"] == "A" and meta["choices"] == ["the car", "the snail"] and meta["source"] == "scienceqa"
    assert meta["messages"][0]["content"] == [
        {"type": "image", "ref": "img0"},
        {"type": "text", "text": "Context: A car and a snail race.\nWhich is faster?\nA. the car\nB. the snail\n"
                                 "Answer with the option's letter from the given choices directly."},
    ]
    assert meta["messages"][1]["content"] == [{"type": "text", "text": "Speed is distance over time.\n\n"
                                               "The car covers more ground.\n\nThe answer is A."}]
    assert meta["meta"] == {"task": "closed choice", "grade": "grade4", "subject": "natural science",
                            "topic": "physics", "category": "Velocity", "skill": "Compare speeds"}
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first["img0.png"]))),
                          np.asarray(Image.open(io.BytesIO(png(1)))))
    text_only = samples[f"{KEY}-1"]["json"]
    assert text_only["answer"] == "B" and set(samples[f"{KEY}-1"]) == {"json"}
    assert text_only["messages"][0]["content"][0]["text"].startswith("Which word is a noun?\nA. run\nB. dog\nC. blue")
    assert text_only["messages"][1]["content"][0]["text"] == "A dog is a thing.\n\nThe answer is B."


def test_validation_split_and_image_only(scienceqa_root, tmp_path):
    val = convert("scienceqa", ScienceQAConfig(source=str(scienceqa_root), split="validation"), str(tmp_path / "v"),
                  ConvertOptions(workers=0, progress=False))
    assert val["written"] == 1 and val["skipped"] == {}
    only = convert("scienceqa", ScienceQAConfig(source=str(scienceqa_root), image_only=True), str(tmp_path / "i"),
                   ConvertOptions(workers=0, progress=False))
    assert only["written"] == 1 and only["skipped"]["no_image"] == 1


def test_missing_required_column_is_an_error_naming_it(tmp_path):
    write_scienceqa(tmp_path / "s" / "data" / "train-0.parquet", [sqa("q", ["a", "b"], 0)], drop=("answer",))
    with pytest.raises(ValueError, match="no column 'answer'"):
        convert("scienceqa", ScienceQAConfig(source=str(tmp_path / "s")), str(tmp_path / "out"),
                ConvertOptions(workers=0, progress=False))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        convert("scienceqa", ScienceQAConfig(source=str(tmp_path / "s"), split="test"), str(tmp_path / "out"),
                ConvertOptions(workers=0, progress=False))


def test_training_prompt_is_the_evaluation_prompt(scienceqa_root, tmp_path):
    """The user turn a converted train question carries is what `mmlatent eval` would prompt with."""
    from mmlatent.evaluation.tasks import load_eval_data

    out = tmp_path / "train"
    convert("scienceqa", ScienceQAConfig(source=str(scienceqa_root), split="train"), str(out),
            ConvertOptions(workers=0, progress=False))
    samples = read_samples(out)
    data = load_eval_data("scienceqa", str(scienceqa_root), "train")
    questions = {q.row: q for q in data.questions}
    for row in (0, 1):  # with an image and a context; text only
        converted = samples[f"{KEY}-{row}"]["json"]["messages"][0]["content"]
        as_eval = [{"type": "image", "ref": f"img{k}"} if isinstance(k, int) else {"type": "text", "text": k}
                   for k in questions[row].content]
        assert converted == as_eval
