"""Qwen2.5-VL as a native backbone: fixed-size images, its own vision tower and merger, 3D rotary positions.

Images: each image is resized (the processor's resample, bicubic) to one `image_size` square and run through
the model's own `Qwen2VLImageProcessor` with its dynamic resize off (rescale, normalise, patchify). The
transform un-patchifies the result to (3, S, S), so batches stay (N, 3, H, W) like every backbone's, and
`encode_images` patchifies again in the processor's layout: (N·gh·gw, 3·t·p·p) rows with a (1, gh, gw) grid
per image. The tower merges 2×2 patches into one LM token: (gh/2)·(gw/2) tokens per image, row-major. The
trade-off: a fixed token count (mmlatent's data pipeline expands images before the model sees them) in
exchange for Qwen's native resolution per image; pick `image_size` for the detail a task needs.

Positions are those of Qwen's `get_rope_index` for this fixed grid, computed from the bound image layout
(see `native_backbone.py`): text and latent slots advance by 1 on all three axes (temporal, height,
width); the token at (row, col) of an image whose first token sits at p0 is at (p0, p0 + row, p0 + col);
after the image, positions go on at p0 + max(h, w) rather than p0 + h·w. So with 1D position p and c images
completed before a column, a text position is p − c·(h·w − max(h, w)).
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import Qwen2_5_VLConfig, Qwen2VLImageProcessor

from mmlatent.model.native_backbone import NativeBackbone, RandomNativeConfig, register

DEFAULT_IMAGE_SIZE = 448
"""Image side of a pretrained Qwen2.5-VL when `native.image_size` is None: 16×16 = 256 tokens."""


def patchify(images: Tensor, patch: int, merge: int, temporal: int) -> Tensor:
    """(N, C, H, W) -> (N, gh·gw, C·temporal·patch²) in Qwen2VLImageProcessor's order (merge windows first)."""
    N, C, H, W = images.shape
    gh, gw = H // patch, W // patch
    x = images.reshape(N, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (N, gh/m, gw/m, m, m, C, p, p)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)  # (N, gh/m, gw/m, m, m, C, t, p, p)
    return x.reshape(N, gh * gw, C * temporal * patch * patch)


