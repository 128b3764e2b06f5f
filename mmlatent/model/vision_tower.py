"""The vision tower: a `timm` or `open_clip` image encoder that returns patch tokens, and its preprocessing.

`VisionTower(cfg)(pixel_values)` maps (N, 3, H, W) images to (N, T, D) patch tokens in row-major grid
order, without CLS/register tokens and before any pooling or contrastive projection, which is what a
LLaVA-style projector consumes. `image_transform()` is the library's own preprocessing at the tower's
input size (timm's `resolve_model_data_config` + `create_transform`, open_clip's `image_transform_v2`
with the model's preprocess config), so pixel statistics always match the weights; nothing is
hand-normalised here.

Both libraries build a model the same three ways: random init (the tiny presets, from-scratch runs, with
depth/width/heads/patch-size overrides), a local weights file (how tests and offline clusters load real
weights), or the library's own pretrained source (timm: `pretrained="hub"`; open_clip: a pretrained tag or
an `hf-hub:` name). The parts that patch tokens never reach (classifier heads, attention pools, the
contrastive projection, open_clip's text tower) are pruned with the libraries' own calls, so an unfrozen
tower has no unused parameters under DDP.

Trade-off: open_clip weights are loaded through `open_clip.create_model`, which builds the whole CLIP model
(text tower included) before we keep only `model.visual`. That costs transient memory at start-up, but it
reuses open_clip's checkpoint handling (format conversions, positional-embedding resampling, tags,
`hf-hub:` repos) instead of a vision-only loader of our own that would drift from it.

The tower is frozen by default (DESIGN §1): no trainable parameters, always in eval mode, forward under
`no_grad`. `open_clip_configs/` ships `mmlatent-vit-tiny-16` (2 layers, width 96, 16-px patches at 64 px:
a 4x4 grid), registered with open_clip at import so the tiny open_clip preset works offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, TypeVar

import open_clip
import timm
import torch
from open_clip.factory import load_state_dict as open_clip_load_state_dict
from open_clip.pretrained import is_pretrained_cfg as open_clip_is_pretrained_tag
from open_clip.timm_model import TimmModel
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import VisionTransformer as OpenClipViT
from PIL import Image
from safetensors import safe_open
from torch import Tensor, nn

OPEN_CLIP_CONFIG_DIR = Path(__file__).parent / "open_clip_configs"
open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)  # once per process: makes `mmlatent-vit-tiny-16` a known name

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".npz")
NAME_SCHEMES = ("hf-hub:", "local-dir:")
T = TypeVar("T")


@dataclass
class VisionTowerConfig:
    """Which image encoder to use, how to initialise it, and whether it trains."""

    library: Literal["timm", "open_clip"] = "timm"
    """The library that builds the encoder."""
    name: str = "vit_tiny_patch16_224"
    """Model name in that library. timm: an architecture, optionally with a pretrained tag
    (`vit_base_patch16_224.augreg_in21k`), or `hf-hub:org/repo`. open_clip: a config name (`ViT-B-16`,
    `ViT-B-16-SigLIP`, mmlatent's `mmlatent-vit-tiny-16`) or `hf-hub:org/repo` (which brings its own weights)."""
    pretrained: str | None = None
    """None: random init. A local weights file (safetensors, or .bin/.pth read with `weights_only=True`)
    loads that file, strictly: timm reads it through `pretrained_cfg_overlay`; open_clip takes a full CLIP
    checkpoint (keys `visual.*`) through `create_model`, or a state dict of this tower's module. Otherwise
    open_clip's pretrained tag (`laion2b_s34b_b79k`, `webli`), or for timm `hub` for the name's default
    Hub weights."""
    image_size: int | None = None
    """Input resolution override (e.g. 64 for the tiny presets). Works with pretrained weights too (the
    library resamples the positional embedding). None keeps the model's own."""
    depth: int | None = None
    """Random-init override: number of transformer blocks (timm `depth`, open_clip `layers`)."""
    width: int | None = None
    """Random-init override: token width (timm `embed_dim`, open_clip `width`)."""
    heads: int | None = None
    """Random-init override: attention heads (timm `num_heads`; open_clip `head_width = width // heads`)."""
    patch_size: int | None = None
    """Random-init override: patch size in pixels. The overrides also apply with a local weights file
    (to rebuild a small tower that was saved), whose shapes must then match."""
    crop_pct: float | None = None
    """timm only: centre-crop fraction of the eval transform (timm ViTs default to 0.9, which cuts the
    image border). 1.0 keeps the whole image, as the synthetic grids need. None keeps timm's value.
    open_clip's eval transform already keeps all of a square image."""
    freeze: bool = True
    """Freeze the tower: no trainable parameters, kept in eval mode even when the model trains, forward
    under `no_grad`."""
    sincos_pos_embed: float | None = None
    """Random init only: set the patch position embeddings to fixed-frequency 2D sin-cos values (as MAE)
    times this scale, instead of the library's small random ones (still trained), so a random tower's tokens
    say *where* a patch is as well as *what* it shows, which a query that finds a cell by position needs.
    None keeps the library's init; ignored with pretrained weights, which bring their own."""

    def __post_init__(self) -> None:
        for field_name in ("image_size", "depth", "width", "heads", "patch_size"):
            value = getattr(self, field_name)
            if value is not None and value < 1:
                raise ValueError(f"vision.{field_name}={value}: must be a positive integer or None")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"vision.crop_pct={self.crop_pct}: must be in (0, 1] or None")

    @property
    def arch_overrides(self) -> dict[str, int]:
        """The random-init architecture overrides that are set, by config field name."""
        fields = {"depth": self.depth, "width": self.width, "heads": self.heads, "patch_size": self.patch_size}
        return {k: v for k, v in fields.items() if v is not None}


