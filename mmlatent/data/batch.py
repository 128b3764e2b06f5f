"""The typed batch that the data pipeline hands to the model, and the processed sample it is made of.

A `ProcessedSample` is one chat rendered to token ids for one stage's layout; `collate` pads a list of
them into a `Batch`. Both are dataclasses so Lightning moves them to the device field by field and
readers see every field's shape in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmlatent.data.masks import block_attention_mask
from mmlatent.tokens import IGNORE_INDEX



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
    choices: list[str] = field(default_factory=list)
    """The options in letter order (empty for open questions)."""
    aux_pixel_values: Tensor = field(default_factory=lambda: torch.zeros(0, 3, 1, 1))
    """(N_tgt, 3, H, W) auxiliary images that latent blocks stand for (grounding-loss targets)."""
    aux_blocks: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """(N_tgt,) which latent block of this sample (0-based, in order) each target belongs to."""
    aux_regions: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))
    """(N_tgt, n_visual) which of the sample's image tokens (in sequence order) each target's `regions` box
    covers; all False where the sample names no region."""
    hidden_spans: Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    """(n, 3) rows [image_start, image_end, visible_until): image tokens only the queries in
    [image_start, visible_until) may see (stage 2: an aux image is visible to its own latent block only)."""
    anchors: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """(N_anc,) positions of the tokens that read a region the sample names: the token right before each
    inline aux image, the `<observation>` token where aux images are dropped, the token before a direct
    answer. Stage 1's and the direct baseline's grounding losses ask there where the region is."""
    anchor_regions: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))
    """(N_anc, n_visual) the image tokens inside each anchor's region (as `aux_regions`)."""
    anchor_steps: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """(N_anc,) -1 for an anchor read where the grounding's `attention_layers` say; k ≥ 0 for the k-th region
    on the direct answer's path (`SequenceLayout.answer_path`), read at `path_layers[k]`."""
    teacher: "ProcessedSample | None" = None
    """The same sample in the online teacher's layout (distillation stages), else None."""
    truncated: bool = False
    """The processor cut this sample at its `max_length` (`overlong="truncate"`); the pipeline counts it."""


@dataclass
class Batch:
    """A padded batch. B = batch size, L = longest sequence. Rows are aligned at their first assistant
    token (left padding before shorter prompts, right padding after shorter answers)."""

    keys: list[str]
    """Sample keys, length B."""
    input_ids: Tensor
    """(B, L) token ids, pad id outside each sample."""
    attention_mask: Tensor
    """(B, L) 1 for real tokens, 0 for padding."""
    position_ids: Tensor
    """(B, L) explicit positions 0..len-1 per sample from its first token (padding is masked anyway)."""
    labels: Tensor
    """(B, L) targets aligned with input_ids; IGNORE_INDEX where unlabelled."""
    loss_weights: Tensor
    """(B, L) per-token cross-entropy weights; 0 on padding."""
    pixel_values: Tensor
    """(N_img, 3, H, W) all images of the batch in token order (sample 0's first)."""
    prompt_lengths: Tensor
    """(B,) tokens before each sample's first assistant token."""
    starts: Tensor
    """(B,) column of each row's first token (left padding that aligns the assistant turns); the prompt of
    row b is `input_ids[b, starts[b] : starts[b] + prompt_lengths[b]]`."""
    answers: list[str]
    """Reference answers, length B."""
    choices: list[list[str]]
    """Each sample's options in letter order (empty for open questions), length B."""
    aux_pixel_values: Tensor
    """(N_tgt, 3, H, W) grounding targets of latent blocks (aux images), in block order."""
    aux_blocks: Tensor
    """(N_tgt,) index of each target's latent block among all blocks of the batch (row-major order of
    `<|latent_start|>` positions)."""
    aux_regions: Tensor = field(default_factory=lambda: torch.zeros(0, 1, dtype=torch.bool))
    """(N_tgt, M) for each target, its sample's image tokens (in sequence order, M the most in a sample)
    inside the region the data says the aux image is about; all False without one."""
    anchors: Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))
    """(N_anc, 2) (row, column) of each anchor token (see `ProcessedSample.anchors`)."""
    anchor_regions: Tensor = field(default_factory=lambda: torch.zeros(0, 1, dtype=torch.bool))
    """(N_anc, M) each anchor's region over its sample's image tokens, as `aux_regions`."""
    anchor_steps: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """(N_anc,) each anchor's path step (see `ProcessedSample.anchor_steps`)."""
    block_mask: Tensor | None = None
    """(B, 1, L, L) bool "may attend" mask when some image is hidden from later text (stage 2), else None
    (the padding mask and causality say everything)."""
    teacher: "Batch | None" = None
    """The same samples in the online teacher's layout, collated alike, else None."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples the producing worker skipped (by reason) since its previous batch; summed by the trainer."""
    filler: bool = False
    """The batch carries no real samples: it stands in for a planned step whose samples were all unusable
    (one earlier good sample, to be weighted by zero), so that every rank still runs the step. Consumers
    learn, score and cache nothing from it, but keep its `skipped` counts."""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def prompt_end(self) -> Tensor:
        """(B,) the column where each row's prompt ends (its first assistant token)."""
        return self.starts + self.prompt_lengths

    @property
    def lm_attention_mask(self) -> Tensor:
        """The mask to give the LM: the 4D block mask when there is one, else the (B, L) padding mask."""
        return self.block_mask if self.block_mask is not None else self.attention_mask


