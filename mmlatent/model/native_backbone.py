"""Native transformers VLMs (Qwen2.5-VL, the LLaVA family) behind mmlatent's `Backbone` interface.

A native backbone wraps one `AutoModelForImageTextToText` model (`self.vlm`): its own vision tower and
projector encode images (`get_image_features`), its decoder runs on `inputs_embeds` with a KV cache, its
head gives logits. The HF model's own `forward` and placeholder tokens are not used: mmlatent places the
visual tokens into its `<|image|>` slots itself, exactly as for the composed backbone. A Hub id and a local
folder load through the same `from_pretrained`; `RandomNativeConfig` builds a small random model for tests.
Families are looked up in `NATIVE_BACKBONES` by the typed `ModelConfig.backbone` name, never by name
matching; `qwen2_5_vl.py` and `llava.py` register themselves, and `native_families.py` imports them.

Trade-offs:
- *A fixed number of tokens per image.* mmlatent's data pipeline expands each image into a fixed run of
  `tokens_per_image` slots before the model sees it, so every image is resized to one size (Qwen2.5-VL's
  dynamic resolution is given up: a 448-px square is 16×16 = 256 merged tokens).
- *Positions from a bound image layout.* Qwen2.5-VL's multimodal rotary positions depend on where the
  images sit, but `forward_lm` receives only embeddings and 1D positions (the latent loop, generation and
  the stages are backbone-agnostic). `LatentVLM.embed_inputs` therefore calls `bind_images(image_mask)`,
  and the following `forward_lm` calls map (column, 1D position) to the family's positions; the column of
  a segment is the KV cache's length (or 0 without a cache). The price is state between two calls: a
  forward over other sequences must re-embed them first, which every caller in mmlatent does.
- *Activation checkpointing with a KV cache.* transformers drops the cache inside checkpointed layers, which
  would break the cached latent loop. `ReplayCache` lets a layer be recomputed in the backward pass: the
  recompute reads the cached prefix as it was when the layer first ran, without appending again.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Literal

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AutoImageProcessor, AutoModelForImageTextToText, Cache, DynamicCache, PreTrainedModel
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from mmlatent.model.backbone import Backbone
from mmlatent.model.pretrained_source import DTYPES, PretrainedSource
from mmlatent.model.weight_memory import own_aligned_memory
from mmlatent.tokens import SPECIAL

NativeKind = Literal["qwen2_5_vl", "llava"]


@dataclass
class RandomNativeConfig:
    """Shape of a small randomly initialised native VLM (used when `NativeBackboneConfig.name_or_path` is None)."""

    hidden_size: int = 128
    """Width of the language model's residual stream."""
    num_hidden_layers: int = 2
    """Decoder layers of the language model."""
    num_attention_heads: int = 4
    """Query heads per decoder layer."""
    num_key_value_heads: int = 2
    """Key/value heads per decoder layer."""
    intermediate_size: int = 256
    """Width of the decoder MLP."""
    vision_hidden_size: int = 64
    """Width of the vision tower."""
    vision_layers: int = 2
    """Blocks of the vision tower."""
    vision_heads: int = 2
    """Attention heads of the vision tower."""
    vision_intermediate_size: int = 128
    """Width of the vision tower's MLP."""
    patch_size: int = 8
    """Vision patch side in pixels (Qwen2.5-VL: before its 2×2 merge of patches into one LM token)."""
    image_size: int = 64
    """Image side in pixels the random model is built for."""
    tie_word_embeddings: bool = True
    """Share input and output embeddings."""


@dataclass
class NativeBackboneConfig(PretrainedSource):
    """Which native VLM to load and how (used when `ModelConfig.backbone` is not `composed`); `name_or_path`
    (model and image processor), `revision`, `dtype`, `attn_implementation`: see `PretrainedSource`."""

    random_init: RandomNativeConfig = field(default_factory=RandomNativeConfig)
    """Shape of the random model (ignored when `name_or_path` is set)."""
    image_size: int | None = None
    """Side in pixels every image is resized to (square). Qwen2.5-VL: a multiple of patch × merge size (28 for
    the released models), giving (image_size / 28)² tokens; None: 448 (256 tokens), or `random_init.image_size`
    for a random model. LLaVA: None (the image processor crops to the vision tower's size)."""
    freeze_vision: bool = True
    """Freeze the vision tower (not its projector)."""
    freeze_projector: bool = False
    """Freeze the projector (Qwen2.5-VL's patch merger, LLaVA's multi-modal projector)."""
    freeze_lm: bool = False
    """Freeze the language model (decoder, embeddings, head); LoRA freezes it anyway."""

    RETIRED: ClassVar[dict[str, str]] = {"gradient_checkpointing": "model.acceleration.gradient_checkpointing"}
    """Fields of older versions and where they went: an old checkpoint or export that holds one still loads."""


