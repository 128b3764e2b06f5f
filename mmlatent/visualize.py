"""Pictures of what latent blocks looked at and what they can reconstruct.

`visualize_answer` draws a generated answer: for every latent block, the question image (with the cell
the block should stand for outlined, when the question's path is known) and one relevance heatmap per
thought over the image's token grid, the most relevant token marked. It shows what happened in the
generation that produced the answer, not a teacher-forced replay.

`visualize_sample` draws one block of a training-layout sample (teacher-forced):
the question image; for every thought (LQ-Former slot) a heatmap over the image's patch grid of the visual tokens it selected, weighted by relevance; the block's
target (the auxiliary image it stands for) and the diffusion head's reconstruction of that target's
visual tokens from the block's latent vectors, both shown by PCA colouring (the three main components of
the true target tokens, mapped to RGB). A PCA picture needs no decoder back to pixels, which the tiny
model does not have; the trade-off is that colours only mean "similar features look alike".
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor  # noqa: E402

from mmlatent.data.batch import Batch  # noqa: E402
from mmlatent.evaluation.chart import save_figure  # noqa: E402
from mmlatent.model.diffusion_head import sample as diffusion_sample  # noqa: E402
from mmlatent.model.diffusion_head import sample_scheduler  # noqa: E402
from mmlatent.model.latent_loop import latent_forward  # noqa: E402
from mmlatent.model.latent_vlm import LatentVLM  # noqa: E402


def pca_rgb(reference: Tensor, *others: Tensor) -> list[np.ndarray]:
    """Project (T, D) token sets on the top-3 principal components of `reference`; scale to [0, 1]."""
    mean = reference.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(reference - mean, full_matrices=False)
    basis = v[:3].T  # (D, 3)
    proj = [((x - mean) @ basis) for x in (reference, *others)]  # each (T, 3)
    lo, hi = proj[0].min(0).values, proj[0].max(0).values
    return [((p - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1).numpy() for p in proj]


def to_image(pixels: Tensor) -> np.ndarray:
    """A normalised (3, H, W) tensor -> an (H, W, 3) image in [0, 1] (min-max, for display only)."""
    x = pixels.float()
    return ((x - x.min()) / (x.max() - x.min()).clamp_min(1e-6)).permute(1, 2, 0).numpy()


@torch.no_grad()
def visualize_sample(model: LatentVLM, batch: Batch, out_path: str | Path, row: int = 0, seed: int = 0) -> Path:
    """Write the PNG for sample `row` of a latent-layout batch (first block of that sample)."""
    fwd = latent_forward(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.pixel_values,
                         prompt_end=batch.prompt_end)
    ids = batch.input_ids[row]
    starts = (ids == model.ids.latent_start).nonzero().flatten()
    if starts.numel() == 0:
        raise ValueError(f"sample {batch.keys[row]} has no latent block to visualise")
    start = int(starts[0])
    end = start + 1 + int((ids[start + 1 :] == model.ids.latent_end).nonzero()[0])
    slots = fwd.latent_mask.nonzero()  # (n_slots, 2) row-major, the order of fwd.latent_vectors
    block = [i for i, (r, c) in enumerate(slots.tolist()) if r == row and start < c < end]
    grid = model.backbone.token_grid
    image_index = int(sum(int((batch.input_ids[r] == model.ids.image).sum()) for r in range(row)) // model.tokens_per_image)
    panels: list[tuple[str, np.ndarray, str | None]] = [("question image", to_image(batch.pixel_values[image_index]), None)]
    if fwd.relevance is not None:
        for j, i in enumerate(block):
            heat = fwd.relevance[i][: grid[0] * grid[1]].reshape(grid).numpy()
            panels.append((f"thought {j + 1}: selected", heat, "magma"))
    blocks_before = int(sum(int((batch.input_ids[r] == model.ids.latent_start).sum()) for r in range(row)))
    target_at = (batch.aux_blocks == blocks_before).nonzero().flatten()
    if target_at.numel():
        aux = batch.aux_pixel_values[int(target_at[0])]
        panels.append(("block target (aux image)", to_image(aux), None))
        target = model.grounding_targets(aux[None])[0]  # (T, D)
        if model.diffusion_head is not None:
            cond = fwd.latent_vectors[block][None]  # (1, N, D)
            gen = torch.Generator().manual_seed(seed)
            sched = sample_scheduler(model.cfg.latent.diffusion)
            recon = diffusion_sample(model.diffusion_head, sched, cond, tuple(target.shape), model.cfg.latent.diffusion.sample_steps, generator=gen)[0]
            true_rgb, recon_rgb = pca_rgb(target.float(), recon.float())
            panels.append(("target tokens (PCA)", true_rgb.reshape(*grid, 3), None))
            panels.append(("diffusion reconstruction (PCA)", recon_rgb.reshape(*grid, 3), None))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.8))
    for ax, (title, img, cmap) in zip(np.atleast_1d(axes), panels):
        ax.imshow(img, cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{batch.keys[row]}: latent block of {len(block)} slots", fontsize=9)
    return save_figure(fig, out_path)


def visualize_answer(
    question_image: Image.Image,
    latents: list,
    token_grid: tuple[int, int],
    out_path: str | Path,
    title: str = "",
    path: list[tuple[int, int]] | None = None,
    cells: int | None = None,
    max_blocks: int = 4,
) -> Path:
    """Write a PNG of a generated answer's latent blocks (`Generated.latents`, thought mode).

    `path` (cells visited, one per block) and `cells` (cells per side of the image's grid) outline, in each
    block's row, the cell that block should stand for.
    """
    blocks: dict[int, list] = {}
    for record in latents:
        if record.relevance is not None:
            blocks.setdefault(record.block, []).append(record)
    if not blocks:
        raise ValueError("the answer has no latent thought with a relevance map (thought mode) to draw")
    rows = sorted(blocks)[:max_blocks]
    width = 1 + max(len(blocks[b]) for b in rows)
    gh, gw = token_grid
    fig, axes = plt.subplots(len(rows), width, figsize=(1.9 * width, 2.0 * len(rows)), squeeze=False)
    image = np.asarray(question_image.convert("RGB"))
    for i, b in enumerate(rows):
        ax = axes[i][0]
        ax.imshow(image)
        if path is not None and cells and b < len(path):
            r, c = path[b]
            h, w = image.shape[0] / cells, image.shape[1] / cells
            ax.add_patch(plt.Rectangle((c * w, r * h), w, h, fill=False, edgecolor="white", linewidth=2.5))
            ax.add_patch(plt.Rectangle((c * w, r * h), w, h, fill=False, edgecolor="black", linewidth=1.0))
        ax.set_title(f"block {b + 1}" + (": its cell" if path is not None else ""), fontsize=8)
        ax.axis("off")
        for j in range(1, width):
            ax = axes[i][j]
            ax.axis("off")
            if j - 1 >= len(blocks[b]):
                continue
            rel = blocks[b][j - 1].relevance[: gh * gw].float().reshape(gh, gw).numpy()
            ax.imshow(rel, cmap="magma", vmin=0.0, vmax=max(float(rel.max()), 1e-6), interpolation="nearest")
            top = divmod(int(rel.argmax()), gw)
            ax.scatter([top[1]], [top[0]], marker="x", color="cyan", s=30)
            ax.set_title(f"thought {j}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out_path)
