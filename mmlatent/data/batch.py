"""The typed batch that the data pipeline hands to the model, and the processed sample it is made of.

A `ProcessedSample` is one chat rendered to token ids for one stage's layout; `collate` pads a list of
them into a `Batch`. Both are dataclasses so Lightning moves them to the device field by field and
readers see every field's shape in one place.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Label value that cross-entropy ignores (prompt, images, padding)."""


@dataclass
class ProcessedSample:
    """One sample as token ids, ready to collate."""

    key: str
    """The WebDataset key (also the teacher-cache key of later stages)."""
    input_ids: Tensor
    """(L,) token ids; each image is `tokens_per_image` image-token ids."""
    labels: Tensor
    """(L,) next-token targets aligned with `input_ids` (not shifted); IGNORE_INDEX where unlabelled."""
    loss_weights: Tensor
    """(L,) per-token weight of the cross-entropy (observation spans weigh more)."""
    pixel_values: Tensor
    """(N_img, 3, H, W) images in the order of their image tokens."""
    prompt_length: int
    """Number of tokens before the first assistant token: the generation prompt is `input_ids[:prompt_length]`."""
    answer: str
    """The reference answer (a letter for multiple choice)."""


@dataclass
class Batch:
    """A padded batch (right padding). B = batch size, L = longest sequence."""

    keys: list[str]
    """Sample keys, length B."""
    input_ids: Tensor
    """(B, L) token ids, pad id beyond each sample's length."""
    attention_mask: Tensor
    """(B, L) 1 for real tokens, 0 for padding."""
    position_ids: Tensor
    """(B, L) explicit positions 0..len-1 per sample (padding keeps counting; it is masked anyway)."""
    labels: Tensor
    """(B, L) targets aligned with input_ids; IGNORE_INDEX where unlabelled."""
    loss_weights: Tensor
    """(B, L) per-token cross-entropy weights; 0 on padding."""
    pixel_values: Tensor
    """(N_img, 3, H, W) all images of the batch in token order (sample 0's first)."""
    prompt_lengths: Tensor
    """(B,) tokens before each sample's first assistant token."""
    answers: list[str]
    """Reference answers, length B."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples the producing worker skipped (by reason) since its previous batch; summed by the trainer."""

    def __len__(self) -> int:
        return len(self.keys)


def collate(samples: list[ProcessedSample], pad_id: int, pad_to_multiple: int = 8) -> Batch:
    """Pad `samples` to a common length (rounded up to `pad_to_multiple`) and stack them."""
    lengths = [s.input_ids.numel() for s in samples]
    L = -(-max(lengths) // pad_to_multiple) * pad_to_multiple
    B = len(samples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros((B, L), dtype=torch.float32)
    attention = torch.zeros((B, L), dtype=torch.long)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        input_ids[i, :n] = s.input_ids
        labels[i, :n] = s.labels
        weights[i, :n] = s.loss_weights
        attention[i, :n] = 1
    position_ids = torch.arange(L).unsqueeze(0).expand(B, L).clone()  # (B, L)
    images = [s.pixel_values for s in samples if s.pixel_values.numel()]
    pixel_values = torch.cat(images) if images else torch.zeros(0, 3, 1, 1)  # (N_img, 3, H, W)
    return Batch(
        keys=[s.key for s in samples],
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        labels=labels,
        loss_weights=weights,
        pixel_values=pixel_values,
        prompt_lengths=torch.tensor([s.prompt_length for s in samples], dtype=torch.long),
        answers=[s.answer for s in samples],
    )


def merge_counts(total: Counter, batch: Batch) -> None:
    """Add a batch's skip counts into a running total."""
    total.update(batch.skipped)
