"""The LLaVA family (`LlavaForConditionalGeneration`: LLaVA-1.5 and other CLIP/SigLIP + projector + LM models).

A LLaVA image processor already returns one fixed-size square (resize and centre crop, or pad and resize),
so each image gives the same number of tokens: the patch grid of the feature layer the config selects,
through the multi-modal projector. That number is measured once at load time by encoding a blank image,
which covers any tower and `vision_feature_layer`/`vision_feature_select_strategy` setting without a table
of towers; it must form a square grid (grounding targets are pooled on it), so a kept CLS token
(`vision_feature_select_strategy="full"` on CLIP) is refused with a clear message. The LM uses 1D positions.
LLaVA-NeXT's any-resolution tiling (a variable token count per image) is a different class and not covered.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig

from mmlatent.model.native_backbone import NativeBackbone, RandomNativeConfig, register


class ProcessorTransform:
    """PIL image -> (3, S, S) through the model's own image processor, checked against the tower's size."""

    def __init__(self, processor, size: int):
        self.processor, self.size = processor, size

    def __call__(self, image: Image.Image) -> Tensor:
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]  # (3, H, W)
        if tuple(pixels.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"the image processor returned {tuple(pixels.shape)}; the vision tower takes {self.size}-px squares")
        return pixels


@register("llava")
class LlavaBackbone(NativeBackbone):
    """`LlavaForConditionalGeneration`: vision tower -> multi-modal projector -> causal LM."""

    model_type = "llava"

    def random_config(self, r: RandomNativeConfig, vocab_size: int, image_token_id: int) -> LlavaConfig:
        return LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=r.vision_hidden_size, intermediate_size=r.vision_intermediate_size,
                num_hidden_layers=r.vision_layers, num_attention_heads=r.vision_heads,
                image_size=r.image_size, patch_size=r.patch_size,
            ),
            text_config=LlamaConfig(
                vocab_size=vocab_size, hidden_size=r.hidden_size, intermediate_size=r.intermediate_size,
                num_hidden_layers=r.num_hidden_layers, num_attention_heads=r.num_attention_heads,
                num_key_value_heads=r.num_key_value_heads, max_position_embeddings=4096,
                bos_token_id=None, eos_token_id=None, tie_word_embeddings=r.tie_word_embeddings,
            ),
            image_token_id=image_token_id,
            vision_feature_layer=-2,  # LLaVA-1.5's choice: the penultimate layer's patch tokens
            vision_feature_select_strategy="default",
            tie_word_embeddings=r.tie_word_embeddings,
        )

    def random_image_processor(self, r: RandomNativeConfig) -> CLIPImageProcessor:
        return CLIPImageProcessor(size={"shortest_edge": r.image_size}, crop_size={"height": r.image_size, "width": r.image_size})

    def vision_modules(self) -> list[nn.Module]:
        return [self.vlm.model.vision_tower]

    def projector_modules(self) -> list[nn.Module]:
        return [self.vlm.model.multi_modal_projector]

    def setup_images(self) -> None:
        side = self.vlm.config.vision_config.image_size
        if self.cfg.image_size not in (None, side):
            raise ValueError(f"native.image_size={self.cfg.image_size}: a LLaVA vision tower takes {side}-px images; leave it null")
        self.image_size = side
        with torch.no_grad():
            n = self.encode_images(torch.zeros(1, 3, side, side), check=False).shape[1]
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(
                f"{n} visual tokens per image do not form a square grid (a CLS token kept by "
                f"vision_feature_select_strategy='full'?); mmlatent needs the patch grid"
            )
        self.tokens_per_image, self.token_grid = n, (g, g)

    def image_transform(self, train: bool = False) -> Callable[[Image.Image], Tensor]:
        """The processor's own transform in training and evaluation (no augmentation)."""
        return ProcessorTransform(self.image_processor, self.image_size)

    def encode_images(self, pixel_values: Tensor, check: bool = True) -> Tensor:
        if pixel_values.shape[0] == 0:
            return pixel_values.new_zeros(0, self.tokens_per_image, self.hidden_size)
        if check and tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images of {tuple(pixel_values.shape[-2:])} px; the vision tower takes {self.image_size}-px squares")
        feats = self.vlm.model.get_image_features(pixel_values=pixel_values.to(self.vision_dtype)).pooler_output
        return torch.stack(list(feats))  # (N, T, D)