class ReplayCache(DynamicCache):
    """A `DynamicCache` whose layers can be recomputed by activation checkpointing.

    Inside `replaying(lengths)` an update returns the layer's first `lengths[layer]` cached positions with
    the new states appended, and stores nothing: the recomputed layer sees exactly the prefix it saw the
    first time, although the cache has grown since.
    """

    def __init__(self, config: PreTrainedConfig):
        super().__init__(config=config)
        self._replay: list[int] | None = None

    def lengths(self) -> list[int]:
        """Cached positions per layer."""
        return [layer.get_seq_length() for layer in self.layers]

    @contextmanager
    def replaying(self, lengths: list[int]) -> Iterator[None]:
        self._replay = lengths
        try:
            yield
        finally:
            self._replay = None

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if self._replay is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        n = self._replay[layer_idx]
        if n == 0:
            return key_states, value_states
        layer = self.layers[layer_idx]
        keys = torch.cat([layer.keys[..., :n, :], key_states], dim=-2)  # (B, H_kv, n + S, d)
        values = torch.cat([layer.values[..., :n, :], value_states], dim=-2)
        return keys, values


NATIVE_BACKBONES: dict[str, type["NativeBackbone"]] = {}


def register(kind: str) -> Callable[[type["NativeBackbone"]], type["NativeBackbone"]]:
    def add(cls: type[NativeBackbone]) -> type[NativeBackbone]:
        if kind in NATIVE_BACKBONES:
            raise ValueError(f"native backbone {kind!r} registered twice")
        NATIVE_BACKBONES[kind] = cls
        cls.kind = kind
        return cls

    return add


