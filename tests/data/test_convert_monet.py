"""Monet-SFT JSON (the released layout: subset folders, image paths relative to the root) to shards, as Monet's
own code reads it: good samples through, bad ones skipped by reason and listed in `skips.jsonl`; keys unique
across subsets converted apart; question images at their markers; the `\\boxed{}` instruction per subset; a
single JSON file as the source; and a converted sample read back through the stage-2 layout puts its latent
block right after the aux image."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmlatent.data.convert import ConversionError, ConvertOptions, MonetConfig, convert
from mmlatent.data.convert.monet import MARKER
from mmlatent.data.pipeline import SkipCounter, decode_samples
from mmlatent.data.processor import Processor, SequenceLayout
from mmlatent.data.tar_reader import shard_samples
from mmlatent.model.tokenizer import TokenizerConfig, load_tokenizer
from tests.conftest import read_samples

T = 4  # image tokens per image in the test processor


def save_png(path: Path, seed: int, size=(40, 30)) -> str:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path.as_posix()


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(p: str) -> dict:
    return {"type": "image", "image": p}


BOXED = "\nPut your final answer within \\boxed{}."


def record(sid: int | None, assistant: list[dict], name: str = "Visual_CoT",
           question_image: str | None = "Visual_CoT/images/q.png", user: list[dict] | None = None) -> dict:
    if user is None:
        question = text(f"Question {sid}: what does the sign say?{BOXED}")
        user = ([image(question_image)] if question_image else []) + [question]
    return {
        "data": [
            {"role": "system", "content": [text("You are a VLM. Think step by step.")]},
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ],
        "metadata": {"dataset_name": name} if sid is None else {"dataset_name": name, "sample_id": sid},
    }


GOOD = [
    text(f"Zoom in on the sign.{MARKER}"), image("Visual_CoT/images/a0.png"),
    text("<observation>The sign says STOP.</observation> So the answer is \\boxed{B}."),
]


@pytest.fixture()
def monet_root(tmp_path) -> Path:
    """Monet-SFT-125K as released: one folder per subset with a `train.json`, image paths relative to the root."""
    root = tmp_path / "Monet-SFT-125K"
    for i, name in enumerate(["q", "a0", "a1", "a2"]):
        save_png(root / "Visual_CoT" / "images" / f"{name}.png", i)
    save_png(root / "Zebra_CoT_count" / "images" / "z.png", 9, size=(300, 120))
    for i, name in enumerate(["chart_a", "chart_b", "crop"]):
        save_png(root / "ReFocus" / "images" / f"{name}.png", 20 + i)
    records = [
        record(0, GOOD),
        # two aux images; the observation before the first one is not image-dependent and loses its tags
        record(1, [text(f"<observation>Early guess</observation>, check.{MARKER}"), image("Visual_CoT/images/a1.png"),
                   text(f"<observation>It is red</observation>, look again{MARKER}"), image("Visual_CoT/images/a2.png"),
                   text("<observation>still red</observation>. \\boxed{\\frac{1}{2}}")]),
        record(2, [text(f"Zoom.{MARKER}"), image("Visual_CoT/images/missing.png"),
                   text("<observation>x</observation>")]),
        record(3, [text("Zoom, no marker."), image("Visual_CoT/images/a0.png"), text("<observation>x</observation>")]),
        record(4, [text(f"Marker without image.{MARKER} <observation>x</observation>")]),
        record(5, [text(f"Zoom.{MARKER}"), image("Visual_CoT/images/a0.png"), text("<observation>never closed")]),
        record(6, [text(f"Zoom.{MARKER}"), image("Visual_CoT/images/a0.png"), text("No observation here.")]),
        {"foo": "not a Monet record"},
    ]
    (root / "Visual_CoT" / "train.json").write_text(json.dumps(records, indent=1))
    zebra = [record(0, [text(f"Count them.{MARKER}"), image("Zebra_CoT_count/images/z.png"),
                        text("<observation>three</observation> \\boxed{3}")],
                     name="Zebra_CoT_count", question_image=None)]
    (root / "Zebra_CoT_count" / "train.json").write_text(json.dumps(zebra))
    two_charts = [image("ReFocus/images/chart_a.png"), image("ReFocus/images/chart_b.png"),
                  text(f"Image A: {MARKER} Image B: {MARKER} Which bar is taller?{BOXED}")]
    refocus = [
        # several question images, placed at their markers; the aux image's marker sits mid-text
        record(0, [text(f"Crop the bars {MARKER} and compare."), image("ReFocus/images/crop.png"),
                   text("<observation>B is taller</observation>. \\boxed{B}")], name="ReFocus", user=two_charts),
        record(None, GOOD[:1] + [image("ReFocus/images/crop.png"), GOOD[2]], name="ReFocus",   # no id of its own
               question_image="ReFocus/images/chart_a.png"),
        record(0, GOOD[:1] + [image("ReFocus/images/crop.png"), GOOD[2]], name="ReFocus",      # the same id again
               question_image="ReFocus/images/chart_b.png"),
    ]
    (root / "ReFocus" / "train.json").write_text(json.dumps(refocus))
    (root / "README.md").write_text("not data")
    return root


def opts(**kw) -> ConvertOptions:
    return ConvertOptions(**{"image_format": "png", "workers": 0, "progress": False, **kw})


def test_good_samples_come_through_and_bad_ones_are_counted_by_reason(monet_root, tmp_path):
    out = tmp_path / "shards"
    manifest = convert("monet", MonetConfig(source=str(monet_root), files=["Visual_CoT/*.json", "Zebra_CoT_count/*"]),
                       str(out), opts(max_image_size=128, samples_per_shard=2))
    assert manifest["written"] == 3 and manifest["records"] == 9
    assert manifest["skipped"] == {"bad_record": 1, "marker_mismatch": 2, "missing_image_file": 1,
                                   "no_observation": 1, "unbalanced_observation": 1}
    assert manifest["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    assert [f["path"] for f in manifest["source"]["files"]] == ["Visual_CoT/train.json", "Zebra_CoT_count/train.json"]
    assert manifest["options"]["max_image_size"] == 128 and manifest["converter"] == "monet"

    samples = read_samples(out)
    assert list(samples) == ["monet-Visual_CoT-0", "monet-Visual_CoT-1", "monet-Zebra_CoT_count-0"]
    first = samples["monet-Visual_CoT-0"]["json"]
    assert first["id"] == "Visual_CoT:0" and first["answer"] == "B" and first["source"] == "monet"
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][0]["content"] == [text("You are a helpful assistant.")]  # Monet's system prompt
    assert first["messages"][1]["content"] == [{"type": "image", "ref": "img0"},
                                               text("Question 0: what does the sign say?")]  # \boxed{} line removed
    assert first["messages"][2]["content"] == [
        text("Zoom in on the sign."), {"type": "aux_image", "ref": "aux0"},
        text("<observation>The sign says STOP.</observation> So the answer is \\boxed{B}."),
    ]
    # image bytes are the source pixels (PNG re-encode is lossless)
    src = np.asarray(Image.open(monet_root / "Visual_CoT/images/a0.png").convert("RGB"))
    got = np.asarray(Image.open(io.BytesIO(samples["monet-Visual_CoT-0"]["aux0.png"])))
    assert np.array_equal(src, got)

    second = samples["monet-Visual_CoT-1"]["json"]
    assistant = second["messages"][2]["content"]
    assert assistant[0] == text("Early guess, check.")  # tags before the first aux image removed
    assert [it.get("ref") for it in assistant if it["type"] == "aux_image"] == ["aux0", "aux1"]
    assert second["answer"] == "\\frac{1}{2}"

    last = samples["monet-Zebra_CoT_count-0"]
    assert last["json"]["meta"]["dataset_name"] == "Zebra_CoT_count" and "img0.png" not in last
    assert last["json"]["meta"]["subset"] == "Zebra_CoT_count"
    assert max(Image.open(io.BytesIO(last["aux0.png"])).size) == 128  # 300 px shrunk to max_image_size
    # Monet keeps the \boxed{} instruction for Zebra_CoT_count (and Zebra_CoT_visual_search) only
    assert last["json"]["messages"][1]["content"] == [text(f"Question 0: what does the sign say?{BOXED}")]


def test_skipped_records_are_listed_in_skips_jsonl(monet_root, tmp_path):
    out = tmp_path / "shards"
    manifest = convert("monet", MonetConfig(source=str(monet_root), files=["Visual_CoT/train.json"]), str(out), opts())
    lines = [json.loads(x) for x in (out / "skips.jsonl").read_text().splitlines()]
    assert len(lines) == sum(manifest["skipped"].values()) == 6 and manifest["skips_file"] == "skips.jsonl"
    assert all(set(x) == {"key", "file", "row", "reason", "path", "detail"} for x in lines)
    missing = next(x for x in lines if x["reason"] == "missing_image_file")
    assert missing["key"] == "monet-Visual_CoT-2" and missing["file"] == "Visual_CoT/train.json" and missing["row"] == 2
    assert missing["path"] == str(monet_root / "Visual_CoT/images/missing.png")
    assert [x["row"] for x in lines] == [2, 3, 4, 5, 6, 7]
    bad = lines[-1]
    assert bad["reason"] == "bad_record" and bad["key"] == "monet-Visual_CoT-train-row-7" and bad["path"] is None


def test_keys_are_unique_across_subsets_converted_apart_and_stable(monet_root, tmp_path):
    """`datasets/monet/convert.sh` converts each subset on its own: the keys still never collide."""
    keys = []
    for subset in ("Visual_CoT", "Zebra_CoT_count", "ReFocus"):
        convert("monet", MonetConfig(source=str(monet_root), files=[f"{subset}/train.json"]),
                str(tmp_path / subset), opts())
        keys += list(read_samples(tmp_path / subset))
    assert len(keys) == len(set(keys))
    assert {"monet-Visual_CoT-0", "monet-Zebra_CoT_count-0", "monet-ReFocus-0"} <= set(keys)  # sample_id 0 thrice
    assert "monet-ReFocus-train-row-1" in keys  # no id of its own: file and row
    assert "monet-ReFocus-0-2" in keys  # an id seen twice in one subset: the second gets a suffix
    again = convert("monet", MonetConfig(source=str(monet_root), files=["ReFocus/train.json"]),
                    str(tmp_path / "again"), opts())
    assert again["written"] == 3 and list(read_samples(tmp_path / "again")) == \
        [k for k in keys if k.startswith("monet-ReFocus")]


def test_question_images_go_to_their_markers(monet_root, tmp_path):
    """`Image A: <marker> Image B: <marker> …`: each question image at its marker, markers removed (Monet's
    `process_multiple_question_img`); an aux image's marker in mid-text puts the image there too."""
    out = tmp_path / "refocus"
    convert("monet", MonetConfig(source=str(monet_root), files=["ReFocus/train.json"]), str(out), opts())
    sample = read_samples(out)["monet-ReFocus-0"]
    user, assistant = sample["json"]["messages"][1]["content"], sample["json"]["messages"][2]["content"]
    assert user == [text("Image A: "), {"type": "image", "ref": "img0"}, text(" Image B: "),
                    {"type": "image", "ref": "img1"}, text(" Which bar is taller?")]
    assert all(MARKER not in it.get("text", "") for m in sample["json"]["messages"] for it in m["content"])
    chart_a = np.asarray(Image.open(monet_root / "ReFocus/images/chart_a.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["img0.png"]))), chart_a)  # A's image at A
    assert assistant == [text("Crop the bars "), {"type": "aux_image", "ref": "aux0"}, text(" and compare."),
                         text("<observation>B is taller</observation>. \\boxed{B}")]
    assert sample["json"]["answer"] == "B"


def test_a_question_with_more_markers_than_images_is_skipped(monet_root, tmp_path):
    user = [image("ReFocus/images/chart_a.png"), text(f"Image A: {MARKER} Image B: {MARKER}")]
    bad = record(9, GOOD[:1] + [image("ReFocus/images/crop.png"), GOOD[2]], name="ReFocus", user=user)
    (monet_root / "ReFocus" / "train.json").write_text(json.dumps([bad, bad | {"metadata": {"sample_id": 10}}]))
    with pytest.raises(ConversionError, match="marker_mismatch"):
        convert("monet", MonetConfig(source=str(monet_root), files=["ReFocus/train.json"]), str(tmp_path / "o"), opts())


def test_one_subset_and_json_lines(monet_root, tmp_path):
    lines = (monet_root / "Visual_CoT" / "train.jsonl")
    lines.write_text("\n".join(json.dumps(r) for r in json.loads((monet_root / "Visual_CoT/train.json").read_text())))
    a = convert("monet", MonetConfig(source=str(monet_root), files=["Visual_CoT/train.json"]), str(tmp_path / "a"),
                ConvertOptions(workers=0, progress=False))
    b = convert("monet", MonetConfig(source=str(monet_root), files=["Visual_CoT/*.jsonl"]), str(tmp_path / "b"),
                ConvertOptions(workers=0, progress=False))
    assert a["written"] == b["written"] == 2 and a["skipped"] == b["skipped"]
    sa, sb = read_samples(tmp_path / "a"), read_samples(tmp_path / "b")
    assert list(sa) == list(sb) == ["monet-Visual_CoT-0", "monet-Visual_CoT-1"]
    for key in sa:
        assert sa[key].pop("json")["meta"].pop("file") == "Visual_CoT/train.json"
        assert sb[key].pop("json")["meta"].pop("file") == "Visual_CoT/train.jsonl"
    assert sa == sb  # the same images (and, above, the same JSON but for the file name)


def test_stage2_layout_puts_the_latent_block_right_after_the_aux_image(monet_root, tmp_path):
    out = tmp_path / "shards"
    convert("monet", MonetConfig(source=str(monet_root), files=["Visual_CoT/train.json"]), str(out),
            ConvertOptions(image_format="png", samples_per_shard=8, workers=0, progress=False))
    counter = SkipCounter()
    raw = (s for p in sorted(out.glob("*.tar")) for s in shard_samples(str(p)))
    decoded = list(decode_samples(raw, counter))
    assert counter.counts == {} and len(decoded) == 2
    tok = load_tokenizer(TokenizerConfig())
    layout = SequenceLayout(aux_images="image_then_latent", observation_weight=4.0, latent_slots=3)
    proc = Processor(tok, lambda img: torch.zeros(3, 2, 2), T, layout)
    sample = proc(decoded[0])
    ids, ids_ = sample.input_ids.tolist(), proc.ids
    image_runs = [i for i in range(len(ids)) if ids[i] == ids_.image and (i == 0 or ids[i - 1] != ids_.image)]
    assert len(image_runs) == 2  # the question image, then the aux image
    after_aux = image_runs[1] + T
    assert ids[after_aux : after_aux + 5] == [ids_.latent_start, *[ids_.latent] * 3, ids_.latent_end]
    assert sample.aux_blocks.tolist() == [0] and sample.aux_pixel_values.shape == (1, 3, 2, 2)
    # the observation span comes after the block and is weighted ×4; its tags mark it
    open_at, close_at = ids.index(ids_.observation_open), ids.index(ids_.observation_close)
    assert after_aux + 5 <= open_at < close_at
    inside = sample.loss_weights[open_at + 1 : close_at]
    assert len(inside) > 0 and torch.all(inside == 4.0)
    assert proc.tok.decode(ids[open_at + 1 : close_at]).strip() == "The sign says STOP."
    assert sample.loss_weights[close_at + 1] == 1.0


def test_hub_id_reads_the_cached_snapshot_offline(monet_root, tmp_path, monkeypatch):
    """A Hub id goes through `snapshot_download`; offline it resolves to the cached snapshot (no network)."""
    import shutil

    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "hub" / "datasets--NOVAglow646--Monet-SFT-125K"
    shutil.copytree(monet_root, repo_cache / "snapshots" / sha)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    manifest = convert("monet", MonetConfig(source="NOVAglow646/Monet-SFT-125K", files=["Zebra_CoT_count/train.json"]),
                       str(tmp_path / "out"), ConvertOptions(workers=0, progress=False))
    assert manifest["written"] == 1
    assert manifest["source"]["kind"] == "hub" and manifest["source"]["revision"] == sha
    assert manifest["source"]["path"] == "NOVAglow646/Monet-SFT-125K"


def test_a_single_json_file_reads_images_from_the_dataset_root(monet_root, tmp_path, capsys):
    """`--source ROOT/ReFocus/train.json`: image paths are relative to ROOT (the default image root), not to
    the file's folder; a wrong `--image_root` fails loudly, naming the reason and an example record."""
    from mmlatent.cli import main

    source = str(monet_root / "ReFocus" / "train.json")
    out = tmp_path / "single"
    assert main(["data", "convert", "monet", "--source", source, "--out", str(out), "--workers", "0",
                 "--progress", "false"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 3 and summary["skipped"] == {}
    assert list(read_samples(out))[0] == "monet-ReFocus-0"  # the subset is the file's folder

    wrong = tmp_path / "wrong"
    assert main(["data", "convert", "monet", "--source", source, "--image_root", str(monet_root / "ReFocus"),
                 "--out", str(wrong), "--workers", "0", "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert "wrote no samples" in err and "most often for missing_image_file (3 of 3)" in err
    assert "e.g. record monet-ReFocus-0 (train.json, row 0)" in err and "--image_root" in err
    assert str(wrong / "skips.jsonl") in err and len((wrong / "skips.jsonl").read_text().splitlines()) == 3
    assert not (wrong / "manifest.json").exists() and not (wrong / ".staging").exists()


def test_an_empty_json_file_fails_and_leaves_no_folder(tmp_path, capsys):
    from mmlatent.cli import main

    (tmp_path / "Visual_CoT").mkdir()
    (tmp_path / "Visual_CoT" / "train.json").write_bytes(b"")
    out = tmp_path / "out"
    assert main(["data", "convert", "monet", "--source", str(tmp_path / "Visual_CoT" / "train.json"),
                 "--out", str(out), "--workers", "0", "--progress", "false"]) == 2
    assert "wrote no samples: the source has no records (train.json" in capsys.readouterr().err
    assert not out.exists()  # a failed conversion leaves no empty output folder behind
    assert main(["data", "convert", "monet", "--source", str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert not out.exists()


def test_failed_conversion_leaves_no_staging_folder(monet_root, tmp_path, monkeypatch):
    from mmlatent.data.convert.monet import MonetConverter

    def broken(self, record, key):
        raise RuntimeError("disk full")

    monkeypatch.setattr(MonetConverter, "convert", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        convert("monet", MonetConfig(source=str(monet_root), files=["ReFocus/train.json"]), str(out), opts())
    assert not out.exists()


def test_convert_without_a_source_prints_a_short_usage(capsys):
    from mmlatent.cli import main

    assert main(["data", "convert", "monet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mmlatent data convert monet --source PATH_OR_HUB_ID --out DIR [options]")
    assert "required" in err and "source" in err and len(err.splitlines()) <= 4 and "Traceback" not in err


def test_an_image_path_outside_the_image_root_is_refused_and_counted(monet_root, tmp_path):
    """`../…` or an absolute path elsewhere is never read, although the file exists; each record is counted."""
    secret = save_png(tmp_path / "outside" / "secret.png", 5)
    records = [record(0, GOOD),
               record(1, GOOD[:1] + [image("../outside/secret.png"), GOOD[2]]),
               record(2, GOOD[:1] + [image("Visual_CoT/../../outside/secret.png"), GOOD[2]]),
               record(3, GOOD, question_image=secret)]  # absolute
    (monet_root / "Visual_CoT" / "train.json").write_text(json.dumps(records))
    out = tmp_path / "shards"
    manifest = convert("monet", MonetConfig(source=str(monet_root), files=["Visual_CoT/train.json"]), str(out), opts())
    assert manifest["written"] == 1 and manifest["skipped"] == {"image_outside_root": 3}
    lines = [json.loads(x) for x in (out / "skips.jsonl").read_text().splitlines()]
    assert [x["row"] for x in lines] == [1, 2, 3] and all("outside the image root" in x["detail"] for x in lines)


def test_a_second_conversion_into_a_folder_in_use_is_refused_and_leaves_it_alone(monet_root, tmp_path, capsys):
    from mmlatent.cli import main
    from mmlatent.data.convert.folder_lock import folder_lock

    out = tmp_path / "out"
    (out / ".staging").mkdir(parents=True)
    (out / ".staging" / "shard-000000.tar").write_bytes(b"the first conversion's shard in progress")
    with folder_lock(out):  # the first conversion, still running
        code = main(["data", "convert", "monet", "--source", str(monet_root), "--files", "[Visual_CoT/train.json]",
                     "--out", str(out), "--workers", "0", "--progress", "false"])
        assert (out / ".staging" / "shard-000000.tar").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is in use by another conversion" in err[0] and str(out) in err[0]
    manifest = convert("monet", MonetConfig(source=str(monet_root), files=["Visual_CoT/train.json"]), str(out), opts())
    assert manifest["written"] == 2 and not (out / ".convert.lock").exists()  # once it is free, it converts