class VisionTower(nn.Module):
    """(N, 3, H, W) images -> (N, T, D) patch tokens, T = h * w in row-major grid order."""

    hidden_size: int
    """Width D of the patch tokens."""
    grid_size: tuple[int, int]
    """Patch grid (h, w)."""
    num_tokens: int
    """Tokens per image, h * w."""
    image_size: tuple[int, int]
    """Input resolution (H, W) the tower and its transform use."""

    def __init__(self, cfg: VisionTowerConfig):
        super().__init__()
        self.cfg = cfg
        weights_file = _weights_file(cfg.pretrained)
        if cfg.library == "timm":
            self.model = _create_timm(cfg, weights_file)
            self._timm_data_config = timm.data.resolve_model_data_config(self.model, args=_timm_data_args(cfg))
            self.image_size = _pair(self._timm_data_config["input_size"][1:])
            self._kind: Literal["timm", "open_clip_vit"] = "timm"
        elif cfg.library == "open_clip":
            if cfg.crop_pct is not None:
                raise ValueError("vision.crop_pct is timm only; open_clip's eval transform keeps the whole image")
            full_checkpoint = weights_file is not None and _is_full_clip_checkpoint(weights_file)
            visual = _create_open_clip_visual(cfg, weights_file, full_checkpoint)
            self._open_clip_preprocess = PreprocessCfg(**visual.preprocess_cfg)
            self.image_size = _pair(self._open_clip_preprocess.size)
            if isinstance(visual, TimmModel):  # e.g. SigLIP: a timm trunk plus open_clip's pooling head
                self.model = _prune_timm(visual.trunk)
                self._kind = "timm"
            else:
                self.model = visual
                self._kind = "open_clip_vit"
                self._open_clip_ln_post = _prune_open_clip_vit(visual)
            if weights_file is not None and not full_checkpoint:
                _load_module_weights(self.model, weights_file)  # after pruning: the file is a pruned module's
        else:
            raise ValueError(f"vision.library={cfg.library!r}: expected 'timm' or 'open_clip'")

        self.grid_size, self.hidden_size = self._probe()
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        if cfg.sincos_pos_embed is not None and cfg.pretrained is None:
            self._set_sincos_pos_embed(cfg.sincos_pos_embed)
        if cfg.freeze:
            self.model.requires_grad_(False)
        self.train(self.training)

    def _set_sincos_pos_embed(self, scale: float) -> None:
        """Overwrite the patch positions' embeddings with 2D sin-cos values × `scale` (prefix tokens kept)."""
        if self._kind == "timm":
            table, prefix = self.model.pos_embed[0], getattr(self.model, "num_prefix_tokens", 1)  # (prefix + T, D)
        else:
            table, prefix = self.model.positional_embedding, 1  # (1 + T, D)
        if table.shape[0] != prefix + self.num_tokens:
            raise ValueError(f"vision.sincos_pos_embed: {type(self.model).__name__} has no per-patch position table")
        with torch.no_grad():
            table[prefix:] = scale * sincos_2d(self.grid_size, table.shape[1]).to(table)  # (T, D)

    def train(self, mode: bool = True) -> "VisionTower":
        """Set the training mode; a frozen tower stays in eval mode (no dropout, fixed norm statistics)."""
        super().train(mode)
        if self.cfg.freeze:
            self.model.eval()
        return self

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, T, D) patch tokens, prefix tokens dropped, row-major over the grid."""
        dtype = next(self.model.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze):
            return self._tokens(pixel_values.to(dtype))  # (N, T, D)

    def image_transform(self, train: bool = False) -> Callable[[Image.Image], Tensor]:
        """The library's own PIL -> (3, H, W) transform at the tower's image size.

        `train=True` gives the library's training augmentation (timm: random-resized crop, flip, colour
        jitter; open_clip: random-resized crop at scale 0.9-1). Those change geometry, so tasks whose answer
        depends on position (the synthetic grids) should use `train=False` throughout.
        """
        if self.cfg.library == "timm":
            return timm.data.create_transform(**self._timm_data_config, is_training=train)
        return image_transform_v2(self._open_clip_preprocess, is_train=train)

    def _tokens(self, x: Tensor) -> Tensor:
        if self._kind == "open_clip_vit":
            out = self.model.forward_intermediates(
                x,
                indices=1,
                normalize_intermediates=self._open_clip_ln_post,
                intermediates_only=True,
                output_fmt="NLC",
            )
            return out["image_intermediates"][-1]  # (N, T, width): last block, CLS dropped, pre-projection
        feats = self.model.forward_features(x)
        if feats.ndim == 4:  # a convnet's (N, D, h, w) feature map
            return feats.flatten(2).transpose(1, 2)  # (N, h*w, D)
        return feats[:, self.model.num_prefix_tokens :]  # (N, T, D) without CLS/register tokens

    def _probe(self) -> tuple[tuple[int, int], int]:
        """Run one blank image through the tower to read the token width and check the grid."""
        if self._kind == "open_clip_vit":
            grid = _pair(self.model.grid_size)
        elif hasattr(self.model, "patch_embed"):
            grid = _pair(self.model.patch_embed.grid_size)
        else:
            grid = None
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            blank = torch.zeros(1, 3, *self.image_size, dtype=next(self.model.parameters()).dtype)  # (1, 3, H, W)
            if grid is None:
                fmap = self.model.forward_features(blank)
                if fmap.ndim != 4:
                    raise ValueError(f"vision.name={self.cfg.name!r}: unsupported feature layout {tuple(fmap.shape)}")
                grid = (fmap.shape[2], fmap.shape[3])
            tokens = self._tokens(blank)  # (1, T, D)
        self.model.train(was_training)
        if tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                f"vision.name={self.cfg.name!r}: {tokens.shape[1]} tokens do not fill a {grid[0]}x{grid[1]} "
                f"patch grid; this architecture is not supported as a patch-token tower"
            )
        return grid, tokens.shape[2]


def _pair(size: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _weights_file(pretrained: str | None) -> str | None:
    """The local file `pretrained` names, or None when it names none (random init, a tag, `hub`)."""
    if pretrained is None:
        return None
    if os.path.isfile(pretrained):
        return pretrained
    if os.sep in pretrained or "/" in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"vision.pretrained={pretrained!r}: no such weights file")
    return None


def _timm_data_args(cfg: VisionTowerConfig) -> dict[str, object]:
    """timm's data-config overrides (its own `args` mapping): the input size and crop we built for."""
    args: dict[str, object] = {}
    if cfg.image_size is not None:
        args["input_size"] = (3, cfg.image_size, cfg.image_size)
    if cfg.crop_pct is not None:
        args["crop_pct"] = cfg.crop_pct
    return args


