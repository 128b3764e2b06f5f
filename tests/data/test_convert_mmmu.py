"""MMMU dev parquet (MMMU/MMMU per-subject folders) to shards: images interleaved at their `<image k>`
placeholders, stringified options parsed, explanation as the chain of thought; bad rows counted; the training
prompt is the evaluation prompt, character for character."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmlatent.data.convert import ConvertOptions, MMMUConfig, convert
from mmlatent.benchmark_prompts import parse_options, subject_of
from tests.conftest import read_samples

IMAGE_COLUMNS = [f"image_{k}" for k in range(1, 8)]


def img(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    return {"bytes": buf.getvalue(), "path": None}


def write_mmmu(path: Path, rows: list[dict]) -> None:
    """A parquet file with the Hub's columns and `datasets`' schema metadata (images as HF Image structs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image as HFImage, Value

    text = ["id", "question", "options", "explanation"]
    tail = ["img_type", "answer", "topic_difficulty", "question_type", "subfield"]
    features = Features({**{c: Value("string") for c in text}, **{c: HFImage() for c in IMAGE_COLUMNS},
                         **{c: Value("string") for c in tail}})
    data = {c: [r.get(c) for r in rows] for c in features}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(data, schema=features.arrow_schema), path)


def mmmu(id_: str, question: str, options: str, answer: str, qtype="multiple-choice", explanation="", **images) -> dict:
    return {"id": id_, "question": question, "options": options, "answer": answer, "question_type": qtype,
            "explanation": explanation, "img_type": "['Diagrams']", "topic_difficulty": "Easy",
            "subfield": "Financial Accounting", **images}


@pytest.fixture()
def mmmu_root(tmp_path) -> Path:
    root = tmp_path / "MMMU"
    dev = [
        mmmu("dev_Accounting_1", "<image 1> What is the balance?", "['$6', '<image 2>', '$8', '$9']", "B",
             explanation="Add the rows of <image 1>.", image_1=img(1), image_2=img(2)),
        mmmu("dev_Accounting_2", "How many years?", "[]", "12", qtype="open"),
        mmmu("dev_Accounting_3", "Which <image 2>?", "['a', 'b']", "A", image_1=img(3)),           # image_2 empty
        mmmu("dev_Accounting_4", "Options broken?", "not a list", "A"),
        mmmu("dev_Accounting_5", "Letter out of range?", "['a', 'b']", "E"),
        mmmu("dev_Accounting_6", "See <image 8>.", "['a', 'b']", "A"),                              # no image_8 column
        mmmu("dev_Accounting_7", "Rate?", "[]", "['24/7', '3.429']", qtype="open"),
    ]
    write_mmmu(root / "Accounting" / "dev-00000-of-00001.parquet", dev)
    write_mmmu(root / "Accounting" / "validation-00000-of-00001.parquet",
               [mmmu("validation_Accounting_1", "v?", "['a', 'b']", "A")])
    write_mmmu(root / "Art_Theory" / "dev-00000-of-00001.parquet",
               [mmmu("dev_Art_Theory_1", "<image 1> and again <image 1>: which style?", "['Baroque', 'Gothic']", "B",
                     image_1=img(4))])
    return root


