"""The synthetic pointer-chasing dataset: determinism, consistency of text, images and answer, manifest."""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmlatent.data import synthetic
from mmlatent.data.sample import image_refs_in_order, validate_sample
from mmlatent.data.shard_writer import encode_sample
from mmlatent.data.synthetic import (
    COLOURS,
    DIRECTIONS,
    SynthConfig,
    TaskMix,
    arrow_masks,
    corpus_texts,
    frame_width,
    generate_sample,
    generate_split,
    make_puzzle,
    synthesize,
)

MIXED = SynthConfig(task_mix=TaskMix(lookup=1.0, marked=1.0, chase=1.0), hops=(1, 3))


def background_probe(cell: int) -> tuple[int, int]:
    """(dy, dx) offset inside a cell of a pixel that always shows the background (even when framed)."""
    w = frame_width(cell)
    return w, w


def cell_block(img: np.ndarray, cfg: SynthConfig, r: int, c: int) -> np.ndarray:
    s = cfg.cell_size
    return img[r * s : (r + 1) * s, c * s : (c + 1) * s]


def read_grid(img: np.ndarray, cfg: SynthConfig):
    """Decode colours, arrows and the framed cell from pixels alone (independent of the renderer)."""
    g, s = cfg.grid_size, cfg.cell_size
    dy, dx = background_probe(s)
    rgb_to_name = {COLOURS[name]: name for name in cfg.palette}
    colours, arrows, framed = {}, {}, []
    for r in range(g):
        for c in range(g):
            block = cell_block(img, cfg, r, c).astype(int)
            bg = tuple(block[dy, dx])
            colours[r, c] = rgb_to_name[bg]
            if tuple(block[0, 0]) == (255, 255, 255):
                framed.append((r, c))
            inner = block[dy + 1 : s - dy - 1, dx + 1 : s - dx - 1]
            ys, xs = np.nonzero((inner != bg).any(axis=-1))
            assert len(ys) > 10, "arrow not visible"
            centre = (inner.shape[0] - 1) / 2
            my, mx = ys.mean() - centre, xs.mean() - centre  # a triangle's mass sits toward its base
            if abs(my) > abs(mx):
                arrows[r, c] = "up" if my > 0 else "down"
            else:
                arrows[r, c] = "left" if mx > 0 else "right"
    return colours, arrows, framed


def decode(raw: bytes | Image.Image) -> np.ndarray:
    img = raw if isinstance(raw, Image.Image) else Image.open(io.BytesIO(raw))
    assert img.mode == "RGB"
    return np.asarray(img)


def test_samples_are_valid_and_deterministic():
    for i in range(20):
        a, b = generate_sample(MIXED, 3, "train", i), generate_sample(MIXED, 3, "train", i)
        validate_sample(a.meta, a.images.keys(), key=a.key)
        assert a.key == f"synth-train-{i:08d}" and a.meta["id"] == a.key and a.meta["source"] == "synthetic"
        assert encode_sample(a) == encode_sample(b)
    assert generate_sample(MIXED, 3, "train", 0).meta != generate_sample(MIXED, 3, "val", 0).meta
    assert generate_sample(MIXED, 3, "train", 0).meta != generate_sample(MIXED, 4, "train", 0).meta


