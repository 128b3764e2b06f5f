"""The embedded synthetic reasoning dataset: pointer chasing on a grid of coloured cells with arrows.

An image is a `grid_size × grid_size` grid (default 4×4 cells of 16 px in a 64-px image, one ViT patch per
cell). Every cell has a background colour and an arrow (up/down/left/right), both drawn independently, so
image statistics vary from sample to sample (DESIGN §2: invariant statistics leave no first-order signal).
Arrows wrap around the edges (a torus), so every move is valid. One cell carries a thick white frame.

Task kinds, mixed by `TaskMix` weights for a curriculum (fixed position → content-addressed → hops):
- "lookup": "What colour is the cell in row r, column c?" (0 hops; the frame is a distractor),
- "marked": "What colour is the framed cell?" (content-addressed, 0 hops),
- "chase":  "Start at the framed cell and follow the arrows for k steps. What colour …?" (k ≥ 1 hops),
- "walk":   "Start at the cell in row r, column c and follow the arrows for k steps. …" (k ≥ 1 hops,
  every step a fixed-position lookup once the coordinates are written out).

The assistant turn is an interleaved chain of thought: for each visual step i (step 0 = the start cell,
then one per hop) a short move text, an aux image `aux{i}` that dims every cell but the one reached and
frames it, and an observation span reading that cell (its arrow, or its colour for the last one). The
answer is a multiple-choice letter.

Generation is a pure function of (seed, split, index), so it can run in parallel and resume anywhere.
The trade-off in rendering: the arrow shapes are drawn once per cell size with PIL's ImageDraw and cached
as masks, then images are composed with numpy; this is ~10× faster than drawing every polygon with PIL
and bit-identical across runs, at the cost of supporting only axis-aligned cells of whole pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from PIL import Image, ImageDraw

from mmlatent.atomic import write_text
from mmlatent.data.sample import OBSERVATION_CLOSE, OBSERVATION_OPEN, sample_texts
from mmlatent.data.shard_writer import RawSample, write_shards

FORMAT_VERSION = 1
"""Version of the synthetic sample layout, written to the manifest."""

TaskKind = Literal["lookup", "marked", "chase", "walk"]
TASK_KINDS: tuple[TaskKind, ...] = ("lookup", "marked", "chase", "walk")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
    "orange": (245, 140, 30),
    "pink": (240, 110, 180),
    "brown": (140, 90, 40),
}
"""Saturated cell colours a palette may use. White, black and grey are reserved for the frame, the arrows
and the dimming of aux images, so they are not cell colours."""

DEFAULT_PALETTE: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")

DIRECTIONS: tuple[str, ...] = ("up", "down", "left", "right")
_DELTAS: tuple[tuple[int, int], ...] = ((-1, 0), (1, 0), (0, -1), (0, 1))  # (d_row, d_col) per direction

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GREY = (128, 128, 128)


@dataclass
class TaskMix:
    """Relative weights of the task kinds (normalised; at least one must be positive)."""

    lookup: float = 0.0
    """Fixed-position lookup: the colour of the cell at a named row and column."""
    marked: float = 0.0
    """Content-addressed lookup: the colour of the framed cell."""
    chase: float = 1.0
    """Pointer chasing: follow the arrows from the framed cell for k hops (k from `SynthConfig.hops`)."""
    walk: float = 0.0
    """Pointer chasing from a named cell ("start at row r, column c"): k hops of fixed-position lookups,
    without the content-addressed first step that makes "chase" slow to learn."""

    def __post_init__(self) -> None:
        for kind in TASK_KINDS:
            w = getattr(self, kind)
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"task_mix.{kind} must be a finite number >= 0, got {w!r}")
        if sum(self.weights()) <= 0:
            raise ValueError(f"task_mix: at least one of {', '.join(TASK_KINDS)} must be > 0")

    def weights(self) -> list[float]:
        """Weights in `TASK_KINDS` order."""
        return [float(getattr(self, kind)) for kind in TASK_KINDS]


@dataclass
class SynthConfig:
    """Size and difficulty of the synthetic pointer-chasing dataset."""

    image_size: int = 64
    """Side of the square image in pixels; a multiple of `grid_size`, with cells of at least 12 px."""
    grid_size: int = 4
    """Cells per side. With the defaults each cell is exactly one 16-px ViT patch."""
    palette: tuple[str, ...] = DEFAULT_PALETTE
    """Names of the cell colours (keys of `COLOURS`), drawn independently per cell."""
    hops: tuple[int, int] = (2, 3)
    """Inclusive (min, max) number of arrow hops of a "chase" question."""
    num_choices: int = 4
    """Options per question (colour names, the right one included); at most `len(palette)`."""
    task_mix: TaskMix = field(default_factory=TaskMix)
    """Weights of the task kinds (curriculum)."""
    aux_dim: float = 0.6
    """How far aux images blend the cells that are not highlighted toward grey (0 = not at all, 1 = grey)."""
    moves: Literal["arrows", "colours"] = "arrows"
    """What a hop follows. `arrows`: each cell's own arrow, drawn independently of its colour (two visual
    primitives to learn). `colours`: a fixed rule of the cell's colour (palette colour i moves
    `DIRECTIONS[i % 4]`) and no arrows are drawn, so one primitive, the colour, serves every hop."""
    option_order: Literal["shuffled", "palette"] = "shuffled"
    """Order of the answer options. `shuffled`: a random order per question, so writing the letter is a
    second, text-only search for the option holding the colour. `palette`: options in palette order, so the
    letter is a fixed function of the colour."""

    def __post_init__(self) -> None:
        if isinstance(self.task_mix, dict):  # e.g. read back from a manifest
            unknown = sorted(set(self.task_mix) - set(TASK_KINDS))
            if unknown:
                raise ValueError(f"task_mix: unknown task kinds {unknown}; known: {TASK_KINDS}")
            self.task_mix = TaskMix(**self.task_mix)
        self.palette, self.hops = tuple(self.palette), tuple(self.hops)
        if self.grid_size < 2:
            raise ValueError(f"grid_size must be >= 2, got {self.grid_size}")
        if self.image_size % self.grid_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of grid_size ({self.grid_size})")
        if self.image_size // self.grid_size < 12:
            raise ValueError(f"image_size ({self.image_size}) gives cells under 12 px for grid_size {self.grid_size}")
        unknown = [name for name in self.palette if name not in COLOURS]
        if unknown:
            raise ValueError(f"palette: unknown colours {unknown}; choose from {sorted(COLOURS)}")
        if len(set(self.palette)) != len(self.palette) or len(self.palette) < 2:
            raise ValueError(f"palette must hold at least 2 distinct colours, got {self.palette}")
        if len(self.hops) != 2 or not 1 <= self.hops[0] <= self.hops[1]:
            raise ValueError(f"hops must be (min, max) with 1 <= min <= max, got {self.hops}")
        if not 2 <= self.num_choices <= min(len(self.palette), 26):
            raise ValueError(f"num_choices ({self.num_choices}) must be in 2..len(palette) ({len(self.palette)})")
        if not 0.0 <= self.aux_dim <= 1.0:
            raise ValueError(f"aux_dim must be in [0, 1], got {self.aux_dim}")
        if self.moves not in ("arrows", "colours"):
            raise ValueError(f"moves must be 'arrows' or 'colours', got {self.moves!r}")
        if self.option_order not in ("shuffled", "palette"):
            raise ValueError(f"option_order must be 'shuffled' or 'palette', got {self.option_order!r}")
        if not isinstance(self.task_mix, TaskMix):
            raise ValueError(f"task_mix must be a TaskMix, got {type(self.task_mix).__name__}")

    @property
    def cell_size(self) -> int:
        return self.image_size // self.grid_size


@dataclass
class Puzzle:
    """The content of one sample before rendering: the grid, the question and its solution."""

    colours: np.ndarray
    """(G, G) palette index of each cell's background."""
    arrows: np.ndarray
    """(G, G) index into `DIRECTIONS` of each cell's arrow."""
    frame: tuple[int, int]
    """(row, col) of the framed cell, 0-based."""
    task: TaskKind
    """Task kind."""
    path: list[tuple[int, int]]
    """Cells visited, 0-based: the start (looked-up or framed) cell, then one per hop."""
    choices: list[str]
    """Colour names shown as options A, B, …"""
    answer_index: int
    """Index of the right option in `choices`."""

    @property
    def hops(self) -> int:
        return len(self.path) - 1