class NativeBackbone(Backbone):
    """What every native family shares: loading, freezing, the LM forward, the cache and checkpointing.

    A family sets `model_type` and implements `random_config`, `random_image_processor`, `vision_modules`,
    `projector_modules`, `setup_images`, `image_transform` and `encode_images`; it overrides `lm_positions`
    when its positions are not the 1D ones.
    """

    kind: ClassVar[str]
    model_type: ClassVar[str]
    """`config.model_type` of the transformers model this family loads."""

    def __init__(self, cfg: NativeBackboneConfig, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.vlm = self._load_model(cfg, tokenizer)
        self.image_processor = (
            self.random_image_processor(cfg.random_init) if cfg.name_or_path is None
            else AutoImageProcessor.from_pretrained(cfg.name_or_path, revision=cfg.revision)
        )
        text = self.vlm.config.get_text_config()
        self.hidden_size = text.hidden_size
        self.num_layers = text.num_hidden_layers
        self._image_mask: Tensor | None = None  # (B, L) set by bind_images
        self._active_cache: Cache | None = None  # the cache of the forward in progress (for checkpointing)
        self.setup_images()  # sets tokens_per_image and token_grid
        self._freeze()

    # ------------------------------------------------------------------------------------------ loading

    def _load_model(self, cfg: NativeBackboneConfig, tokenizer) -> PreTrainedModel:
        dtype = DTYPES[cfg.dtype]
        if cfg.name_or_path is not None:
            try:
                vlm = AutoModelForImageTextToText.from_pretrained(
                    cfg.name_or_path, revision=cfg.revision, dtype=dtype,
                    attn_implementation=cfg.attn_implementation, use_safetensors=True,
                )
            except OSError as err:
                raise ValueError(f"native.name_or_path={cfg.name_or_path!r} could not be loaded: {err}") from err
            if vlm.config.model_type != self.model_type:
                raise ValueError(
                    f"native.name_or_path={cfg.name_or_path!r} holds a {vlm.config.model_type!r} model; "
                    f"backbone={self.kind!r} needs {self.model_type!r}"
                )
            own_aligned_memory(vlm)  # out of the file's buffers: see weight_memory.py
        else:
            image_token = tokenizer.convert_tokens_to_ids(SPECIAL.image)
            hf_cfg = self.random_config(cfg.random_init, vocab_size=len(tokenizer), image_token_id=image_token)
            vlm = AutoModelForImageTextToText.from_config(hf_cfg, dtype=dtype, attn_implementation=cfg.attn_implementation)
        if vlm.get_input_embeddings().weight.shape[0] < len(tokenizer):  # room for mmlatent's special tokens
            vlm.resize_token_embeddings(len(tokenizer))
        return vlm.train()  # `from_pretrained` returns eval mode; a fresh module trains (LatentVLM sets the mode)

    def random_config(self, r: RandomNativeConfig, vocab_size: int, image_token_id: int) -> PreTrainedConfig:
        """The transformers config of a random model of this family."""
        raise NotImplementedError

    def random_image_processor(self, r: RandomNativeConfig):
        """The family's image processor for a random model (a loaded model reads its own)."""
        raise NotImplementedError

    def vision_modules(self) -> list[nn.Module]:
        """The vision tower, without its projector."""
        raise NotImplementedError

    def projector_modules(self) -> list[nn.Module]:
        """The projector from vision features to LM space."""
        raise NotImplementedError

    def setup_images(self) -> None:
        """Fix the image geometry: set `tokens_per_image` and `token_grid`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- training settings

    def lm_modules(self) -> list[nn.Module]:
        """The language model: decoder, input embeddings and output head."""
        return [self.vlm.get_decoder(), self.vlm.get_input_embeddings(), self.vlm.get_output_embeddings()]

    def _freeze(self) -> None:
        for flag, modules in (
            (self.cfg.freeze_vision, self.vision_modules()),
            (self.cfg.freeze_projector, self.projector_modules()),
            (self.cfg.freeze_lm, self.lm_modules()),
        ):
            if flag:
                for module in modules:
                    module.requires_grad_(False)

    def enable_checkpointing(self) -> None:
        """Checkpoint the decoder layers (and the vision blocks when the tower trains), cache included
        (`model.acceleration.gradient_checkpointing` turns it on)."""
        self.vlm.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": self._checkpoint_contexts}
        )
        for module in self.vlm.get_decoder().modules():
            if isinstance(module, GradientCheckpointingLayer):
                module._can_checkpoint_with_cache = True  # safe: ReplayCache makes the recompute read-only
        if self.cfg.freeze_vision:  # nothing to recompute for a frozen tower
            for tower in self.vision_modules():
                for module in tower.modules():
                    if isinstance(module, GradientCheckpointingLayer):
                        module.gradient_checkpointing = False
            self._frozen_tower_needs_no_grad()

    def _frozen_tower_needs_no_grad(self) -> None:
        """Undo transformers' `enable_input_require_grads` on the vision tower. Checkpointing hooks the input
        embeddings of every sub-model, the tower's patch embedding included, to make their output require
        grad; a frozen tower would then keep every block's activations for a backward that changes nothing
        (3 GiB at Qwen2.5-VL-3B's 32 blocks and two images), with its checkpointing off."""
        tower_hooks = {id(hook) for tower in self.vision_modules() for module in tower.modules()
                       for hook in module._forward_hooks.values()}
        kept = []
        for handle in getattr(self.vlm, "_require_grads_hooks", []):
            hooks = handle.hooks_dict_ref()
            if hooks is not None and handle.id in hooks and id(hooks[handle.id]) in tower_hooks:
                handle.remove()
            else:
                kept.append(handle)
        self.vlm._require_grads_hooks = kept

    def _checkpoint_contexts(self):
        """`torch.utils.checkpoint` context_fn: the recompute sees the cache lengths of the first run."""
        cache = self._active_cache
        if not isinstance(cache, ReplayCache):
            return nullcontext(), nullcontext()
        return nullcontext(), cache.replaying(cache.lengths())

    # ---------------------------------------------------------------------------------- the interface

    def new_cache(self) -> Cache:
        return ReplayCache(config=self.vlm.config.get_text_config())

    @property
    def transformers_model(self) -> PreTrainedModel:
        return self.vlm

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision_modules()[0].parameters()).dtype

    def bind_images(self, image_mask: Tensor) -> None:
        self._image_mask = image_mask

    @contextmanager
    def running(self, cache: Cache | None) -> Iterator[None]:
        """Keep the cache of the decoder call in progress, for the checkpointing contexts (`ReplayCache`)."""
        self._active_cache = cache
        try:
            yield
        finally:
            self._active_cache = None

    def image_transform(self, train: bool = False) -> Callable[[Image.Image], Tensor]:
        raise NotImplementedError