@pytest.mark.parametrize("index", range(30))
def test_chain_of_thought_matches_the_image(index):
    cfg = MIXED
    sample = generate_sample(cfg, 0, "train", index)
    meta, info = sample.meta, sample.meta["meta"]
    puzzle = make_puzzle(cfg, 0, "train", index)
    img = decode(sample.images["img0"])
    assert img.shape == (64, 64, 3)
    colours, arrows, framed = read_grid(img, cfg)
    # The decoded pixels agree with the generator's internal grid.
    assert colours == {(r, c): cfg.palette[puzzle.colours[r, c]] for r in range(4) for c in range(4)}
    assert arrows == {(r, c): DIRECTIONS[puzzle.arrows[r, c]] for r in range(4) for c in range(4)}
    assert framed == [tuple(info["frame"])]

    # Recompute the path from the pixels: start cell, then follow the arrows on a torus.
    path = [tuple(p) for p in info["path"]]
    if info["task"] == "lookup":
        assert info["hops"] == 0 and len(path) == 1
        assert f"row {path[0][0] + 1}, column {path[0][1] + 1}?" in meta["messages"][0]["content"][1]["text"]
    else:
        cell = framed[0]
        expected = [cell]
        for _ in range(info["hops"]):
            dr, dc = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}[arrows[cell]]
            cell = ((cell[0] + dr) % 4, (cell[1] + dc) % 4)
            expected.append(cell)
        assert path == expected
        assert info["hops"] == (0 if info["task"] == "marked" else len(path) - 1)
    answer_colour = colours[path[-1]]
    assert info["answer_text"] == answer_colour
    letter = meta["answer"]
    assert meta["choices"][ord(letter) - ord("A")] == answer_colour
    assert len(set(meta["choices"])) == len(meta["choices"]) == cfg.num_choices
    assert set(meta["choices"]) <= set(cfg.palette)

    # The question lists the options and the instruction.
    user = meta["messages"][0]["content"]
    assert [it["type"] for it in user] == ["image", "text"]
    lines = user[1]["text"].split("\n")
    assert lines[1 : 1 + cfg.num_choices] == [f"{chr(65 + i)}. {n}" for i, n in enumerate(meta["choices"])]
    assert lines[-1] == "Answer with the option's letter."
    if info["task"] == "chase":
        assert f"for {info['hops']} step" in lines[0]

    # The assistant turn: per step a move text, an aux image, an observation; then the answer.
    steps = meta["messages"][1]["content"]
    assert steps[-1] == {"type": "text", "text": f"The answer is {letter}."}
    assert image_refs_in_order(meta) == [("image", "img0")] + [("aux_image", f"aux{i}") for i in range(len(path))]
    for i, cell in enumerate(path):
        move, aux, obs = steps[3 * i : 3 * i + 3]
        assert f"row {cell[0] + 1}, column {cell[1] + 1}." in move["text"]
        if i > 0:
            assert arrows[path[i - 1]] in move["text"]
        assert aux == {"type": "aux_image", "ref": f"aux{i}"}
        last = i == len(path) - 1
        # the observation span holds exactly the word read off the image
        want = f"The cell is <observation>{answer_colour}</observation>." if last else f"Its arrow points <observation>{arrows[cell]}</observation>."
        assert obs["text"] == want
        check_aux(decode(sample.images[f"aux{i}"]), img, cfg, cell, framed[0])


COLOUR_WALK = SynthConfig(image_size=48, grid_size=3, palette=("red", "green", "blue", "yellow"), num_choices=4,
                          task_mix=TaskMix(chase=0.0, walk=1.0), hops=(2, 3), moves="colours", option_order="palette")


