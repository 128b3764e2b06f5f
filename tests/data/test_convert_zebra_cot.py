"""Zebra-CoT parquet (HF Image structs) to shards: placement of problem and reasoning images, skips by
reason, a clear error for a missing text column, resumption to identical bytes, parallel workers giving
the same bytes, and a few stage-1 steps of the tiny model on the result."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mmlatent.data.convert import ConvertOptions, ZebraCoTConfig, convert
from mmlatent.data.convert.zebra_cot import ZebraCoTConverter
from tests.conftest import random_png as png, read_samples

TEXT_COLUMNS = ("Question", "Text Reasoning Trace", "Final Answer")

PHYSICS = "zebra_cot-Scientific_Reasoning_-_Physics-train-00000-of-00001"
JIGSAW = "zebra_cot-2D_Visual_Reasoning_-_Visual_Jigsaw-train-00000-of-00001"
"""Key prefixes of the fixture's two files: keys are `zebra_cot-<category>-<file>-<row>`."""


def struct(seed: int, size=(32, 24)) -> dict:
    return {"bytes": png(seed, size), "path": None}


def P(n: int) -> str:
    return f"<image_start>[problem_image_{n}]<image_end>"


def R(n: int) -> str:
    return f"<image_start>[reasoning_image_{n}]<image_end>"


