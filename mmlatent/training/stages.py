"""Training stages: each decides the sequence layout its data gets and which losses apply.

A stage is a small object with two methods: `layout()` (what the processor should render: inline
auxiliary images, latent blocks, or the answer alone) and `losses(model, batch)` (a dict of named
`*_loss` tensors, already weighted). The Lightning module sums whatever a stage returns and logs each
term, so adding a stage never touches the training loop.

- `stage1` (warm-up SFT, the teacher): the full interleaved chain of thought with auxiliary images
  inline; cross-entropy on assistant tokens, observation tokens ×2.
- `direct` (the baseline): the same question, the assistant answers at once; plain cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from mmlatent.data.batch import Batch
from mmlatent.data.processor import SequenceLayout
from mmlatent.losses.cross_entropy import weighted_cross_entropy
from mmlatent.model.latent_vlm import LatentVLM


@dataclass
class StageConfig:
    """Which stage to train and its loss weights."""

    name: Literal["stage1", "direct"] = "stage1"
    """`stage1`: SFT on the full interleaved chain of thought (the teacher). `direct`: answer-only
    baseline trained on the same questions."""
    observation_weight: float = 2.0
    """Cross-entropy weight of tokens inside `<observation>…</observation>` (DESIGN: ×2 in stage 1)."""
    answer_template: str = "The answer is {answer}."
    """Assistant text of the direct baseline."""


class Stage:
    """Base class: a layout and a set of losses."""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg

    def layout(self) -> SequenceLayout:
        raise NotImplementedError

    def losses(self, model: LatentVLM, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError


class SFTStage(Stage):
    """Stage 1 and the direct baseline: teacher-forced cross-entropy over the rendered chat."""

    def layout(self) -> SequenceLayout:
        if self.cfg.name == "direct":
            return SequenceLayout(
                aux_images="drop", reasoning="answer_only", observation_weight=1.0,
                answer_template=self.cfg.answer_template,
            )
        return SequenceLayout(aux_images="inline", reasoning="full", observation_weight=self.cfg.observation_weight)

    def losses(self, model: LatentVLM, batch: Batch) -> dict[str, Tensor]:
        out = model(batch.input_ids, batch.attention_mask, batch.position_ids, batch.pixel_values)
        return {"ce_loss": weighted_cross_entropy(out.logits, batch.labels, batch.loss_weights)}


STAGES: dict[str, type[Stage]] = {"stage1": SFTStage, "direct": SFTStage}


def build_stage(cfg: StageConfig) -> Stage:
    return STAGES[cfg.name](cfg)