def _split_code(split: str) -> int:
    """A stable 32-bit code of a split name (Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.sha256(split.encode("utf-8")).digest()[:4], "little")


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _split_code(split), index])))


def make_puzzle(cfg: SynthConfig, seed: int, split: str, index: int, task: TaskKind | None = None) -> Puzzle:
    """Draw the puzzle of sample (seed, split, index); `task` overrides the task mix."""
    rng = _rng(seed, split, index)
    g, n_colours = cfg.grid_size, len(cfg.palette)
    colours = rng.integers(n_colours, size=(g, g))
    arrows = rng.integers(len(DIRECTIONS), size=(g, g))
    if cfg.moves == "colours":  # the move is the colour's (the draw above still runs: same random stream)
        arrows = colours % len(DIRECTIONS)
    frame = (int(rng.integers(g)), int(rng.integers(g)))
    weights = np.asarray(cfg.task_mix.weights())
    drawn: TaskKind = TASK_KINDS[int(rng.choice(len(TASK_KINDS), p=weights / weights.sum()))]
    task = task or drawn
    if task == "lookup":
        path = [(int(rng.integers(g)), int(rng.integers(g)))]
    else:
        hops = int(rng.integers(cfg.hops[0], cfg.hops[1] + 1)) if task in ("chase", "walk") else 0
        path = [(int(rng.integers(g)), int(rng.integers(g))) if task == "walk" else frame]
        for _ in range(hops):
            r, c = path[-1]
            dr, dc = _DELTAS[arrows[r, c]]
            path.append(((r + dr) % g, (c + dc) % g))
    answer = int(colours[path[-1]])
    others = [i for i in range(n_colours) if i != answer]
    options = [answer] + [int(i) for i in rng.choice(others, size=cfg.num_choices - 1, replace=False)]
    order = rng.permutation(cfg.num_choices)
    if cfg.option_order == "palette":
        order = np.argsort(options, kind="stable")  # options[order] ascending: palette order
    choices = [cfg.palette[options[i]] for i in order]
    return Puzzle(colours, arrows, frame, task, path, choices, int(np.flatnonzero(order == 0)[0]))


def _where(cell: tuple[int, int]) -> str:
    return f"row {cell[0] + 1}, column {cell[1] + 1}"


def _letter(i: int) -> str:
    return chr(ord("A") + i)


def _question(cfg: SynthConfig, p: Puzzle) -> str:
    if p.task == "lookup":
        return f"What colour is the cell in {_where(p.path[0])}?"
    if p.task == "marked":
        return "What colour is the framed cell?"
    steps = "step" if p.hops == 1 else "steps"
    start = f"the cell in {_where(p.path[0])}" if p.task == "walk" else "the framed cell"
    follow = "move by the colours" if cfg.moves == "colours" else "follow the arrows"
    return f"Start at {start} and {follow} for {p.hops} {steps}. What colour is the cell you land on?"


def build_meta(cfg: SynthConfig, p: Puzzle, key: str) -> dict:
    """The sample JSON of puzzle `p` (messages, answer, choices, meta); images are named img0, aux0, …"""
    options = "\n".join(f"{_letter(i)}. {name}" for i, name in enumerate(p.choices))
    user_text = f"{_question(cfg, p)}\n{options}\nAnswer with the option's letter."
    steps = _colour_steps(cfg, p) if cfg.moves == "colours" else _arrow_steps(cfg, p)
    g = cfg.grid_size
    answer = _letter(p.answer_index)
    steps.append({"type": "text", "text": f"The answer is {answer}."})
    return {
        "id": key,
        "source": "synthetic",
        "messages": [
            {"role": "user", "content": [{"type": "image", "ref": "img0"}, {"type": "text", "text": user_text}]},
            {"role": "assistant", "content": steps},
        ],
        "answer": answer,
        "choices": list(p.choices),
        # which cell of the question image each aux image highlights, and the answer's (the last): the
        # grounding losses' targets
        "regions": {
            **{f"aux{i}": _cell_region(g, cell) for i, cell in enumerate(p.path)},
            "answer": _cell_region(g, p.path[-1]),
        },
        "meta": {
            "task": p.task,
            "hops": p.hops,
            "grid_size": cfg.grid_size,
            "path": [list(cell) for cell in p.path],
            "frame": list(p.frame),
            "answer_text": p.choices[p.answer_index],
        },
    }


def _cell_region(g: int, cell: tuple[int, int]) -> dict:
    r, c = cell
    return {"image": "img0", "box": [c / g, r / g, (c + 1) / g, (r + 1) / g]}


def _colour_steps(cfg: SynthConfig, p: Puzzle) -> list[dict]:
    """Colour moves: per visual step, where to look (the start, or the move just made and the cell it leads
    to), the aux image of that cell, and the word read there: "It is <observation>colour</observation>."
    The coordinates come before the image, so what the image shows (and, later, the latent block standing
    for it) is a lookup at a named cell."""
    steps: list[dict] = []
    for i, cell in enumerate(p.path):
        if i == 0:
            where = f"Start at {_where(cell)}."
        else:
            prev = p.path[i - 1]
            where = f"{cfg.palette[p.colours[prev]].capitalize()} moves {DIRECTIONS[p.arrows[prev]]} to {_where(cell)}."
        colour = cfg.palette[p.colours[cell]]
        steps += [
            {"type": "text", "text": where},
            {"type": "aux_image", "ref": f"aux{i}"},
            {"type": "text", "text": f"It is {OBSERVATION_OPEN}{colour}{OBSERVATION_CLOSE}."},
        ]
    return steps


def _arrow_steps(cfg: SynthConfig, p: Puzzle) -> list[dict]:
    """Arrow moves: per visual step, the cell reached, its aux image, and the arrow read there (the colour at
    the last cell)."""
    steps: list[dict] = []
    for i, cell in enumerate(p.path):
        if i == 0:
            lead = "The framed cell is in" if p.task in ("marked", "chase") else "Look at the cell in"
            move = f"{lead} {_where(cell)}."
        else:
            move = f"Moving {DIRECTIONS[p.arrows[p.path[i - 1]]]} leads to {_where(cell)}."
        # the observation span holds exactly the word read off the image (what `val/observation_acc` scores)
        if i == len(p.path) - 1:
            seen = f"The cell is {OBSERVATION_OPEN}{cfg.palette[p.colours[cell]]}{OBSERVATION_CLOSE}."
        else:
            seen = f"Its arrow points {OBSERVATION_OPEN}{DIRECTIONS[p.arrows[cell]]}{OBSERVATION_CLOSE}."
        steps += [
            {"type": "text", "text": move},
            {"type": "aux_image", "ref": f"aux{i}"},
            {"type": "text", "text": seen},
        ]
    return steps


# ---------------------------------------------------------------- rendering


def frame_width(cell: int) -> int:
    """Frame thickness in pixels for a cell of `cell` pixels (3 px for 16-px cells)."""
    return max(1, round(cell * 3 / 16))


@lru_cache(maxsize=None)
def arrow_masks(cell: int) -> np.ndarray:
    """(4, cell, cell) bool masks of the filled arrow triangle per direction, drawn once with ImageDraw."""
    m = frame_width(cell) + 1  # the arrow stays clear of the frame
    lo, hi = m, cell - 1 - m  # lo + hi = cell - 1: the shape is symmetric about the cell's centre line
    a, b = (cell - 1) // 2, cell // 2  # the tip: 2 px wide for even cells, 1 px for odd ones
    img = Image.new("L", (cell, cell), 0)
    ImageDraw.Draw(img).polygon([(a, lo), (b, lo), (hi, hi), (lo, hi)], fill=255)  # "up", (x, y) vertices
    up = np.asarray(img) > 0  # (cell, cell)
    # The other directions are exact flips of "up", so no direction differs in size or shape.
    masks = {"up": up, "down": up[::-1], "left": up.T, "right": up.T[:, ::-1]}
    masks = [masks[name] for name in DIRECTIONS]
    return np.stack(masks)  # (4, cell, cell)


def arrow_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black arrows on light cells, white on dark ones (by luma)."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return BLACK if luma > 140 else WHITE


def _draw_frame(img: np.ndarray, cell_rc: tuple[int, int], cell: int) -> None:
    w = frame_width(cell)
    y, x = cell_rc[0] * cell, cell_rc[1] * cell
    block = img[y : y + cell, x : x + cell]  # (cell, cell, 3) view
    block[:w], block[-w:], block[:, :w], block[:, -w:] = WHITE, WHITE, WHITE, WHITE


def render_grid(cfg: SynthConfig, p: Puzzle) -> np.ndarray:
    """(H, W, 3) uint8 grid of backgrounds and (with `moves="arrows"`) arrows, without any frame."""
    cell, g = cfg.cell_size, cfg.grid_size
    rgb = np.array([COLOURS[name] for name in cfg.palette], dtype=np.uint8)  # (P, 3)
    ink = np.array([arrow_colour(COLOURS[name]) for name in cfg.palette], dtype=np.uint8)  # (P, 3)
    cells = np.broadcast_to(rgb[p.colours][:, :, None, None, :], (g, g, cell, cell, 3)).copy()  # (G, G, c, c, 3)
    if cfg.moves == "arrows":  # with colour moves the cells are plain: the colour says everything
        mask = arrow_masks(cell)[p.arrows]  # (G, G, c, c)
        cells[mask] = np.broadcast_to(ink[p.colours][:, :, None, None, :], (g, g, cell, cell, 3))[mask]
    return np.ascontiguousarray(cells.transpose(0, 2, 1, 3, 4)).reshape(g * cell, g * cell, 3)  # (H, W, 3)


def render_images(cfg: SynthConfig, p: Puzzle) -> dict[str, Image.Image]:
    """img0 (the question image, framed start cell) and aux0..auxK (step i's cell highlighted)."""
    cell = cfg.cell_size
    base = render_grid(cfg, p)
    question = base.copy()
    _draw_frame(question, p.frame, cell)
    images = {"img0": Image.fromarray(question, "RGB")}
    grey = np.array(GREY, dtype=np.float32)
    dimmed = (base * (1.0 - cfg.aux_dim) + grey * cfg.aux_dim).round().astype(np.uint8)  # (H, W, 3)
    for i, (r, c) in enumerate(p.path):
        aux = dimmed.copy()
        rows, cols = slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell)
        aux[rows, cols] = base[rows, cols]  # (cell, cell, 3): the step's cell at full colour
        _draw_frame(aux, (r, c), cell)
        images[f"aux{i}"] = Image.fromarray(aux, "RGB")
    return images