def _create_timm(cfg: VisionTowerConfig, weights_file: str | None) -> nn.Module:
    if not (timm.is_model(cfg.name) or cfg.name.startswith("hf-hub:")):
        raise ValueError(f"vision.name={cfg.name!r} is not a timm model name (see timm.list_models())")
    if cfg.pretrained is not None and weights_file is None and cfg.pretrained != "hub":
        raise ValueError(
            f"vision.pretrained={cfg.pretrained!r}: for timm give a local weights file, 'hub' for the name's "
            f"default Hub weights, or None for random init (put a pretrained tag in vision.name)"
        )
    # Only the overrides that are set, under timm's names.
    kwargs: dict[str, object] = {"num_classes": 0}
    timm_names = {
        "image_size": "img_size",
        "depth": "depth",
        "width": "embed_dim",
        "heads": "num_heads",
        "patch_size": "patch_size",
    }
    overrides = [f"vision.{f}" for f in timm_names if getattr(cfg, f) is not None]
    for field_name, timm_name in timm_names.items():
        if getattr(cfg, field_name) is not None:
            kwargs[timm_name] = getattr(cfg, field_name)
    if weights_file is not None:
        kwargs["pretrained_cfg_overlay"] = _timm_file_overlay(cfg.name, weights_file)
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained is not None, **kwargs)
    except TypeError as err:  # an override the architecture does not take
        raise ValueError(f"vision.name={cfg.name!r} does not take the overrides {overrides}: {err}") from err
    except (RuntimeError, OSError) as err:
        raise ValueError(f"vision.pretrained={cfg.pretrained!r} could not be loaded into {cfg.name!r}: {err}") from err
    if weights_file is not None:
        model.pretrained_cfg["state_dict"] = None  # do not keep a second copy of the weights alive
    return _prune_timm(model)