@pytest.mark.parametrize("index", range(20))
def test_colour_moves_follow_the_colour_rule_and_read_one_word_per_step(index):
    cfg = COLOUR_WALK
    sample = generate_sample(cfg, 0, "train", index)
    meta, info = sample.meta, sample.meta["meta"]
    img = decode(sample.images["img0"])
    g, (dy, dx) = cfg.grid_size, background_probe(cfg.cell_size)
    rgb_to_name = {COLOURS[name]: name for name in cfg.palette}
    colours = {}
    for r in range(g):
        for c in range(g):
            inner = cell_block(img, cfg, r, c)[dy:-dy, dx:-dx]  # inside the (distractor) frame's width
            assert (inner == inner[0, 0]).all(), "a colour-move cell is plain: no arrow"
            colours[r, c] = rgb_to_name[tuple(int(v) for v in inner[0, 0])]
    # the path from pixels: each cell moves by its colour's fixed direction (palette index i -> DIRECTIONS[i % 4])
    path = [tuple(p) for p in info["path"]]
    for a, b in zip(path, path[1:]):
        dr, dc = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}[DIRECTIONS[cfg.palette.index(colours[a]) % 4]]
        assert b == ((a[0] + dr) % g, (a[1] + dc) % g)
    assert meta["choices"] == list(cfg.palette)  # palette order: the letter is a fixed function of the colour
    assert meta["choices"][ord(meta["answer"]) - 65] == colours[path[-1]] == info["answer_text"]
    assert "move by the colours" in meta["messages"][0]["content"][1]["text"]
    steps = meta["messages"][1]["content"]
    for i, cell in enumerate(path):
        where, aux, seen = steps[3 * i : 3 * i + 3]
        assert where["text"].endswith(f"row {cell[0] + 1}, column {cell[1] + 1}.")
        if i:
            prev = colours[path[i - 1]]
            assert where["text"].startswith(f"{prev.capitalize()} moves {DIRECTIONS[cfg.palette.index(prev) % 4]} to ")
        assert aux == {"type": "aux_image", "ref": f"aux{i}"}
        assert seen["text"] == f"It is <observation>{colours[cell]}</observation>."
    assert steps[-1]["text"] == f"The answer is {meta['answer']}."


def check_aux(aux: np.ndarray, question: np.ndarray, cfg: SynthConfig, cell, frame):
    """aux_i: the step's cell keeps its colours and is framed; every other cell is dimmed toward grey."""
    dy, dx = background_probe(cfg.cell_size)
    for r in range(cfg.grid_size):
        for c in range(cfg.grid_size):
            a, q = cell_block(aux, cfg, r, c).astype(int), cell_block(question, cfg, r, c).astype(int)
            if (r, c) == cell:
                assert tuple(a[0, 0]) == (255, 255, 255)
                assert (a[dy:-dy, dx:-dx] == q[dy:-dy, dx:-dx]).all()
            else:
                grey_dist_aux = np.abs(a[dy, dx] - 128).sum()
                grey_dist_q = np.abs(q[dy, dx] - 128).sum()
                assert grey_dist_aux < grey_dist_q
                assert tuple(a[0, 0]) != (255, 255, 255)


def test_arrows_are_symmetric_and_well_inside_the_cell():
    masks = arrow_masks(16)
    up, down, left, right = (masks[DIRECTIONS.index(d)] for d in ("up", "down", "left", "right"))
    assert (up == up[:, ::-1]).all() and (down == up[::-1]).all()
    assert (left == up.T).all() and (right == left[:, ::-1]).all()
    assert 30 <= up.sum() <= 60
    w = background_probe(16)[0]
    assert not masks[:, : w + 1].any() and not masks[:, :, : w + 1].any()  # clear of the frame


def test_task_mix_and_hops_ranges():
    cfg = SynthConfig(task_mix=TaskMix(lookup=1, marked=1, chase=2), hops=(2, 4))
    seen = [generate_sample(cfg, 1, "train", i).meta["meta"] for i in range(300)]
    kinds = {k: sum(m["task"] == k for m in seen) for k in ("lookup", "marked", "chase")}
    assert kinds["chase"] > kinds["lookup"] > 30 and kinds["marked"] > 30
    assert {m["hops"] for m in seen if m["task"] == "chase"} == {2, 3, 4}
    assert {m["hops"] for m in seen if m["task"] != "chase"} == {0}
    letters = {generate_sample(cfg, 1, "train", i).meta["answer"] for i in range(60)}
    assert letters == {"A", "B", "C", "D"}
    default = [generate_sample(SynthConfig(), 0, "val", i).meta["meta"] for i in range(40)]
    assert {m["task"] for m in default} == {"chase"} and {m["hops"] for m in default} == {2, 3}


