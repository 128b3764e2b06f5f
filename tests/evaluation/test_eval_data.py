"""Reading MMMU and ScienceQA parquet in the Hub layouts, and the prompts built from them.

The fixtures mirror the real files: MMMU in per-subject folders (MMMU/MMMU) and in one `data/` folder
(lmms-lab/MMMU), with `options` and open answers as stringified lists and `image_k` columns that are HF
Image structs or null; ScienceQA with an answer index, a hint, and an image or none, in `data/`
(derek-thomas/ScienceQA) and in config folders (lmms-lab/ScienceQA). One layout of each carries the HF
`Image` feature in the parquet metadata, the other a bare `{bytes, path}` struct.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmlatent.evaluation.tasks import load_eval_data

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(colour: tuple[int, int, int], size: int = 20) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def mmmu_rows(split: str) -> list[dict]:
    """Four questions over three subjects: MC with an image, open with a stringified answer list and a
    missing second image, MC whose options name images, open without images."""
    red, blue = png((255, 0, 0)), png((0, 0, 255), 24)
    rows = [
        dict(id=f"{split}_Accounting_1", question="What is <image 1> showing?", options="['cat', 'dog', 'bird']",
             answer="B", question_type="multiple-choice", image_1=red),
        dict(id=f"{split}_Accounting_2", question="Add <image 1> and <image 2>.", options="[]",
             answer="['1,000', '1000.5']", question_type="open", image_1=blue),
        dict(id=f"{split}_Art_1", question="Which picture is a copy?", options="['<image 1>', '<image 2>', 'neither', 'both']",
             answer="D", question_type="multiple-choice", image_1=red, image_2=blue),
        dict(id=f"{split}_Clinical_Medicine_1", question="What is the dose in mg?", options="[]", answer="2.5",
             question_type="open"),
    ]
    for r in rows:
        for k in range(1, 8):
            r.setdefault(f"image_{k}", None)
        r.update(explanation="", img_type="['Photos']", topic_difficulty="Easy", subfield="Some field")
    return rows


def write_hf(rows: list[dict], path: Path, image_columns: list[str]) -> None:
    """Parquet with the HF `Image` feature in its metadata (as `datasets` writes Hub files)."""
    import datasets

    features = {}
    for name, value in rows[0].items():
        if name in image_columns:
            features[name] = datasets.Image()
        elif name == "choices":
            features[name] = datasets.List(datasets.Value("string"))
        elif name == "answer" and isinstance(value, int):
            features[name] = datasets.Value("int64")
        else:
            features[name] = datasets.Value("string")
    ds = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


def write_struct(rows: list[dict], path: Path, image_columns: list[str]) -> None:
    """Plain parquet, images as a bare `{bytes, path}` struct column (no HF metadata)."""
    columns = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if name in image_columns:
            columns[name] = pa.array(values, type=IMAGE_STRUCT)
        else:
            columns[name] = pa.array(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


MMMU_IMAGES = [f"image_{k}" for k in range(1, 8)]


def write_mmmu(root: Path, layout: str, splits: tuple[str, ...] = ("dev", "validation")) -> Path:
    """MMMU in `subjects` layout (MMMU/MMMU, HF Image feature) or `data` layout (lmms-lab/MMMU, structs)."""
    for split in splits:
        rows = mmmu_rows(split)
        if layout == "subjects":
            for subject in ("Accounting", "Art", "Clinical_Medicine"):
                part = [r for r in rows if r["id"].split("_", 1)[1].rsplit("_", 1)[0] == subject]
                write_hf(part, root / subject / f"{split}-00000-of-00001.parquet", MMMU_IMAGES)
        else:
            write_struct(rows[:2], root / "data" / f"{split}-00000-of-00002.parquet", MMMU_IMAGES)
            write_struct(rows[2:], root / "data" / f"{split}-00001-of-00002.parquet", MMMU_IMAGES)
    return root


def scienceqa_rows() -> list[dict]:
    """Image only / hint only / neither / both, over the three subjects and both grade bands."""
    img = png((0, 200, 0))
    base = dict(task="closed choice", topic="t", category="c", skill="s", lecture="", solution="")
    rows = [
        dict(image=img, question="Which colour?", choices=["red", "green"], answer=1, hint="",
             subject="natural science", grade="grade3"),
        dict(image=None, question="Which is a state?", choices=["Ohio", "Paris", "Rome"], answer=0,
             hint="Look at the map.", subject="social science", grade="grade8"),
        dict(image=None, question="Which word is a noun?", choices=["run", "quick", "dog"], answer=2, hint="",
             subject="language science", grade="grade10"),
        dict(image=img, question="Which is warmer?", choices=["sun", "ice"], answer=0, hint="Two objects.",
             subject="natural science", grade="grade7"),
    ]
    return [{**r, **base} for r in rows]


def write_scienceqa(root: Path, layout: str) -> Path:
    """ScienceQA in `data` layout (derek-thomas, HF Image feature) or `configs` layout (lmms-lab, structs)."""
    rows = scienceqa_rows()
    if layout == "data":
        write_hf(rows, root / "data" / "test-00000-of-00001.parquet", ["image"])
        write_hf(rows[:2], root / "data" / "validation-00000-of-00001.parquet", ["image"])
    else:
        write_struct(rows, root / "ScienceQA-FULL" / "test-00000-of-00001.parquet", ["image"])
        write_struct([r for r in rows if r["image"]], root / "ScienceQA-IMG" / "test-00000-of-00001.parquet", ["image"])
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-datasets-cache"))


@pytest.mark.parametrize("layout", ["subjects", "data"])
def test_mmmu_questions_in_both_layouts(tmp_path, cache, layout):
    data = load_eval_data("mmmu", str(write_mmmu(tmp_path, layout)), "validation", cache_dir=cache)
    qs = {q.id: q for q in data.questions}
    assert sorted(qs) == sorted(r["id"] for r in mmmu_rows("validation"))  # no dev row leaks in

    q = qs["validation_Accounting_1"]
    assert q.question_type == "multiple-choice" and q.choices == ["cat", "dog", "bird"] and q.gold == "B"
    assert q.content == [
        "What is ", 0,
        " showing?\nA. cat\nB. dog\nC. bird\n\nAnswer with the option's letter from the given choices directly.",
    ]
    assert q.fields["subject"] == "Accounting" and q.fields["discipline"] == "Business"

    q = qs["validation_Accounting_2"]  # image 2 is missing: its tag stays text
    assert q.question_type == "open" and q.gold == ["1,000", "1000.5"] and q.choices == []
    assert q.content == ["Add ", 0, " and <image 2>.\n\nAnswer the question using a single word or phrase."]

    q = qs["validation_Art_1"]  # images named in the options sit there
    assert q.content[1] == 0 and q.content[3] == 1 and "B. " in q.content[2] and q.gold == "D"
    assert q.prompt_text().startswith("Which picture is a copy?\nA. <image 1>\nB. <image 2>\nC. neither")
    assert q.fields["discipline"] == "Art & Design"

    q = qs["validation_Clinical_Medicine_1"]
    assert q.image_slots == [] and q.gold == "2.5" and q.fields["discipline"] == "Health & Medicine"

    images = data.images(qs["validation_Art_1"])
    assert set(images) == {0, 1} and images[0].mode == "RGB"
    assert images[0].getpixel((0, 0)) == (255, 0, 0) and images[1].size == (24, 24)


def test_mmmu_dev_split_limit_and_img_subset(tmp_path, cache):
    root = str(write_mmmu(tmp_path, "data"))
    dev = load_eval_data("mmmu", root, "dev", limit=2, cache_dir=cache)
    assert [q.id for q in dev.questions] == ["dev_Accounting_1", "dev_Accounting_2"]
    img = load_eval_data("mmmu", root, "validation", subset="img", cache_dir=cache)
    assert "validation_Clinical_Medicine_1" not in {q.id for q in img.questions} and len(img.questions) == 3


def test_mmmu_hidden_test_answers_are_none(tmp_path, cache):
    rows = mmmu_rows("test")
    for r in rows:
        r["answer"] = "?"
    write_struct(rows, tmp_path / "data" / "test-00000-of-00001.parquet", MMMU_IMAGES)
    data = load_eval_data("mmmu", str(tmp_path), "test", cache_dir=cache)
    assert all(q.gold is None for q in data.questions)


@pytest.mark.parametrize("layout", ["data", "configs"])
def test_scienceqa_questions_in_both_layouts(tmp_path, cache, layout):
    root = str(write_scienceqa(tmp_path, layout))
    full = load_eval_data("scienceqa", root, "test", cache_dir=cache)
    assert [q.id for q in full.questions] == ["test_0", "test_1", "test_2", "test_3"]  # FULL config, not IMG too
    q0, q1, q2, q3 = full.questions
    assert q0.gold == "B" and q1.gold == "A" and q2.gold == "C"
    assert q0.content == [0, "Which colour?\nA. red\nB. green\nAnswer with the option's letter from the given choices directly."]
    assert q1.content == ["Context: Look at the map.\nWhich is a state?\nA. Ohio\nB. Paris\nC. Rome\n"
                          "Answer with the option's letter from the given choices directly."]
    flags = [(q.fields["has_text"], q.fields["has_image"], q.fields["no_context"]) for q in full.questions]
    assert flags == [(False, True, False), (True, False, False), (False, False, True), (True, True, False)]
    assert full.images(q3)[0].getpixel((1, 1)) == (0, 200, 0)

    img = load_eval_data("scienceqa", root, "test", subset="img", cache_dir=cache)
    assert [q.id for q in img.questions] == ["test_0", "test_3"]  # same ids as in the full set


def test_missing_split_and_bad_data_are_clear_errors(tmp_path, cache):
    root = str(write_scienceqa(tmp_path, "data"))
    with pytest.raises(ValueError, match="no parquet files for split 'train'"):
        load_eval_data("scienceqa", root, "train", cache_dir=cache)
    with pytest.raises(ValueError, match="neither an existing folder nor a Hub dataset id"):
        load_eval_data("scienceqa", str(tmp_path / "nope" / "deeper"), "test", cache_dir=cache)
    with pytest.raises(ValueError, match="unknown task"):
        load_eval_data("mathvista", root, "test", cache_dir=cache)


def test_hub_id_is_mirrored_then_read_like_a_folder(tmp_path, cache, monkeypatch):
    """A Hub id goes through `snapshot_download` (only the split's parquet files), then the local reader."""
    import fnmatch

    import huggingface_hub

    mirror = write_mmmu(tmp_path / "mirror", "subjects")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(mirror)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    data = load_eval_data("mmmu", None, None, limit=1, cache_dir=cache)  # defaults: MMMU/MMMU, validation
    assert data.data == "MMMU/MMMU" and data.split == "validation" and len(data.questions) == 1
    (repo_id, kwargs), = calls
    assert repo_id == "MMMU/MMMU" and kwargs["repo_type"] == "dataset"
    wanted = lambda name: any(fnmatch.fnmatch(name, p) for p in kwargs["allow_patterns"])  # noqa: E731
    assert wanted("Accounting/validation-00000-of-00001.parquet") and wanted("data/validation-00000-of-00002.parquet")
    assert not wanted("Accounting/dev-00000-of-00001.parquet") and not wanted("Accounting/test-00000-of-00001.parquet")