def _timm_file_overlay(name: str, weights_file: str) -> dict[str, object]:
    """timm's `pretrained_cfg_overlay` that loads `weights_file` strictly.

    timm reads the file with its own reader (safetensors, or `torch.load(weights_only=True)`); its
    checkpoint filter (format conversion, positional-embedding resampling) still runs. Given a file with
    `num_classes` differing from the model's, timm would drop the classifier *and load non-strictly*, so a
    file of another model would silently leave random weights. Instead we drop the classifier here and
    declare `num_classes=0`, which keeps timm's load strict: a wrong file is an error.
    """
    state_dict = _read_weights(weights_file, timm.models.load_state_dict)
    classifier = timm.models.get_pretrained_cfg_value(name, "classifier") or "head"
    for head in (classifier,) if isinstance(classifier, str) else classifier:
        state_dict.pop(f"{head}.weight", None)
        state_dict.pop(f"{head}.bias", None)
    return dict(state_dict=state_dict, num_classes=0, source="", custom_load=False)


def _prune_timm(model: nn.Module) -> nn.Module:
    """Drop the pooling and classifier that `forward_features` never reaches (timm's own pruning call)."""
    if hasattr(model, "prune_intermediate_layers"):
        model.prune_intermediate_layers(indices=1, prune_norm=False, prune_head=True)
    else:
        model.reset_classifier(0, "")
    return model


def _open_clip_model_cfg(cfg: VisionTowerConfig) -> dict[str, object] | None:
    """The `vision_cfg` to build with when architecture overrides are set (None: the name's own)."""
    if not cfg.arch_overrides:
        return None
    if cfg.name.startswith(NAME_SCHEMES):
        raise ValueError(
            f"vision.name={cfg.name!r} loads weights; the random-init overrides "
            f"{sorted(cfg.arch_overrides)} need an open_clip config name"
        )
    vision_cfg = dict(open_clip.get_model_config(cfg.name)["vision_cfg"])
    if "timm_model_name" in vision_cfg or not isinstance(vision_cfg.get("layers", 12), int):
        raise ValueError(
            f"vision.name={cfg.name!r} is not an open_clip ViT config; the overrides {sorted(cfg.arch_overrides)} "
            f"apply to open_clip's own ViTs only"
        )
    width = cfg.width if cfg.width is not None else vision_cfg.get("width", 768)
    head_width = width // cfg.heads if cfg.heads is not None else vision_cfg.get("head_width", 64)
    if head_width < 1 or width % head_width:
        raise ValueError(f"vision.heads={cfg.heads}: width {width} must split into whole heads of width {head_width}")
    vision_cfg.update(width=width, head_width=head_width)
    if cfg.depth is not None:
        vision_cfg["layers"] = cfg.depth
    if cfg.patch_size is not None:
        vision_cfg["patch_size"] = cfg.patch_size
    if cfg.image_size is not None:
        vision_cfg["image_size"] = cfg.image_size
    return vision_cfg