def test_other_sizes_render():
    cfg = SynthConfig(image_size=96, grid_size=6, palette=("red", "blue", "orange"), num_choices=3, hops=(1, 1))
    sample = generate_sample(cfg, 0, "train", 5)
    img = decode(sample.images["img0"])
    assert img.shape == (96, 96, 3)
    colours, _, framed = read_grid(img, cfg)
    assert colours[tuple(sample.meta["meta"]["path"][-1])] == sample.meta["meta"]["answer_text"]
    assert framed == [tuple(sample.meta["meta"]["frame"])]


def test_corpus_texts_cover_all_tasks_without_rendering(monkeypatch):
    def no_render(*args, **kwargs):
        raise AssertionError("corpus_texts must not render images")

    monkeypatch.setattr(synthetic, "render_images", no_render)
    texts = list(corpus_texts(SynthConfig(), n=30, seed=0))
    joined = "\n".join(texts)
    assert "What colour is the cell in row" in joined
    assert "What colour is the framed cell?" in joined
    assert "follow the arrows for" in joined
    assert "<observation>" in joined and "The answer is" in joined
    assert texts == list(corpus_texts(SynthConfig(), n=30, seed=0))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"image_size": 62}, "image_size"),
        ({"image_size": 32}, "image_size"),
        ({"grid_size": 1}, "grid_size"),
        ({"palette": ("red", "white")}, "palette"),
        ({"palette": ("red", "red", "blue")}, "palette"),
        ({"num_choices": 7}, "num_choices"),
        ({"num_choices": 1}, "num_choices"),
        ({"hops": (3, 2)}, "hops"),
        ({"hops": (0, 2)}, "hops"),
        ({"aux_dim": 1.5}, "aux_dim"),
        ({"task_mix": {"chase": 0.0}}, "task_mix"),
        ({"task_mix": {"chase": 1.0, "hard": 1.0}}, "hard"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SynthConfig(**kwargs)


def test_task_mix_errors_name_the_kind():
    with pytest.raises(ValueError, match=r"task_mix\.marked"):
        TaskMix(marked=-1.0)
    with pytest.raises(ValueError, match=r"task_mix\.lookup"):
        TaskMix(lookup=float("nan"))


def test_synthesize_manifest_shards_and_byte_determinism(tmp_path):
    cfg = SynthConfig(task_mix=TaskMix(marked=1.0, chase=1.0))
    m1 = synthesize(tmp_path / "a", cfg, train=25, val=7, seed=5, samples_per_shard=10, progress=False)
    m2 = synthesize(tmp_path / "b", cfg, train=25, val=7, seed=5, samples_per_shard=10, progress=False)
    assert m1 == m2
    assert m1["seed"] == 5 and m1["format_version"] == 1
    assert m1["generator"] == json.loads(json.dumps(asdict(cfg)))
    assert SynthConfig(**m1["generator"]) == cfg  # the manifest rebuilds the config
    assert m1["splits"]["train"] == {
        "written": 25,
        "skipped": {},
        "shards": ["train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar"],
    }
    assert m1["splits"]["val"] == {"written": 7, "skipped": {}, "shards": ["val/shard-000000.tar"]}
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == m1
    for rel in m1["splits"]["train"]["shards"] + m1["splits"]["val"]["shards"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()

    # The shards hold exactly the generated samples, in order.
    urls = [str(tmp_path / "a" / rel) for rel in m1["splits"]["val"]["shards"]]
    read = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    expected = list(generate_split(cfg, 5, "val", 7))
    assert [r["__key__"] for r in read] == [s.key for s in expected]
    for raw, sample in zip(read, expected):
        assert json.loads(raw["json"]) == sample.meta
        assert all(re.fullmatch(r"(img0|aux\d)\.png|json|__\w+__", k) for k in raw)
        np.testing.assert_array_equal(decode(raw["img0.png"]), decode(sample.images["img0"]))

    # A smaller re-run into the same folder leaves no stale shards.
    m3 = synthesize(tmp_path / "a", cfg, train=5, val=0, seed=5, samples_per_shard=10, progress=False)
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == ["shard-000000.tar"]
    assert m3["splits"]["val"] == {"written": 0, "skipped": {}, "shards": []}
