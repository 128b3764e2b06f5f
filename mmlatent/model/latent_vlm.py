"""`LatentVLM`: a backbone, its tokenizer and its latent modules; the model users build, train and load.

It owns the tokenizer (with mmlatent's special tokens), the backbone (composed, or a native transformers VLM
chosen by `ModelConfig.backbone`, optionally with LoRA adapters on its LM), and the modules that make latent
slot inputs: the sketch head (sketch mode) or the LQ-Former (thought mode), plus the optional grounding
heads (diffusion denoiser, contrastive temperature). It places visual tokens into a token sequence and
turns a hidden state into the next slot's input (`latent_step`); the loops that run latent blocks live in
`latent_loop.py` (training) and `generation.py` (inference).
It knows nothing of Lightning or of the data pipeline: it takes tensors and returns outputs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from mmlatent.model import serialization
from mmlatent.model.backbone import ComposedBackbone, LMOutput
from mmlatent.model.config import ModelConfig
from mmlatent.model.diffusion_head import DiffusionHead
from mmlatent.model.generation import Generated, GenerationConfig, generate_voted
from mmlatent.model.language_model import load_language_model
from mmlatent.model.lora import LoraAdapters, LoraConfig, apply_lora
from mmlatent.model.lq_former import LQFormer
from mmlatent.model.mc_dropout import RowDropout
from mmlatent.model.native_backbone import build_native_backbone
from mmlatent.model.sketch_head import SketchHead
from mmlatent.model.tokenizer import load_tokenizer
from mmlatent.chat_template import prompt_ids
from mmlatent.tokens import token_ids

IMAGE_MARKER = "<image>"
"""Where an image goes in a `LatentVLM.generate` prompt."""


@dataclass
class VisualContext:
    """Each sample's visual tokens (LM space), padded to M, with where they sit in the sequence."""

    tokens: Tensor
    """(B, M, D) visual tokens as placed in the LM input."""
    positions: Tensor
    """(B, M) sequence position of each token (a large value on padding)."""
    valid: Tensor
    """(B, M) True on real tokens."""

    def visible(self, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens and mask for slots at (rows, cols): only tokens placed before the slot are visible.

        rows, cols: (n,) sample index and sequence position of each slot -> (n, M, D), (n, M).
        """
        mask = self.valid[rows] & (self.positions[rows] < cols[:, None])  # (n, M)
        return self.tokens[rows], mask


@dataclass
class LatentStep:
    """The inputs for a set of latent slots, and what the LQ-Former looked at."""

    vector: Tensor
    """(n, D) slot inputs."""
    indices: Tensor | None
    """(n, k) visual tokens each thought selected (thought mode), -1 where none."""
    relevance: Tensor | None
    """(n, M) relevance map over the visual tokens (thought mode)."""


class LatentVLM(nn.Module):
    """A VLM that can reason in text and in latent blocks."""

    def __init__(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        self.ids = token_ids(self.tokenizer)
        if cfg.backbone == "composed":
            lm = load_language_model(cfg.lm, vocab_size=len(self.tokenizer))
            self.backbone = ComposedBackbone(cfg.vision, cfg.projector, lm)
        else:
            self.backbone = build_native_backbone(cfg.backbone, cfg.native, self.tokenizer)
        special = sorted(set(dataclasses.astuple(self.ids)))
        self.lora: LoraAdapters | None = (
            apply_lora(self.backbone.transformers_model, cfg.lora, special) if cfg.lora.enabled else None
        )
        D = self.backbone.hidden_size
        lat = cfg.latent
        self.sketch_head = SketchHead(lat.sketch_head, D) if lat.mode == "sketch" else None
        self.lq_former = LQFormer(lat.lq_former, D) if lat.mode == "thought" else None
        self.diffusion_head = DiffusionHead(lat.diffusion, target_dim=D, cond_dim=D) if lat.diffusion_head else None
        # CLIP's initial temperature 0.07, stored as the log of the inverse temperature
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if lat.contrastive else None

    @property
    def tokens_per_image(self) -> int:
        return self.backbone.tokens_per_image

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        """(B, L) ids and (N_img, 3, H, W) images -> (B, L, D) LM inputs with visual tokens in place.

        The k-th run of `tokens_per_image` image tokens (row-major over the batch) receives image k.
        """
        embeds = self.backbone.embed_tokens(input_ids)  # (B, L, D)
        slots = input_ids == self.ids.image  # (B, L)
        self.backbone.bind_images(slots)  # positions of the following LM forwards may depend on it (Qwen2.5-VL)
        n_slots = int(slots.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_images * self.tokens_per_image:
            raise ValueError(
                f"{n_slots} image tokens in the batch but {n_images} images × {self.tokens_per_image} tokens"
            )
        if n_images == 0:
            return embeds
        visual = self.backbone.encode_images(pixel_values)  # (N_img, T, D)
        visual = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)  # (N_img * T, D)
        return embeds.masked_scatter(slots.unsqueeze(-1), visual)

    def visual_context(self, input_ids: Tensor, embeds: Tensor, before: Tensor | None = None) -> VisualContext:
        """Gather each sample's visual tokens from the LM inputs (they are the image-token embeddings).

        before (B,): keep only the images placed before this position of each sample (its prompt), None: all.
        """
        slots = input_ids == self.ids.image  # (B, L)
        if before is not None:
            slots = slots & (torch.arange(input_ids.shape[1], device=input_ids.device)[None] < before[:, None])
        counts = slots.sum(1)  # (B,)
        M = max(int(counts.max()), 1)
        B, L = input_ids.shape
        order = torch.argsort((~slots).to(torch.int8), dim=1, stable=True)[:, :M]  # (B, M) image positions first
        valid = torch.arange(M, device=input_ids.device)[None] < counts[:, None]  # (B, M)
        tokens = torch.gather(embeds, 1, order[..., None].expand(B, M, embeds.shape[-1]))  # (B, M, D)
        positions = torch.where(valid, order, torch.full_like(order, torch.iinfo(torch.long).max))
        return VisualContext(tokens=tokens, positions=positions, valid=valid)

    def latent_step(
        self, h: Tensor, visual: Tensor | None = None, visual_mask: Tensor | None = None, mc: RowDropout | None = None
    ) -> LatentStep:
        """Hidden states at p-1 (n, D) -> inputs for slots p (n, D), in the configured mode. `mc`: MC dropout
        in the LQ-Former (thought mode; the sketch head has no dropout)."""
        if self.lq_former is None:
            if mc is not None:
                raise ValueError("MC dropout (latent_noise='mc_dropout') acts on the LQ-Former's dropout: thought mode "
                                 "only; sketch mode has none (use latent_noise 'gaussian' or 'dropout')")
            return LatentStep(vector=self.sketch_head(h), indices=None, relevance=None)
        if visual is None:  # no image at all: an empty context
            visual = h.new_zeros(h.shape[0], 1, h.shape[-1])
            visual_mask = torch.zeros(h.shape[0], 1, dtype=torch.bool, device=h.device)
        thought = self.lq_former(h, visual.to(h.dtype), visual_mask, mc)
        return LatentStep(vector=thought.vector, indices=thought.indices, relevance=thought.relevance)

    @torch.no_grad()
    def grounding_targets(self, aux_pixel_values: Tensor) -> Tensor:
        """(N_tgt, 3, H, W) auxiliary images -> (N_tgt, T, D) their visual tokens in LM space, detached.

        Targets never carry gradient: a target path the model could shrink would let it collapse.
        """
        return self.backbone.encode_images(aux_pixel_values).detach()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        pixel_values: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> LMOutput:
        """Teacher-forced forward over whole sequences (stage 1, the direct baseline)."""
        embeds = self.embed_inputs(input_ids, pixel_values)  # (B, L, D)
        return self.backbone.forward_lm(
            embeds, attention_mask, position_ids, output_hidden_states=output_hidden_states
        )

    @torch.no_grad()
    def generate(
        self, images: list[Image.Image | list[Image.Image]], prompts: list[str], config: GenerationConfig | None = None
    ) -> list[Generated]:
        """Answer questions about images, batched: `images[i]` (one PIL image or a list) goes with `prompts[i]`.

        Each `<image>` in a prompt marks where its next image goes; a prompt without markers gets its images
        first, as the training data puts question images; the model's `cfg.system_prompt`, if any, opens
        every prompt (the chat template of training, `mmlatent.chat_template`). Returns one `Generated` per prompt: `.text`, the
        positions spent, and with `config.return_latents` the vectors of its latent blocks (thought mode: what
        each thought selected). Decoding follows `config` (greedy, latent blocks allowed, by default).
        """
        if len(images) != len(prompts):
            raise ValueError(f"generate: {len(images)} image entries for {len(prompts)} prompts")
        device = next(self.parameters()).device
        ids, pixels = [], []
        for i, (imgs, text) in enumerate(zip(images, prompts)):
            prompt, prompt_pixels = self.prompt(imgs, text, where=f"generate: prompt {i}")
            ids.append(prompt.to(device))
            if prompt_pixels.shape[0]:
                pixels.append(prompt_pixels)
        pixel_values = torch.cat(pixels).to(device) if pixels else torch.zeros(0, 3, 1, 1, device=device)  # (N_img, 3, H, W)
        was_training = self.training
        self.eval()
        try:
            return generate_voted(self, ids, pixel_values, config or GenerationConfig())
        finally:
            self.train(was_training)

    def prompt(self, images: Image.Image | list[Image.Image], text: str, where: str = "prompt") -> tuple[Tensor, Tensor]:
        """One `generate` prompt as ids (L,) and images (N_img, 3, H, W): a user turn of `text` with its images
        at the `<image>` markers (first, without markers), after the model's `system_prompt`, rendered with
        the chat template training renders samples with."""
        imgs = [images] if isinstance(images, Image.Image) else list(images)
        pieces = text.split(IMAGE_MARKER)
        image, words = {"type": "image"}, lambda piece: {"type": "text", "text": piece}
        if len(pieces) == 1:
            content = [*[image] * len(imgs), words(text)]
        elif len(pieces) - 1 == len(imgs):
            content = [x for k, piece in enumerate(pieces) for x in ([image, words(piece)] if k else [words(piece)])
                       if x.get("text") != ""]
        else:
            raise ValueError(f"{where} has {len(pieces) - 1} {IMAGE_MARKER} markers for {len(imgs)} images")
        messages = [{"role": "user", "content": content}]
        ids = prompt_ids(self.tokenizer, messages, self.tokens_per_image, self.cfg.system_prompt)
        transform = self.backbone.image_transform(train=False)
        pixels = [transform(img.convert("RGB")) for img in imgs]
        return torch.tensor(ids), torch.stack(pixels) if pixels else torch.zeros(0, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, dir_or_hub_id: str | Path, revision: str | None = None, token: str | None = None) -> "LatentVLM":
        """Load a folder written by `save_pretrained` / `mmlatent export`, or a Hub id (safetensors only), in
        eval mode on the CPU, computing exactly what the saved model did."""
        cfg, state = serialization.read_pretrained(dir_or_hub_id, revision=revision, token=token)
        return serialization.restore(cls(cfg), state, where=dir_or_hub_id)

    def save_pretrained(self, out_dir: str | Path, max_shard_size: int | str = "5GB", generation=None, overwrite: bool = False) -> Path:
        """Write this model as a Hub-ready folder (atomic; sharded safetensors past `max_shard_size`).
        Upload it with `mmlatent.hub.publish.push_folder`, or write and upload at once with `push_model`."""
        return serialization.save_pretrained(self, out_dir, max_shard_size=max_shard_size, generation=generation, overwrite=overwrite)

    def merge_lora(self) -> "LatentVLM":
        """Fold the LoRA adapters into the LM's weights, in place; the model becomes a plain one.

        Its `cfg.lora` is switched off (a new config object), so saving it writes a model that loads without
        peft. A model without adapters is returned unchanged.
        """
        if self.lora is not None:
            self.lora.merge()
            self.lora = None
            self.cfg = dataclasses.replace(self.cfg, lora=LoraConfig())
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