def _create_open_clip_visual(cfg: VisionTowerConfig, weights_file: str | None, full_checkpoint: bool) -> nn.Module:
    """Build (and, for a tag or a full checkpoint, load) the CLIP model through open_clip; keep `visual`."""
    is_schema = cfg.name.startswith(NAME_SCHEMES)
    if not is_schema and open_clip.get_model_config(cfg.name) is None:
        raise ValueError(f"vision.name={cfg.name!r} is not an open_clip model config (see open_clip.list_models())")
    if is_schema and cfg.pretrained is not None:
        raise ValueError(
            f"vision.pretrained must be None with vision.name={cfg.name!r}: that repository brings its weights"
        )
    is_tag = cfg.pretrained is not None and open_clip_is_pretrained_tag(cfg.name, cfg.pretrained)
    if cfg.pretrained is not None and weights_file is None and not is_tag:
        raise ValueError(
            f"vision.pretrained={cfg.pretrained!r} is neither a local weights file nor an open_clip tag for "
            f"{cfg.name!r}; tags: {open_clip.list_pretrained_tags_by_model(cfg.name)}"
        )
    model_kwargs: dict[str, object] = {}
    vision_cfg = _open_clip_model_cfg(cfg)
    if vision_cfg is not None:
        model_kwargs["vision_cfg"] = vision_cfg
    try:
        clip = open_clip.create_model(
            cfg.name,
            pretrained=cfg.pretrained if (weights_file is None or full_checkpoint) else None,
            force_image_size=cfg.image_size,
            weights_only=True,
            **model_kwargs,
        )
    except (RuntimeError, OSError, KeyError) as err:
        raise ValueError(f"vision.pretrained={cfg.pretrained!r} could not be loaded into {cfg.name!r}: {err}") from err
    visual = clip.visual
    if not isinstance(visual, (OpenClipViT, TimmModel)):
        raise ValueError(f"vision.name={cfg.name!r}: a {type(visual).__name__} tower gives no patch tokens; use a ViT")
    return visual  # the text tower goes with `clip`


def _prune_open_clip_vit(visual: OpenClipViT) -> bool:
    """Drop what patch tokens never reach (projection, attention pools); return whether `ln_post` applies.

    Tokens are `ln_post`-normalised exactly when open_clip's own `output_tokens` would normalise them:
    not with an attention pool (there `ln_post` has the pool's width) nor with `final_ln_after_pool`.
    """
    ln_post = visual.attn_pool is None and not visual.final_ln_after_pool
    visual.prune_intermediate_layers(indices=1, prune_norm=not ln_post, prune_head=True)
    visual.attn_pool = visual.attn_pool_contrastive = None
    return ln_post


def _is_full_clip_checkpoint(path: str) -> bool:
    """A whole open_clip model's weights (keys `visual.*`, `.npz` big_vision files) vs one tower's module."""
    if path.endswith(".npz"):
        return True
    if path.endswith(".safetensors"):
        keys = _read_weights(path, _safetensors_keys)  # the header only
    else:
        keys = list(_read_weights(path, open_clip_load_state_dict))  # torch.load(weights_only=True)
    return any(k.startswith("visual.") for k in keys)


def _safetensors_keys(path: str) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def _read_weights(path: str, read: Callable[[str], T]) -> T:
    """`read(path)`, with any failure to parse the file reported against the config field."""
    try:
        return read(path)
    except Exception as err:  # safetensors, pickle (weights_only refusals) and zip errors share no base class
        raise ValueError(f"vision.pretrained={path!r} could not be read as weights: {err}") from err


def _load_module_weights(module: nn.Module, path: str) -> None:
    """Load a state dict of the tower's own (pruned) module, strictly."""
    try:
        module.load_state_dict(_read_weights(path, open_clip_load_state_dict), strict=True)
    except RuntimeError as err:
        raise ValueError(f"vision.pretrained={path!r} does not match this tower's module: {err}") from err


def sincos_2d(grid: tuple[int, int], dim: int) -> Tensor:
    """(h·w, dim) fixed 2D sin-cos position codes, row-major: the first half of the channels encodes the row,
    the second half the column, each as sines and cosines of geometric frequencies (MAE's embedding)."""
    h, w = grid
    half = dim // 2

    def axis(n: int, d: int) -> Tensor:
        pos = torch.arange(n, dtype=torch.float64)[:, None]  # (n, 1)
        freq = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) * 2 / d)  # (d/2,)
        angle = pos * freq[None]  # (n, d/2)
        return torch.cat([angle.sin(), angle.cos()], dim=1)  # (n, d)

    rows = axis(h, half).repeat_interleave(w, dim=0)  # (h·w, half)
    cols = axis(w, dim - half).repeat(h, 1)  # (h·w, dim - half)
    return torch.cat([rows, cols], dim=1).float()  # (h·w, dim)