def _stack_regions(regions: list[Tensor], M: int) -> Tensor:
    """Per-sample (n_i, m_i) region masks -> (sum n_i, M), each row cut or padded (False) to M tokens."""
    out = torch.zeros(sum(r.shape[0] for r in regions), M, dtype=torch.bool)
    row = 0
    for r in regions:
        n, m = r.shape
        out[row : row + n, : min(m, M)] = r[:, :M]
        row += n
    return out


def collate(
    samples: list[ProcessedSample], pad_id: int, latent_start_id: int = -1, pad_to_multiple: int = 8, image_id: int = -1
) -> Batch:
    """Pad `samples` to a common length (rounded up to `pad_to_multiple`) and stack them.

    Rows are aligned at the first assistant token: a row with a shorter prompt gets that many pad tokens on
    the left, the rest of the padding goes on the right. The latent loop runs one forward per distinct slot
    column of the batch, so aligning the assistant turns puts the first blocks of all samples in the same
    columns (with a latent-only chain, every block): a batch of 32 costs the slot forwards of one sample.
    `latent_start_id` numbers the latent blocks across the batch for `aux_blocks`; `image_id` (the image token)
    sizes `aux_regions` to the most image tokens of a sample.
    """
    lefts = [max(s.prompt_length for s in samples) - s.prompt_length for s in samples]  # pads before each row
    lengths = [s.input_ids.numel() for s in samples]
    L = -(-max(a + n for a, n in zip(lefts, lengths)) // pad_to_multiple) * pad_to_multiple
    B = len(samples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros((B, L), dtype=torch.float32)
    attention = torch.zeros((B, L), dtype=torch.long)
    for i, (s, a, n) in enumerate(zip(samples, lefts, lengths)):
        input_ids[i, a : a + n] = s.input_ids
        labels[i, a : a + n] = s.labels
        weights[i, a : a + n] = s.loss_weights
        attention[i, a : a + n] = 1
    starts = torch.tensor(lefts, dtype=torch.long)  # (B,)
    position_ids = (torch.arange(L)[None] - starts[:, None]).clamp_min(0)  # (B, L) 0 at each row's first token
    images = [s.pixel_values for s in samples if s.pixel_values.numel()]
    pixel_values = torch.cat(images) if images else torch.zeros(0, 3, 1, 1)  # (N_img, 3, H, W)
    targets = [s.aux_pixel_values for s in samples if s.aux_pixel_values.numel()]
    aux_pixels = torch.cat(targets) if targets else torch.zeros(0, 3, 1, 1)  # (N_tgt, 3, H, W)
    blocks_before = torch.tensor([int((s.input_ids == latent_start_id).sum()) for s in samples]).cumsum(0)
    blocks_before = torch.cat([torch.zeros(1, dtype=torch.long), blocks_before[:-1]])  # (B,)
    aux_blocks = torch.cat([s.aux_blocks + blocks_before[i] for i, s in enumerate(samples)])  # (N_tgt,)
    M = max(max(int((s.input_ids == image_id).sum()) for s in samples), 1) if image_id >= 0 else 1
    aux_regions = _stack_regions([s.aux_regions for s in samples], M)  # (N_tgt, M)
    anchors = torch.cat([torch.stack([torch.full_like(s.anchors, i), s.anchors + a], -1)
                         for i, (s, a) in enumerate(zip(samples, lefts))])  # (N_anc, 2) in batch columns
    anchor_regions = _stack_regions([s.anchor_regions for s in samples], M)  # (N_anc, M)
    anchor_steps = torch.cat([s.anchor_steps for s in samples])  # (N_anc,)
    spans = [s.hidden_spans + a for s, a in zip(samples, lefts)]  # in batch columns
    block_mask = block_attention_mask(attention, spans) if any(x.numel() for x in spans) else None
    teachers = [s.teacher for s in samples]
    if any(t is None for t in teachers) and any(t is not None for t in teachers):
        raise ValueError("collate: some samples carry a teacher view and some do not")
    teacher = None if teachers[0] is None else collate(teachers, pad_id, latent_start_id, pad_to_multiple, image_id)
    return Batch(
        keys=[s.key for s in samples],
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        labels=labels,
        loss_weights=weights,
        pixel_values=pixel_values,
        prompt_lengths=torch.tensor([s.prompt_length for s in samples], dtype=torch.long),
        starts=starts,
        answers=[s.answer for s in samples],
        choices=[s.choices for s in samples],
        aux_pixel_values=aux_pixels,
        aux_blocks=aux_blocks,
        aux_regions=aux_regions,
        anchors=anchors,
        anchor_regions=anchor_regions,
        anchor_steps=anchor_steps,
        block_mask=block_mask,
        teacher=teacher,
    )