# ---------------------------------------------------------------- samples and shards


def sample_key(split: str, index: int) -> str:
    """Key of sample `index` of `split`, e.g. "synth-train-00000042"."""
    return f"synth-{split}-{index:08d}"


def generate_sample(cfg: SynthConfig, seed: int, split: str, index: int) -> RawSample:
    """Sample `index` of `split`; a pure function of its arguments."""
    puzzle = make_puzzle(cfg, seed, split, index)
    key = sample_key(split, index)
    return RawSample(key=key, meta=build_meta(cfg, puzzle, key), images=render_images(cfg, puzzle))


def generate_split(cfg: SynthConfig, seed: int, split: str, n: int) -> Iterator[RawSample]:
    """Samples 0..n-1 of `split`."""
    for index in range(n):
        yield generate_sample(cfg, seed, split, index)


def corpus_texts(cfg: SynthConfig, n: int = 2000, seed: int = 0) -> Iterator[str]:
    """Text items of `n` samples for training a tokenizer, without rendering images.

    Task kinds, both kinds of moves and every colour of `COLOURS` appear whatever `cfg` says, so one tokenizer
    covers every stage of a curriculum and every variant of the task (each colour name one token).
    """
    variants = [replace(cfg, moves=m, palette=tuple(COLOURS), num_choices=len(COLOURS)) for m in ("arrows", "colours")]
    for index in range(n):
        variant = variants[(index // len(TASK_KINDS)) % len(variants)]
        puzzle = make_puzzle(variant, seed, "corpus", index, task=TASK_KINDS[index % len(TASK_KINDS)])
        yield from sample_texts(build_meta(variant, puzzle, sample_key("corpus", index)))


def synthesize(
    out_dir: str | Path,
    cfg: SynthConfig,
    *,
    train: int,
    val: int,
    test: int = 0,
    seed: int = 0,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> dict:
    """Write `out_dir/{train,val}/shard-*.tar` (and `test/` when `test > 0`) and `out_dir/manifest.json`;
    return the manifest. `val` is for decisions during training (validation curves, tuning); `test` is a
    held-out split no decision may look at. Splits never share a sample (each split seeds its own stream).

    Old `shard-*.tar` files in the split folders are removed first, so a smaller re-run leaves no stale
    shards. Shard paths in the manifest are relative to `out_dir`.
    """
    if train < 0 or val < 0 or test < 0:
        raise ValueError(f"train, val and test must be >= 0, got train={train}, val={val}, test={test}")
    out = Path(out_dir)
    splits = {}
    for split, n in (("train", train), ("val", val), ("test", test)):
        if split == "test" and n == 0:
            continue
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*split_dir.glob("shard-*.tar"), *split_dir.glob(".shard-*.tar.tmp-*")]:  # old shards, dead writes
            stale.unlink()
        stats = write_shards(
            generate_split(cfg, seed, split, n),
            split_dir,
            prefix="shard",
            samples_per_shard=samples_per_shard,
            progress=progress,
            desc=f"synth {split}",
            total=n,
        )
        splits[split] = {
            "written": stats.written,
            "skipped": dict(sorted(stats.skipped.items())),
            "shards": [Path(s).relative_to(out).as_posix() for s in stats.shards],
        }
    manifest = {"seed": seed, "generator": asdict(cfg), "splits": splits, "format_version": FORMAT_VERSION}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_text(out / "manifest.json", text)
    return json.loads(text)  # exactly what the file holds (tuples become lists)
