"""Monet-SFT JSON (relative image paths) to shards: good samples through, bad ones skipped by reason, and a
converted sample read back through the stage-2 layout puts its latent block right after the aux image."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmlatent.data.convert import ConvertOptions, MonetConfig, convert
from mmlatent.data.convert.monet import MARKER
from mmlatent.data.pipeline import SkipCounter, decode_samples
from mmlatent.data.processor import Processor, SequenceLayout
from mmlatent.data.tar_reader import tar_samples
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


def record(sid: int, assistant: list[dict], name: str = "Visual_CoT",
           question_image: str | None = "Visual_CoT/images/q.png") -> dict:
    user = ([image(question_image)] if question_image else []) + [text(f"Question {sid}: what does the sign say?")]
    return {
        "data": [
            {"role": "system", "content": [text("You are a helpful assistant.")]},
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ],
        "metadata": {"dataset_name": name, "sample_id": sid},
    }


GOOD = [
    text(f"Zoom in on the sign.{MARKER}"), image("Visual_CoT/images/a0.png"),
    text("<observation>The sign says STOP.</observation> So the answer is \\boxed{B}."),
]


@pytest.fixture()
def monet_root(tmp_path) -> Path:
    root = tmp_path / "Monet-SFT-125K"
    for i, name in enumerate(["q", "a0", "a1", "a2"]):
        save_png(root / "Visual_CoT" / "images" / f"{name}.png", i)
    save_png(root / "Zebra_CoT_count" / "images" / "z.png", 9, size=(300, 120))
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
    (root / "README.md").write_text("not data")
    return root


def test_good_samples_come_through_and_bad_ones_are_counted_by_reason(monet_root, tmp_path):
    out = tmp_path / "shards"
    manifest = convert("monet", MonetConfig(source=str(monet_root)), str(out),
                       ConvertOptions(image_format="png", max_image_size=128, samples_per_shard=2, workers=0,
                                      progress=False))
    assert manifest["written"] == 3 and manifest["records"] == 9
    assert manifest["skipped"] == {"bad_record": 1, "marker_mismatch": 2, "missing_image_file": 1,
                                   "no_observation": 1, "unbalanced_observation": 1}
    assert manifest["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    assert [f["path"] for f in manifest["source"]["files"]] == ["Visual_CoT/train.json", "Zebra_CoT_count/train.json"]
    assert manifest["options"]["max_image_size"] == 128 and manifest["converter"] == "monet"

    samples = read_samples(out)
    assert list(samples) == ["monet-000000000", "monet-000000001", "monet-000000008"]
    first = samples["monet-000000000"]["json"]
    assert first["id"] == "Visual_CoT:0" and first["answer"] == "B" and first["source"] == "monet"
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][1]["content"][0] == {"type": "image", "ref": "img0"}
    assert first["messages"][2]["content"] == [
        text("Zoom in on the sign."), {"type": "aux_image", "ref": "aux0"},
        text("<observation>The sign says STOP.</observation> So the answer is \\boxed{B}."),
    ]
    # image bytes are the source pixels (PNG re-encode is lossless)
    src = np.asarray(Image.open(monet_root / "Visual_CoT/images/a0.png").convert("RGB"))
    got = np.asarray(Image.open(io.BytesIO(samples["monet-000000000"]["aux0.png"])))
    assert np.array_equal(src, got)

    second = samples["monet-000000001"]["json"]
    assistant = second["messages"][2]["content"]
    assert assistant[0] == text("Early guess, check.")  # tags before the first aux image removed
    assert [it.get("ref") for it in assistant if it["type"] == "aux_image"] == ["aux0", "aux1"]
    assert second["answer"] == "\\frac{1}{2}"

    last = samples["monet-000000008"]
    assert last["json"]["meta"]["dataset_name"] == "Zebra_CoT_count" and "img0.png" not in last
    assert max(Image.open(io.BytesIO(last["aux0.png"])).size) == 128  # 300 px shrunk to max_image_size


def test_one_subset_and_json_lines(monet_root, tmp_path):
    lines = (monet_root / "Visual_CoT" / "train.jsonl")
    lines.write_text("\n".join(json.dumps(r) for r in json.loads((monet_root / "Visual_CoT/train.json").read_text())))
    a = convert("monet", MonetConfig(source=str(monet_root), files=["Visual_CoT/train.json"]), str(tmp_path / "a"),
                ConvertOptions(workers=0, progress=False))
    b = convert("monet", MonetConfig(source=str(monet_root), files=["Visual_CoT/*.jsonl"]), str(tmp_path / "b"),
                ConvertOptions(workers=0, progress=False))
    assert a["written"] == b["written"] == 2 and a["skipped"] == b["skipped"]
    sa, sb = read_samples(tmp_path / "a"), read_samples(tmp_path / "b")
    assert list(sa) == list(sb) == ["monet-000000000", "monet-000000001"]
    for key in sa:
        assert sa[key].pop("json")["meta"].pop("file") == "Visual_CoT/train.json"
        assert sb[key].pop("json")["meta"].pop("file") == "Visual_CoT/train.jsonl"
    assert sa == sb  # the same images (and, above, the same JSON but for the file name)


def test_stage2_layout_puts_the_latent_block_right_after_the_aux_image(monet_root, tmp_path):
    out = tmp_path / "shards"
    convert("monet", MonetConfig(source=str(monet_root), files=["Visual_CoT/train.json"]), str(out),
            ConvertOptions(image_format="png", samples_per_shard=8, workers=0, progress=False))
    counter = SkipCounter()
    urls = [{"url": str(p)} for p in sorted(out.glob("*.tar"))]
    decoded = list(decode_samples(tar_samples(urls, handler=counter.tar_handler), counter))
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
