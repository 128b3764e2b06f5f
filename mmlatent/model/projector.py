"""The projector: vision-tower patch tokens to LM-space tokens, with optional pixel shuffle.

`kind="mlp"` is LLaVA-1.5's Linear-GELU-Linear, `kind="linear"` a single Linear. Pixel shuffle
(space-to-depth, as in nanoVLM and Idefics3) first merges each s×s block of neighbouring patches into
one token by concatenating their features: s² fewer tokens per image, each s²× wider. The trade-off is
sequence length against spatial detail: a 2× shuffle cuts the LM's visual prefix by 4 (less compute
and KV cache per image, more room for latent blocks) while keeping every patch feature, just packed into
fewer positions; the LM can no longer attend to single patches. It needs no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn


@dataclass
class ProjectorConfig:
    """How vision features become LM-space tokens."""

    kind: Literal["mlp", "linear"] = "mlp"
    """`mlp`: Linear-GELU-Linear (LLaVA-1.5). `linear`: one Linear layer."""
    pixel_shuffle: int = 1
    """Merge s×s neighbouring patches into one token (s² fewer tokens, s²× wider input), as in
    nanoVLM/Idefics3. 1 disables. The patch grid must be divisible by it."""
    hidden_mult: float = 1.0
    """Hidden width of the `mlp` projector as a multiple of the LM width (1.0 as in LLaVA-1.5).
    Ignored by `linear`."""
    centre: Literal["none", "image", "batch"] = "none"
    """Remove the part the output tokens share, which for a random tower is most of each token, so what the
    LM reads from a token (through attention) is what tells it apart: its content and place. `image`: each
    image's mean token is subtracted and its tokens scaled to unit RMS (an image's average then carries
    nothing). `batch`: each feature is standardised over all tokens of the batch (running estimates in
    evaluation, as batch norm without an affine part), so what differs between images (an image's average
    colour) stays; with several processes each rank standardises over its own micro-batch, as BatchNorm does
    unsynchronised. A pretrained tower's tokens need neither; real presets leave it `none`."""

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "linear"):
            raise ValueError(f"projector.kind={self.kind!r}: expected 'mlp' or 'linear'")
        if self.pixel_shuffle < 1:
            raise ValueError(f"projector.pixel_shuffle={self.pixel_shuffle}: must be >= 1 (1 disables it)")
        if self.hidden_mult <= 0:
            raise ValueError(f"projector.hidden_mult={self.hidden_mult}: must be > 0")
        if self.centre not in ("none", "image", "batch"):
            raise ValueError(f"projector.centre={self.centre!r}: expected 'none', 'image' or 'batch'")


def pixel_shuffle(x: Tensor, grid_size: tuple[int, int], scale: int) -> Tensor:
    """Space-to-depth on a row-major patch sequence.

    (N, h*w, D) -> (N, (h/s)*(w/s), s*s*D). Output tokens are row-major over the coarse grid; the features
    of output token (i, j) are the patches (i*s + a, j*s + b) concatenated in row-major (a, b) order, the
    same layout as nanoVLM's and Idefics3's pixel shuffle.
    """
    if scale == 1:
        return x
    n, t, d = x.shape
    h, w = grid_size
    if t != h * w:
        raise ValueError(f"pixel_shuffle: got {t} tokens for a {h}x{w} patch grid")
    x = x.reshape(n, h // scale, scale, w // scale, scale, d)  # (N, h/s, s, w/s, s, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, h/s, w/s, s, s, D)
    return x.reshape(n, (h // scale) * (w // scale), scale * scale * d)  # (N, T/s², s²·D)


class Projector(nn.Module):
    """(N, T, D_vision) patch tokens -> (N, T / s², D_lm) LM-space tokens."""

    num_tokens: int
    """Tokens per image after pixel shuffle."""
    grid_size: tuple[int, int]
    """The vision tower's patch grid (h, w) that the input tokens lie on, row-major."""

    def __init__(self, cfg: ProjectorConfig, vision_dim: int, lm_dim: int, grid_size: tuple[int, int]):
        super().__init__()
        s = cfg.pixel_shuffle
        h, w = grid_size
        if h % s or w % s:
            raise ValueError(
                f"projector.pixel_shuffle={s} does not divide the vision tower's {h}x{w} patch grid; "
                f"choose a divisor of both sides or change vision.image_size"
            )
        self.cfg = cfg
        self.grid_size = (h, w)
        self.token_grid = (h // s, w // s)
        """The (h, w) grid the output tokens lie on, row-major (after pixel-shuffle)."""
        self.num_tokens = (h // s) * (w // s)
        in_dim = vision_dim * s * s
        if cfg.kind == "mlp":
            hidden = max(1, round(cfg.hidden_mult * lm_dim))
            self.net: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_dim))
        elif cfg.kind == "linear":
            self.net = nn.Linear(in_dim, lm_dim)
        else:
            raise ValueError(f"projector.kind={cfg.kind!r}: expected 'mlp' or 'linear'")
        self.batch_norm = nn.BatchNorm1d(lm_dim, affine=False) if cfg.centre == "batch" else None

    def forward(self, x: Tensor) -> Tensor:
        x = pixel_shuffle(x, self.grid_size, self.cfg.pixel_shuffle)  # (N, T/s², s²·D_vision)
        x = self.net(x)  # (N, T/s², D_lm)
        if self.cfg.centre == "image":
            x = x - x.mean(1, keepdim=True)  # (N, T', D_lm): each image's mean token removed
            x = x / (x.pow(2).mean((1, 2), keepdim=True).sqrt() + 1e-6)  # unit RMS per image
        elif self.batch_norm is not None and x.shape[0] * x.shape[1] > 1:
            x = self.batch_norm(x.flatten(0, 1)).view_as(x)  # (N, T', D_lm): each feature standardised
        return x
