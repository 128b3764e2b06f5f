"""The latent-block picture: question image, per-thought selection heatmaps, target and reconstruction."""

from __future__ import annotations

from itertools import product
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from mmlatent import visualize
from mmlatent.data.pipeline import ShardStream
from mmlatent.data.processor import Processor
from mmlatent.model.generation import LatentRecord
from mmlatent.model.latent_loop import latent_forward
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.presets import preset
from mmlatent.training.stages import StageConfig, build_stage
from mmlatent.visualize import visualize_answer, visualize_sample

DPI = 120
"""The resolution the pictures are saved at."""


def first_batch(model, synth_dir, stage: str):
    layout = build_stage(StageConfig(name=stage, align_weight=0.0)).layout(model.cfg.latent.slots)
    proc = Processor.for_model(model, layout)
    urls = sorted(str(p) for p in (synth_dir / "val").glob("*.tar"))
    return next(iter(ShardStream(urls, proc, proc.collate, 2,
                                 shuffle_buffer=0, loop=False)))


@pytest.fixture
def figures(monkeypatch) -> Iterator[list]:
    """The matplotlib figures the pictures were drawn on (kept open past the module's `plt.close`), to find
    where each panel landed in the PNG."""
    kept = []
    close = visualize.plt.close
    monkeypatch.setattr(visualize.plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def pixel(png: np.ndarray, fig, ax, x: float, y: float) -> np.ndarray:
    """The RGB pixel of the saved PNG at data point (x, y) of panel `ax` (for an image: column x, row y)."""
    dx, dy = ax.transData.transform((x, y)) * DPI / fig.dpi
    return png[int(png.shape[0] - dy), int(dx)].astype(int)


def test_visualisation_png_has_every_panel(synth_dir, tmp_path, figures):
    """Eight panels side by side; the question and target images are drawn pixel for pixel, and every thought
    heatmap is brighter where that slot's relevance is higher (its brightest cell is its most relevant token)."""
    cfg = preset("tiny")
    cfg.latent.mode, cfg.latent.diffusion_head = "thought", True
    cfg.latent.diffusion.sample_steps = 3
    model = LatentVLM(cfg).eval()
    batch, row = first_batch(model, synth_dir, "stage3"), 1
    path = visualize_sample(model, batch, tmp_path / "block.png", row=row)
    img = Image.open(path)
    # question image + 4 thought heatmaps + aux target + target PCA + reconstruction PCA = 8 panels side by side
    assert img.width > 6 * img.height / 1.5 and img.height > 200
    png, (fig,) = np.asarray(img.convert("RGB")), figures
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [
        "question image", *[f"thought {j}: selected" for j in range(1, 5)], "block target (aux image)",
        "target tokens (PCA)", "diffusion reconstruction (PCA)",
    ]
    # the question image (row 1's only image) and its first block's target, drawn unchanged
    blocks_before = int((batch.input_ids[:row] == model.ids.latent_start).sum())
    aux = batch.aux_pixel_values[int((batch.aux_blocks == blocks_before).nonzero()[0])]
    for ax, pixels in ((axes[0], batch.pixel_values[row]), (axes[5], aux)):
        want = np.round(visualize.to_image(pixels) * 255).astype(int)
        for y, x in [(0, 0), (5, 40), (32, 32), (63, 10), (63, 63)]:
            assert np.abs(pixel(png, fig, ax, x, y) - want[y, x]).max() <= 1, (ax.get_title(), x, y)
    # thought j's heatmap follows the relevance of slot j of row 1's first block
    with torch.no_grad():
        fwd = latent_forward(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.pixel_values)
    slots = [i for i, (r, _) in enumerate(fwd.latent_mask.nonzero().tolist()) if r == row][: model.cfg.latent.slots]
    gh, gw = model.backbone.token_grid
    for ax, slot in zip(axes[1:5], slots):
        heat = fwd.relevance[slot][: gh * gw].reshape(gh, gw).numpy()
        bright = np.array([[pixel(png, fig, ax, c, r).sum() for c in range(gw)] for r in range(gh)])
        order = np.argsort(heat, axis=None)
        assert (np.diff(bright.flatten()[order]) >= 0).all(), ax.get_title()  # magma: more relevant, brighter
        assert bright.flatten()[order[-1]] > bright.flatten()[order[0]] + 300, ax.get_title()


def test_answer_picture_marks_the_path_cell_and_the_most_relevant_token(tmp_path, figures):
    """`visualize_answer`: each block's row outlines the cell its path says on the question image and draws
    every thought's relevance as a heatmap, bright only at its most relevant token (marked in cyan)."""
    grid, cells = (4, 4), 3
    image = Image.new("RGB", (90, 90), (128, 128, 128))
    hot = {(0, 0): 6, (0, 1): 9, (1, 0): 3}  # (block, slot) -> token with all the relevance (off the diagonal)
    latents = []
    for (block, slot), token in hot.items():
        relevance = torch.zeros(16 + 4)  # the grid's tokens first, then other visual tokens (ignored)
        relevance[token] = 1.0
        latents.append(LatentRecord(block, slot, torch.zeros(8), None, relevance))
    path = [(1, 2), (2, 0)]  # block 0 stands for cell (1, 2), block 1 for cell (2, 0) of a 3 × 3 grid
    out = visualize_answer(image, latents, grid, tmp_path / "answer.png", title="q", path=path, cells=cells)
    png, (fig,) = np.asarray(Image.open(out).convert("RGB")), figures
    axes = np.array(fig.axes).reshape(2, 3)  # 2 blocks; the question image and up to 2 thoughts per row
    assert [ax.get_title() for ax in axes[:, 0]] == ["block 1: its cell", "block 2: its cell"]
    grey, side = np.array([128, 128, 128]), 90 / cells

    def edges(r: int, c: int) -> set[tuple[float, float]]:
        """Midpoints (x, y) of the cell's four sides, in image pixels."""
        return {((c + 0.5) * side, r * side), ((c + 0.5) * side, (r + 1) * side),
                (c * side, (r + 0.5) * side), ((c + 1) * side, (r + 0.5) * side)}

    for b, cell in enumerate(path):
        ax = axes[b, 0]
        for r, c in product(range(cells), range(cells)):  # only the path cell's outline covers the grey image
            assert (pixel(png, fig, ax, (c + 0.5) * side, (r + 0.5) * side) == grey).all(), (b, r, c)
            for x, y in edges(r, c):
                if 0 < x < 90 and 0 < y < 90:
                    drawn = (pixel(png, fig, ax, x, y) != grey).any()
                    assert drawn == ((x, y) in edges(*cell)), (b, r, c, x, y)
    for (block, slot), token in hot.items():
        ax = axes[block, slot + 1]
        assert ax.get_title() == f"thought {slot + 1}"
        top = divmod(token, grid[1])
        for r, c in product(range(grid[0]), range(grid[1])):
            rgb = pixel(png, fig, ax, c + 0.3, r + 0.3)  # off the cross marker, which sits on the cell centre
            assert (rgb.sum() > 600) == ((r, c) == top), (block, slot, r, c, rgb)
        centre = pixel(png, fig, ax, top[1], top[0])
        assert centre[2] > 200 and centre[1] > 200 and centre[0] < 100, centre  # the cyan cross
    assert not axes[1, 2].images  # block 2 had one thought: its second panel stays empty


def test_visualisation_needs_a_latent_block(synth_dir, tmp_path, tiny_model):
    with pytest.raises(ValueError, match="no latent block"):
        visualize_sample(tiny_model, first_batch(tiny_model, synth_dir, "stage1"), tmp_path / "x.png")