def write_zebra(path: Path, rows: list[dict], image_columns: list[str], text_columns=TEXT_COLUMNS) -> None:
    """A parquet file as the Hub has it: text columns and HF Image columns, with `datasets`' schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image as HFImage, Value

    features = Features({**{c: Value("string") for c in text_columns}, **{c: HFImage() for c in image_columns}})
    data = {c: [r.get(c) for r in rows] for c in [*text_columns, *image_columns]}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(data, schema=features.arrow_schema), path)


def row(question: str, trace: str, answer: str = "B", **images) -> dict:
    return {"Question": question, "Text Reasoning Trace": trace, "Final Answer": answer, **images}


TRACE = (f"THOUGHT 0: Sketch the known angles. {R(1)} THOUGHT 1: The path turns left at the fork. Look again. "
         f"{R(2)} THOUGHT 2: It ends at the top.")
"""A trace as Zebra-CoT writes it: steps labelled `THOUGHT n:`, images between them, no observation tags."""


def good_rows(n: int, offset: int = 0) -> list[dict]:
    return [row(f"{P(1)} Puzzle {offset + i}: which way?", TRACE,
                "ABCD"[i % 4], problem_image_1=struct(offset + 3 * i), reasoning_image_1=struct(offset + 3 * i + 1),
                reasoning_image_2=struct(offset + 3 * i + 2))
            for i in range(n)]


@pytest.fixture()
def zebra_root(tmp_path) -> Path:
    root = tmp_path / "Zebra-CoT"
    cols = ["problem_image_1", "reasoning_image_1", "reasoning_image_2"]
    rows = [
        *good_rows(2),
        row("No picture here.", f"THOUGHT 0: {R(1)} so C.", "C", reasoning_image_1=struct(50)),
        row(f"{P(1)} big", f"{R(1)} and {P(1)} again", "D", problem_image_1=struct(51, (300, 200)),
            reasoning_image_1=struct(52)),
        row("q", f"{R(1)} {R(2)}", reasoning_image_1=struct(53)),                       # reasoning_image_2 empty
        row("q", f"THOUGHT 0: {R(3)}", reasoning_image_1=struct(54)),                   # no such column
        row("q", f"{R(1)} x", reasoning_image_1={"bytes": b"not an image", "path": None}),
        row("q", f"<observation>opened {R(1)} never closed", reasoning_image_1=struct(55)),
        row("q", f"{R(1)} x", reasoning_image_1={"bytes": None, "path": "images/gone.png"}),
    ]
    write_zebra(root / "Scientific Reasoning - Physics" / "train-00000-of-00001.parquet", rows, cols)
    # another category with other image columns (files are read one at a time)
    other = [row(f"{P(1)} {P(2)} Which piece fits?", f"{R(1)} It is the second.", "2",
                 problem_image_1=struct(60), problem_image_2=struct(61), reasoning_image_1=struct(62))]
    write_zebra(root / "2D Visual Reasoning - Visual Jigsaw" / "train-00000-of-00001.parquet", other,
                ["problem_image_1", "problem_image_2", "reasoning_image_1"])
    return root


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def opts(**kw) -> ConvertOptions:
    return ConvertOptions(**{"max_image_size": 64, "samples_per_shard": 2, "workers": 0, "progress": False, **kw})


def test_images_land_where_the_text_names_them_and_bad_rows_are_counted(zebra_root, tmp_path):
    out = tmp_path / "shards"
    manifest = convert("zebra_cot", ZebraCoTConfig(source=str(zebra_root)), str(out), opts())
    assert manifest["skipped"] == {"bad_image": 1, "missing_column": 1, "missing_image": 1,
                                   "missing_image_file": 1, "unbalanced_observation": 1}
    assert manifest["written"] == 5 and manifest["records"] == 10 and len(manifest["shards"]) == 3
    assert json.loads((out / "manifest.json").read_text())["written"] == 5
    assert not list(out.glob("*.tmp")) and not (out / ".staging").exists()
    assert not (out / ".convert_state.json").exists()

    samples = read_samples(out)
    # files in sorted order: the jigsaw category (1 row) first, then physics (rows 0..8)
    assert list(samples) == [JIGSAW + "-0", *(f"{PHYSICS}-{r}" for r in (0, 1, 2, 3))]
    jigsaw = samples[JIGSAW + "-0"]["json"]
    assert [it["type"] for it in jigsaw["messages"][0]["content"]] == ["image", "image", "text"]
    assert jigsaw["meta"]["category"] == "2D Visual Reasoning - Visual Jigsaw"

    first = samples[PHYSICS + "-0"]
    meta = first["json"]
    assert meta["source"] == "zebra_cot" and meta["answer"] == "A"
    assert meta["messages"][0]["content"] == [{"type": "image", "ref": "img0"},
                                              {"type": "text", "text": "\nPuzzle 0: which way?"}]
    assert meta["messages"][1]["content"] == [
        {"type": "text", "text": "THOUGHT 0: Sketch the known angles.\n"}, {"type": "aux_image", "ref": "aux0"},
        {"type": "text", "text": "\nTHOUGHT 1: <observation>The path turns left at the fork.</observation> "
                                 "Look again.\n"},
        {"type": "aux_image", "ref": "aux1"},
        {"type": "text", "text": "\nTHOUGHT 2: <observation>It ends at the top.</observation>"},
        {"type": "text", "text": "\nThe answer is A."},
    ]
    assert sorted(first) == ["aux0.jpeg", "aux1.jpeg", "img0.jpeg", "json"]
    assert Image.open(io.BytesIO(first["aux0.jpeg"])).format == "JPEG"

    big = samples[PHYSICS + "-3"]
    assert Image.open(io.BytesIO(big["img0.jpeg"])).size == (64, 43)  # 300×200 shrunk to max_image_size
    # the problem image named again in the trace is not shown twice
    assert [it["type"] for it in big["json"]["messages"][1]["content"]] == ["aux_image", "text", "text", "text"]


def test_a_file_without_a_text_column_is_an_error_naming_it(tmp_path):
    write_zebra(tmp_path / "z" / "a.parquet", [{"Question": "q", "Text Reasoning Trace": "t"}], [],
                text_columns=("Question", "Text Reasoning Trace"))
    with pytest.raises(ValueError, match="'Final Answer'"):
        convert("zebra_cot", ZebraCoTConfig(source=str(tmp_path / "z")), str(tmp_path / "out"), opts())


def test_interrupted_conversion_resumes_to_the_same_shards(zebra_root, tmp_path, monkeypatch):
    cfg = ZebraCoTConfig(source=str(zebra_root))
    whole = convert("zebra_cot", cfg, str(tmp_path / "whole"), opts())

    calls: list[str] = []
    original = ZebraCoTConverter.convert

    def crash_at_record_6(self, record, key):
        calls.append(key)
        if key == f"{PHYSICS}-5":  # the 7th record (the jigsaw file comes first)
            raise KeyboardInterrupt  # Ctrl-C in the middle of shard 2
        return original(self, record, key)

    monkeypatch.setattr(ZebraCoTConverter, "convert", crash_at_record_6)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        convert("zebra_cot", cfg, str(part), opts())
    assert sorted(p.name for p in part.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not (part / "manifest.json").exists() and (part / ".convert_state.json").exists()

    calls.clear()
    def counting(self, record, key):
        calls.append(key)
        return original(self, record, key)

    monkeypatch.setattr(ZebraCoTConverter, "convert", counting)
    resumed = convert("zebra_cot", cfg, str(part), opts())
    assert calls[0] == f"{PHYSICS}-3"  # records 0-3 (the two finished shards) were not converted again
    assert digest(part) == digest(tmp_path / "whole")
    # skips.jsonl was cut back to the last finished shard: each skipped record is listed once
    def listed(folder):
        return [(x["key"], x["row"], x["reason"], x["path"]) for x in map(json.loads, open(folder / "skips.jsonl"))]

    assert listed(part) == listed(tmp_path / "whole") and len(listed(part)) == 5
    for field in ("written", "skipped", "records", "shards"):
        assert resumed[field] == whole[field], field
    calls.clear()
    assert convert("zebra_cot", cfg, str(part), opts())["written"] == 5 and calls == []  # complete: nothing to do
    with pytest.raises(ValueError, match="samples_per_shard: 2 -> 3"):
        convert("zebra_cot", cfg, str(part), opts(samples_per_shard=3))
    assert convert("zebra_cot", cfg, str(part), opts(samples_per_shard=3, overwrite=True))["shards"] == \
        ["shard-000000.tar", "shard-000001.tar"]


def test_two_worker_processes_write_the_same_bytes(zebra_root, tmp_path):
    cfg = ZebraCoTConfig(source=str(zebra_root))
    serial = convert("zebra_cot", cfg, str(tmp_path / "serial"), opts())
    parallel = convert("zebra_cot", cfg, str(tmp_path / "parallel"), opts(workers=2))
    assert digest(tmp_path / "serial") == digest(tmp_path / "parallel") and len(digest(tmp_path / "serial")) == 3
    assert serial["skipped"] == parallel["skipped"]


@pytest.mark.slow
def test_converted_samples_train_a_few_stage1_steps(tmp_path):
    import lightning as L
    import torch

    from mmlatent.training.datamodule import ShardDataModule, SplitConfig
    from mmlatent.training.module import LatentVLMModule

    write_zebra(tmp_path / "z" / "train.parquet", good_rows(6),
                ["problem_image_1", "reasoning_image_1", "reasoning_image_2"])
    out = tmp_path / "shards"
    manifest = convert("zebra_cot", ZebraCoTConfig(source=str(tmp_path / "z")), str(out), opts(samples_per_shard=3))
    assert manifest["written"] == 6
    torch.manual_seed(0)
    module = LatentVLMModule()
    before = [p.detach().clone() for p in module.model.parameters() if p.requires_grad]
    dm = ShardDataModule(train=SplitConfig(shards=str(out)), val=SplitConfig(shards=""), batch_size=2,
                         num_workers=0, shuffle_buffer=0)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dm)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    after = [p.detach() for p in module.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert trainer.callback_metrics["data/skipped"] == 0  # every converted sample fit the stage-1 layout


ISSUE_TRACE = (f"THOUGHT 0: Mark the known angles. {R(1)} THOUGHT 1: Extend the base line to D. Then ∠ACD = 110°. "
               f"{R(2)} THOUGHT 2: So ∠C = 70°.")
"""The trace the issue quotes, whose separators got lost when aux images were absent."""


def rendered_assistant(sample: dict, layout) -> str:
    """The assistant turn as the model reads it: text decoded, `<IMG>` per image, `<LAT>` per latent block."""
    import torch

    from mmlatent.data.processor import Processor
    from mmlatent.model.tokenizer import TokenizerConfig, load_tokenizer

    proc = Processor(load_tokenizer(TokenizerConfig()), lambda img: torch.zeros(3, 2, 2), 2, layout)
    ids = proc(sample).input_ids.tolist()
    ids = ids[ids.index(proc.ids.turn_start, ids.index(proc.ids.turn_end)) + 1 :]  # the assistant turn
    out, text, i = [], [], 0
    while i < len(ids):
        if ids[i] in (proc.ids.image, proc.ids.latent_start):
            out.append(proc.tok.decode(text))
            text = []
            end = proc.ids.image if ids[i] == proc.ids.image else proc.ids.latent_end
            out.append("<IMG>" if end == proc.ids.image else "<LAT>")
            while ids[i] != end or (end == proc.ids.image and i + 1 < len(ids) and ids[i + 1] == end):
                i += 1
        else:
            text.append(ids[i])
        i += 1
    out.append(proc.tok.decode(text))
    return "".join(out).removeprefix("assistant\n").removesuffix("<|im_end|>\n")


def test_text_keeps_its_separators_in_every_aux_layout(tmp_path):
    """A newline on each side of every aux image (SkiLa's reader), so dropping the images never glues
    sentences together, and the answer line starts on a line of its own."""
    from mmlatent.data.pipeline import SkipCounter, decode_samples
    from mmlatent.data.processor import SequenceLayout
    from mmlatent.data.tar_reader import shard_samples

    write_zebra(tmp_path / "Geometry" / "train.parquet",
                [row(f"Find ∠C. {P(1)}", ISSUE_TRACE, "$\\boxed{70^\\circ}$", problem_image_1=struct(1),
                     reasoning_image_1=struct(2), reasoning_image_2=struct(3))],
                ["problem_image_1", "reasoning_image_1", "reasoning_image_2"])
    out = tmp_path / "shards"
    convert("zebra_cot", ZebraCoTConfig(source=str(tmp_path)), str(out), opts())
    counter = SkipCounter()
    (sample,) = decode_samples((s for p in out.glob("*.tar") for s in shard_samples(str(p))), counter)
    assert sample["meta"]["answer"] == "70^\\circ"  # the answer field is normalised; the text keeps the column's

    steps = ["THOUGHT 0: Mark the known angles.",
             "THOUGHT 1: <observation>Extend the base line to D.</observation> Then ∠ACD = 110°.",
             "THOUGHT 2: <observation>So ∠C = 70°.</observation>"]
    answer = "The answer is $\\boxed{70^\\circ}$."
    for layout, image in ((SequenceLayout(aux_images="inline"), "<IMG>"),
                          (SequenceLayout(aux_images="image_then_latent"), "<IMG><LAT>"),
                          (SequenceLayout(aux_images="latent"), "<LAT>"),
                          (SequenceLayout(aux_images="drop"), ""),
                          (SequenceLayout(aux_images="inline", aux_dropout=1.0), "")):
        expected = f"{steps[0]}\n{image}\n{steps[1]}\n{image}\n{steps[2]}\n{answer}"
        assert rendered_assistant(sample, layout) == expected, layout
    assert "angles.\n\nTHOUGHT 1" in rendered_assistant(sample, SequenceLayout(aux_images="drop"))


def test_observation_spans_are_the_first_sentence_after_each_reasoning_image(zebra_root, tmp_path):
    from mmlatent.data.convert.zebra_cot import observe_first_sentence

    assert observe_first_sentence("THOUGHT 3: It is 3.5 cm long. So x = 2.") == \
        "THOUGHT 3: <observation>It is 3.5 cm long.</observation> So x = 2."
    assert observe_first_sentence("the red cell\nthen up") == "<observation>the red cell</observation>\nthen up"
    assert observe_first_sentence("no full stop") == "<observation>no full stop</observation>"
    assert observe_first_sentence("THOUGHT 1: ") == "THOUGHT 1: "

    files = ["Scientific Reasoning - Physics/*.parquet"]
    spans = convert("zebra_cot", ZebraCoTConfig(source=str(zebra_root), files=files), str(tmp_path / "a"), opts())
    plain = convert("zebra_cot", ZebraCoTConfig(source=str(zebra_root), files=files, observations="none"),
                    str(tmp_path / "b"), opts())
    assert spans["written"] == plain["written"] == 4
    with_spans, without = read_samples(tmp_path / "a"), read_samples(tmp_path / "b")
    for key, sample in with_spans.items():
        trace = "".join(it.get("text", "") for it in sample["json"]["messages"][1]["content"])
        n_aux = sum(it["type"] == "aux_image" for it in sample["json"]["messages"][1]["content"])
        assert trace.count("<observation>") == trace.count("</observation>") == n_aux, key  # one per image
        assert "<observation>" not in json.dumps(without[key]["json"])


def test_keys_are_unique_across_categories_converted_apart(zebra_root, tmp_path):
    keys = []
    for category in ("Scientific Reasoning - Physics", "2D Visual Reasoning - Visual Jigsaw"):
        convert("zebra_cot", ZebraCoTConfig(source=str(zebra_root), files=[f"{category}/*.parquet"]),
                str(tmp_path / category), opts())
        keys += list(read_samples(tmp_path / category))
    assert len(keys) == len(set(keys)) == 5
    assert {f"{PHYSICS}-0", f"{JIGSAW}-0"} <= set(keys)  # row 0 of two files named alike


def test_a_single_parquet_source_keeps_its_category(zebra_root, tmp_path):
    source = zebra_root / "2D Visual Reasoning - Visual Jigsaw" / "train-00000-of-00001.parquet"
    convert("zebra_cot", ZebraCoTConfig(source=str(source)), str(tmp_path / "one"), opts())
    (key, sample), = read_samples(tmp_path / "one").items()
    assert sample["json"]["meta"]["category"] == "2D Visual Reasoning - Visual Jigsaw" and key == f"{JIGSAW}-0"