def test_dev_split_interleaves_images_and_counts_bad_rows(mmmu_root, tmp_path):
    out = tmp_path / "dev"
    manifest = convert("mmmu", MMMUConfig(source=str(mmmu_root)), str(out), ConvertOptions(workers=0, progress=False))
    assert [f["path"] for f in manifest["source"]["files"]] == ["Accounting/dev-00000-of-00001.parquet",
                                                                "Art_Theory/dev-00000-of-00001.parquet"]
    assert manifest["skipped"] == {"bad_answer": 1, "bad_options": 1, "missing_column": 1, "missing_image": 1}
    assert manifest["written"] == 4
    samples = read_samples(out)
    first = samples["mmmu-dev_Accounting_1"]["json"]
    assert first["id"] == "dev_Accounting_1" and first["answer"] == "B"
    assert first["choices"] == ["$6", "<image 2>", "$8", "$9"]
    assert first["messages"][0]["content"] == [
        {"type": "image", "ref": "img0"},
        {"type": "text", "text": " What is the balance?\nA. $6\nB. "},
        {"type": "image", "ref": "img1"},
        {"type": "text", "text": "\nC. $8\nD. $9\n\nAnswer with the option's letter from the given choices directly."},
    ]
    assert first["messages"][1]["content"] == [
        {"type": "text", "text": "Add the rows of <image 1>.\n\nThe answer is B."}]
    assert first["meta"] == {"subject": "Accounting", "subfield": "Financial Accounting", "img_type": "['Diagrams']",
                             "topic_difficulty": "Easy", "question_type": "multiple-choice"}
    assert sorted(samples["mmmu-dev_Accounting_1"]) == ["img0.jpeg", "img1.jpeg", "json"]

    open_q = samples["mmmu-dev_Accounting_2"]["json"]
    assert open_q["answer"] == "12" and "choices" not in open_q
    assert open_q["messages"][0]["content"] == [
        {"type": "text", "text": "How many years?\n\nAnswer the question using a single word or phrase."}]
    assert open_q["messages"][1]["content"][0]["text"] == "The answer is 12."
    listed = samples["mmmu-dev_Accounting_7"]["json"]
    assert listed["answer"] == "['24/7', '3.429']"
    assert listed["messages"][1]["content"][0]["text"] == "The answer is 24/7."

    art = samples["mmmu-dev_Art_Theory_1"]["json"]  # an image named twice is shown once, at its first place
    assert [it["type"] for it in art["messages"][0]["content"]] == ["image", "text"]
    assert art["messages"][0]["content"][1]["text"].startswith(" and again <image 1>: which style?")


def test_subject_filter_and_open_questions_off(mmmu_root, tmp_path):
    art = convert("mmmu", MMMUConfig(source=str(mmmu_root), subjects=["Art_Theory"]), str(tmp_path / "art"),
                  ConvertOptions(workers=0, progress=False))
    assert art["written"] == 1
    assert [f["path"] for f in art["source"]["files"]] == ["Art_Theory/dev-00000-of-00001.parquet"]
    mc = convert("mmmu", MMMUConfig(source=str(mmmu_root), include_open=False), str(tmp_path / "mc"),
                 ConvertOptions(workers=0, progress=False))
    assert mc["written"] == 2 and mc["skipped"]["open_question"] == 2


def test_helpers():
    assert parse_options("['a', \"b's\"]") == ["a", "b's"] and parse_options(["x"]) == ["x"]
    for bad in ("not a list", "{'a': 1}"):
        with pytest.raises(ValueError):
            parse_options(bad)
    assert subject_of("dev_Art_Theory_3") == "Art_Theory" and subject_of("x") == ""


def test_training_prompt_is_the_evaluation_prompt(tmp_path):
    """Item by item and character for character, the user turn of a converted dev question is the prompt
    `mmlatent eval` builds from the same row (MMMU's blank line before the instruction included)."""
    from mmlatent.evaluation.tasks import load_eval_data

    root = tmp_path / "MMMU"
    write_mmmu(root / "Accounting" / "dev-00000-of-00001.parquet", [
        mmmu("dev_Accounting_1", "<image 1> What is the balance?", "['$6', '<image 2>', '$8', '$9']", "B",
             image_1=img(1), image_2=img(2)),
        mmmu("dev_Accounting_2", "  How many years? ", "[]", "12", qtype="open"),
        mmmu("dev_Accounting_3", "Unnamed image first?", "['a', 'b']", "A", image_1=img(3)),
        mmmu("dev_Accounting_4", "<image 1> twice: <image 1>?", "['a', 'b']", "B", image_1=img(4)),
    ])
    out = tmp_path / "dev"
    convert("mmmu", MMMUConfig(source=str(root)), str(out), ConvertOptions(workers=0, progress=False))
    samples = read_samples(out)
    questions = {q.id: q for q in load_eval_data("mmmu", str(root), "dev").questions}
    compared = 0
    for key, sample in samples.items():
        question = questions[sample["json"]["id"]]
        refs = iter(it["ref"] for it in sample["json"]["messages"][0]["content"] if it["type"] == "image")
        as_eval = [{"type": "image", "ref": next(refs)} if isinstance(k, int) else {"type": "text", "text": k}
                   for k in question.content]
        assert sample["json"]["messages"][0]["content"] == as_eval, key
        assert "".join(it.get("text", "") for it in as_eval).endswith(
            ("\n\nAnswer with the option's letter from the given choices directly.",
             "\n\nAnswer the question using a single word or phrase."))
        compared += 1
    assert compared == 4
