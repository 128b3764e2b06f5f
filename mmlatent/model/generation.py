"""Batched decoding with a KV cache.

Prompts of different lengths are left-padded into one batch with explicit position ids, so every sample's
next token sits in the last column and one single-position LM forward per step serves the whole batch;
the prefix is encoded once. Samples that finish (`<|im_end|>`) keep stepping on padding until all are
done, which keeps the loop free of per-sample Python control flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmlatent.model.latent_vlm import LatentVLM


@dataclass
class GenerationConfig:
    """Decoding settings."""

    max_new_tokens: int = 96
    """Longest continuation per sample."""
    do_sample: bool = False
    """Sample from the distribution instead of greedy argmax."""
    temperature: float = 1.0
    """Softmax temperature when sampling."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling (1.0 keeps the full distribution)."""
    seed: int | None = None
    """Seed of the sampling generator (None: torch's global RNG)."""


def split_prompts(
    input_ids: Tensor, prompt_lengths: Tensor, pixel_values: Tensor, image_id: int, tokens_per_image: int
) -> tuple[list[Tensor], Tensor]:
    """Cut each row of a right-padded (B, L) training batch to its prompt and keep only the prompt images.

    Returns the B prompt id tensors and the (N_prompt_img, 3, H, W) images they reference, in order.
    """
    prompts, keep, first = [], [], 0
    for row, n in zip(input_ids, prompt_lengths.tolist()):
        n_all = int((row == image_id).sum()) // tokens_per_image
        n_prompt = int((row[:n] == image_id).sum()) // tokens_per_image
        keep.extend(range(first, first + n_prompt))
        first += n_all
        prompts.append(row[:n])
    return prompts, pixel_values[keep]


def left_pad(prompts: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad prompts; returns ids (B, L), attention mask (B, L) and position ids (B, L)."""
    L = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - p.numel():] = p
        mask[i, L - p.numel():] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, L)
    return ids, mask, pos


def next_token(logits: Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> Tensor:
    """(B, V) logits -> (B,) token ids, greedy or by temperature / top-p sampling."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(cfg.temperature, 1e-5), dim=-1)  # (B, V)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_from_prompts(
    model: LatentVLM, prompts: list[Tensor], pixel_values: Tensor, cfg: GenerationConfig
) -> list[list[int]]:
    """Continue each prompt (1D id tensors) until `<|im_end|>` or `max_new_tokens`; returns new ids."""
    ids, mask, pos = left_pad(prompts, model.ids.pad)
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device=ids.device).manual_seed(cfg.seed)
    cache = model.backbone.new_cache()
    embeds = model.embed_inputs(ids, pixel_values)  # (B, L, D)
    out = model.backbone.forward_lm(embeds, mask, pos, cache=cache, logits=False)
    logits = model.backbone.lm_head(out.last_hidden[:, -1])  # (B, V)
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    new: list[list[int]] = [[] for _ in range(B)]
    last_pos = pos[:, -1]  # (B,)
    for _ in range(cfg.max_new_tokens):
        tok = next_token(logits, cfg, gen)  # (B,)
        tok = torch.where(done, torch.full_like(tok, model.ids.pad), tok)
        for i in (~done).nonzero().flatten().tolist():
            new[i].append(int(tok[i]))
        done |= tok == model.ids.turn_end
        if bool(done.all()):
            break
        last_pos = last_pos + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, L + t)
        step = model.backbone.embed_tokens(tok[:, None])  # (B, 1, D)
        out = model.backbone.forward_lm(step, mask, last_pos[:, None], cache=out.cache, logits=True)
        logits = out.logits[:, -1]  # (B, V)
    return new


def generate(
    model: LatentVLM, input_ids: Tensor, prompt_lengths: Tensor, pixel_values: Tensor, cfg: GenerationConfig
) -> list[str]:
    """Generate from the prompts of a training-layout batch; returns the decoded continuations."""
    prompts, prompt_pixels = split_prompts(
        input_ids, prompt_lengths, pixel_values, model.ids.image, model.tokens_per_image
    )
    new = generate_from_prompts(model, prompts, prompt_pixels, cfg)
    return [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]