def unpatchify(patches: Tensor, height: int, width: int, patch: int, merge: int, temporal: int) -> Tensor:
    """(gh·gw, C·temporal·patch²) patches of one image -> (C, H, W); inverse of `patchify` (first frame)."""
    gh, gw = height // patch, width // patch
    x = patches.reshape(gh // merge, gw // merge, merge, merge, -1, temporal, patch, patch)[:, :, :, :, :, 0]
    x = x.permute(4, 0, 2, 5, 1, 3, 6)  # (C, gh/m, m, p, gw/m, m, p)
    return x.reshape(-1, height, width)


class FixedSizeTransform:
    """PIL image -> (3, S, S): resized to S×S, then the model's image processor, then un-patchified."""

    def __init__(self, processor, size: int, patch: int, merge: int, temporal: int):
        self.processor, self.size, self.patch, self.merge, self.temporal = processor, size, patch, merge, temporal

    def __call__(self, image: Image.Image) -> Tensor:
        resample = Image.Resampling(int(getattr(self.processor, "resample", Image.Resampling.BICUBIC)))
        image = image.convert("RGB").resize((self.size, self.size), resample=resample)
        patches = self.processor(images=image, do_resize=False, return_tensors="pt")["pixel_values"]  # (gh·gw, 3·t·p²)
        return unpatchify(patches, self.size, self.size, self.patch, self.merge, self.temporal)  # (3, S, S)


@register("qwen2_5_vl")
class Qwen2_5_VLBackbone(NativeBackbone):
    """`Qwen2_5_VLForConditionalGeneration` (any size) with fixed-size images and mRoPE positions."""

    model_type = "qwen2_5_vl"

    def random_config(self, r: RandomNativeConfig, vocab_size: int, image_token_id: int) -> Qwen2_5_VLConfig:
        half = r.hidden_size // r.num_attention_heads // 2  # rotary frequencies per head
        hw = 3 * half // 8  # the released models' split of the frequencies: 1/4 temporal, 3/8 height, 3/8 width
        return Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=vocab_size, hidden_size=r.hidden_size, intermediate_size=r.intermediate_size,
                num_hidden_layers=r.num_hidden_layers, num_attention_heads=r.num_attention_heads,
                num_key_value_heads=r.num_key_value_heads, max_position_embeddings=4096,
                bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * hw, hw, hw]},
            ),
            vision_config=dict(
                depth=r.vision_layers, hidden_size=r.vision_hidden_size, intermediate_size=r.vision_intermediate_size,
                num_heads=r.vision_heads, out_hidden_size=r.hidden_size, patch_size=r.patch_size,
                spatial_merge_size=2, temporal_patch_size=2, window_size=4 * r.patch_size,  # 2×2-token windows
                fullatt_block_indexes=[r.vision_layers - 1],
            ),
            image_token_id=image_token_id,
            tie_word_embeddings=r.tie_word_embeddings,
        )

    def random_image_processor(self, r: RandomNativeConfig) -> Qwen2VLImageProcessor:
        return Qwen2VLImageProcessor(patch_size=r.patch_size, merge_size=2, temporal_patch_size=2)

    def vision_modules(self) -> list[nn.Module]:
        visual = self.vlm.model.visual
        return [m for name, m in visual.named_children() if name != "merger"]

    def projector_modules(self) -> list[nn.Module]:
        return [self.vlm.model.visual.merger]

    def setup_images(self) -> None:
        v = self.vlm.config.vision_config
        self.patch, self.merge, self.temporal = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
        for name, want in (("patch_size", self.patch), ("merge_size", self.merge), ("temporal_patch_size", self.temporal)):
            have = getattr(self.image_processor, name, want)
            if have != want:
                raise ValueError(f"the image processor's {name}={have} disagrees with the vision tower's {want}")
        random = self.cfg.name_or_path is None
        side = self.cfg.image_size or (self.cfg.random_init.image_size if random else DEFAULT_IMAGE_SIZE)
        factor = self.patch * self.merge
        if side % factor:
            raise ValueError(f"native.image_size={side} must be a multiple of {factor} (patch {self.patch} × merge {self.merge})")
        self.image_size = side
        g = side // factor
        self.token_grid = (g, g)
        self.tokens_per_image = g * g

    def image_transform(self, train: bool = False) -> Callable[[Image.Image], Tensor]:
        """The same fixed-size transform in training and evaluation (no augmentation)."""
        return FixedSizeTransform(self.image_processor, self.image_size, self.patch, self.merge, self.temporal)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        N, _, H, W = pixel_values.shape
        if N == 0:
            return pixel_values.new_zeros(0, self.tokens_per_image, self.hidden_size)
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"images of {H}×{W} px; this backbone encodes {self.image_size}-px squares (its image_transform)")
        patches = patchify(pixel_values.to(self.vision_dtype), self.patch, self.merge, self.temporal)  # (N, gh·gw, P)
        grid = torch.tensor([1, H // self.patch, W // self.patch], device=pixel_values.device).expand(N, 3)  # (N, 3)
        feats = self.vlm.model.get_image_features(patches.flatten(0, 1), grid).pooler_output  # N × (T, D)
        return torch.stack(list(feats))  # (N, T, D)

    def lm_positions(self, position_ids: Tensor, start: int) -> Tensor:
        """1D positions (B, S) at columns start.. -> (3, B, S) temporal/height/width positions."""
        B, S = position_ids.shape
        mask = self._image_mask
        if mask is None:  # nothing bound: a text-only forward
            return position_ids[None].expand(3, B, S)
        if mask.shape[0] != B:
            raise ValueError(
                f"forward_lm over {B} rows, but the bound image layout has {mask.shape[0]}: embed the sequences "
                f"with LatentVLM.embed_inputs before running them"
            )
        T, (gh, gw) = self.tokens_per_image, self.token_grid
        mask = mask.to(position_ids.device).long()  # (B, L)
        L = mask.shape[1]
        before = mask.cumsum(1) - mask  # (B, L) image tokens before each column
        cols = torch.arange(start, start + S, device=position_ids.device)  # (S,)
        inside = cols < L  # columns past the bound sequence (decoding) are text after every image
        idx = cols.clamp(max=L - 1)
        n_before = torch.where(inside, before[:, idx], mask.sum(1, keepdim=True))  # (B, S)
        is_image = inside & (mask[:, idx] == 1)  # (B, S)
        done, k = n_before // T, n_before % T  # images completed before; index inside the image
        base = position_ids - done * (T - max(gh, gw))  # (B, S) text positions
        first = base - k  # (B, S) position of the image's first token
        t = torch.where(is_image, first, base)
        h = torch.where(is_image, first + k // gw, base)
        w = torch.where(is_image, first + k % gw, base)
        return torch.stack([t, h, w])  # (3, B, S)
