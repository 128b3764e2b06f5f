"""Training stages: each decides the sequence layout its data gets and which losses apply.

A stage is a small object with `layout()` (what the processor renders: inline auxiliary images, latent
blocks, or the answer alone) and `losses(model, batch)` (a dict of named `*_loss` tensors, already
weighted). The Lightning module sums whatever a stage returns and logs each term, so adding a stage never
touches the training loop.

- `stage1` (warm-up SFT, the teacher): the full interleaved chain of thought with auxiliary images inline;
  cross-entropy on assistant tokens, observation tokens ×2.
- `stage2` (latent distillation): after each aux image comes a latent block, and a 4D mask hides the image
  from everything after the block. CE (observation ×4) + alignment of the student's hidden states at
  observation tokens with the stage-1 teacher's, whose gradient reaches the weights only through the
  latent vectors (`latent_only_alignment`).
- `stage3` (latent only): each aux image is replaced by a latent block. CE (observation ×4) + 2.0 ×
  alignment of the hidden states at the latent slots with stage 2's.
- `direct` (the baseline): the same question, answered at once; plain cross-entropy.
Stages 2 and 3 can add the grounding losses of `grounding.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mmlatent.data.batch import Batch
from mmlatent.data.processor import SequenceLayout
from mmlatent.losses.alignment import cosine_alignment
from mmlatent.losses.cross_entropy import weighted_cross_entropy
from mmlatent.model.latent_loop import LatentForward, latent_forward
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.training.grounding import GroundingConfig, grounding_losses
from mmlatent.training.teacher import Positions, TeacherCache, TeacherConfig, gather_states, target_positions, teacher_states

StageName = Literal["stage1", "stage2", "stage3", "direct"]


@dataclass
class StageConfig:
    """Which stage to train, its layout options and its loss weights."""

    name: StageName = "stage1"
    """`stage1`: SFT on the full interleaved chain of thought (the teacher). `stage2`: latent distillation
    with the aux images visible only to their blocks. `stage3`: latent blocks instead of aux images.
    `direct`: answer-only baseline trained on the same questions."""
    observation_weight: float | None = None
    """Cross-entropy weight of tokens inside `<observation>…</observation>`; None: ×2 in stage 1, ×4 in
    stages 2 and 3 (DESIGN §1)."""
    align_weight: float | None = None
    """Weight of the hidden-state alignment loss; None: 1.0 in stage 2, 2.0 in stage 3. 0 turns it off
    (no teacher needed)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Stages 2 and 3: the teacher's hidden states, from a checkpoint run online or a precomputed cache."""
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    """Stages 2 and 3: sketch, diffusion and contrastive losses on latent blocks."""
    reasoning: Literal["full", "latent_only"] = "full"
    """Stage 3: `full` keeps the text of the chain of thought between latent blocks (Monet); `latent_only`
    keeps only the blocks and the conclusion, so generation emits far fewer positions than a text chain."""
    aux_dropout: float = 0.0
    """Stage 1: probability that a sample is shown without its aux images, so the teacher also learns the
    text-only chain of thought it must produce when generating (the CoT baseline)."""
    answer_template: str = "The answer is {answer}."
    """Assistant text of the direct baseline."""


class Stage:
    """Base class: a layout and a set of losses."""

    default_observation_weight = 1.0

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg

    @property
    def observation_weight(self) -> float:
        w = self.cfg.observation_weight
        return self.default_observation_weight if w is None else w

    def layout(self, latent_slots: int) -> SequenceLayout:
        """The layout of this stage's training data (`latent_slots`: the model's N)."""
        raise NotImplementedError

    def teacher_layout(self, latent_slots: int) -> SequenceLayout | None:
        """The layout the online teacher reads (None: no teacher)."""
        return None

    def losses(self, model: LatentVLM, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def to(self, device: torch.device) -> "Stage":
        """Move whatever the stage holds (an online teacher) to the model's device."""
        return self


class SFTStage(Stage):
    """Stage 1 and the direct baseline: teacher-forced cross-entropy over the rendered chat."""

    @property
    def default_observation_weight(self) -> float:
        return 1.0 if self.cfg.name == "direct" else 2.0

    def layout(self, latent_slots: int) -> SequenceLayout:
        if self.cfg.name == "direct":
            return SequenceLayout(
                aux_images="drop", reasoning="answer_only", observation_weight=1.0,
                answer_template=self.cfg.answer_template,
            )
        return SequenceLayout(
            aux_images="inline", reasoning="full", observation_weight=self.observation_weight,
            aux_dropout=self.cfg.aux_dropout,
        )

    def losses(self, model: LatentVLM, batch: Batch) -> dict[str, Tensor]:
        out = model(batch.input_ids, batch.lm_attention_mask, batch.position_ids, batch.pixel_values)
        return {"ce_loss": weighted_cross_entropy(out.logits, batch.labels, batch.loss_weights)}


def latent_only_alignment(model: LatentVLM, batch: Batch, fwd: LatentForward, positions: Tensor, teacher: list[Tensor]) -> Tensor:
    """Alignment whose gradient reaches the weights only through the latent vectors (Monet stage 2).

    A second LM forward takes every input detached except the slot vectors, which enter as fresh leaves v';
    g = ∂L_align/∂v' is then the alignment's pull on each vector with everything else held fixed, and the
    returned term is Σ v·stopgrad(g) (plus a constant so its value is L_align): its gradient is g·∂v/∂θ.
    The direct paths from θ to the observation states carry none. Costs one extra forward and a backward
    to the inputs.
    """
    v = fwd.latent_vectors.detach().requires_grad_(torch.is_grad_enabled())  # (n_slots, D)
    embeds = fwd.inputs_embeds.detach().masked_scatter(fwd.latent_mask[..., None], v)  # (B, L, D)
    out = model.backbone.forward_lm(
        embeds, batch.lm_attention_mask, batch.position_ids, output_hidden_states=True, logits=False
    )
    student, target = _paired(gather_states(out.hidden_states, positions), teacher, batch.keys)
    align = cosine_alignment(student, target)
    if not torch.is_grad_enabled():  # validation: the value is all there is
        return align
    (g,) = torch.autograd.grad(align, v, allow_unused=True)
    g = torch.zeros_like(v) if g is None else g
    surrogate = (fwd.latent_vectors * g.detach()).sum()
    return surrogate - surrogate.detach() + align.detach()


def _paired(student: list[Tensor], teacher: list[Tensor], keys: list[str]) -> tuple[Tensor, Tensor]:
    """Concatenate per-sample (layers, n_b, D) states over samples; both sides must match sample by sample."""
    for s, t, k in zip(student, teacher, keys):
        if s.shape != t.shape:
            raise ValueError(
                f"sample {k}: student states {tuple(s.shape)} vs teacher states {tuple(t.shape)} at the aligned "
                f"positions (a truncated sample, or a teacher/cache built for another layout or model)"
            )
    return torch.cat(student, 1), torch.cat([t.to(s.device, s.dtype) for s, t in zip(student, teacher)], 1)


class LatentStage(Stage):
    """Stages 2 and 3: latent blocks trained by cross-entropy, teacher alignment and grounding losses."""

    default_observation_weight = 4.0

    def __init__(self, cfg: StageConfig):
        super().__init__(cfg)
        self.positions: Positions = "observation" if cfg.name == "stage2" else "latent"
        self._teacher: LatentVLM | None = None
        self._cache: TeacherCache | None = None
        t = cfg.teacher
        if self.align_weight > 0 and (t.checkpoint is None) == (t.cache is None):
            raise ValueError(
                f"stage.teacher: {cfg.name} aligns to a teacher (align_weight={self.align_weight}); set exactly one "
                f"of stage.teacher.checkpoint (run online) or stage.teacher.cache (precomputed), or align_weight: 0"
            )

    @property
    def online(self) -> bool:
        return self.align_weight > 0 and self.cfg.teacher.checkpoint is not None

    def load_teacher(self) -> None:
        """Open the cache or load the frozen teacher (at fit/validate start, not when a checkpoint is read
        back for evaluation or export, which need no teacher)."""
        t = self.cfg.teacher
        if self.align_weight <= 0 or self._teacher is not None or self._cache is not None:
            return
        if t.cache is not None:
            self._cache = TeacherCache(t.cache)
            if self._cache.kind != self.positions:
                raise ValueError(f"stage.teacher.cache {t.cache} holds {self._cache.kind} states; {self.cfg.name} needs {self.positions}")
        else:
            from mmlatent.training.checkpoint_io import load_model

            self._teacher = load_model(t.checkpoint).requires_grad_(False)

    @property
    def teacher_positions(self) -> Positions:
        return self.positions

    @property
    def align_weight(self) -> float:
        w = self.cfg.align_weight
        return (1.0 if self.cfg.name == "stage2" else 2.0) if w is None else w

    def layout(self, latent_slots: int) -> SequenceLayout:
        if self.cfg.name == "stage2":
            return SequenceLayout(aux_images="image_then_latent", observation_weight=self.observation_weight, latent_slots=latent_slots)
        return SequenceLayout(
            aux_images="latent", reasoning=self.cfg.reasoning, observation_weight=self.observation_weight, latent_slots=latent_slots
        )

    def teacher_layout(self, latent_slots: int) -> SequenceLayout:
        """Stage 2's teacher (stage 1) reads the aux images inline; stage 3's teacher (stage 2) reads stage 2's layout."""
        if self.cfg.name == "stage2":
            return SequenceLayout(aux_images="inline")
        return SequenceLayout(aux_images="image_then_latent", latent_slots=latent_slots)

    def online_teacher_layout(self, latent_slots: int) -> SequenceLayout | None:
        """The teacher view the processor must render: only for an online teacher."""
        return self.teacher_layout(latent_slots) if self.online else None

    def to(self, device: torch.device) -> "LatentStage":
        self.load_teacher()
        if self._teacher is not None:
            self._teacher.to(device)
        return self

    def _teacher_states(self, batch: Batch) -> list[Tensor]:
        self.load_teacher()
        if self._cache is not None:
            return self._cache.states(batch.keys)
        if batch.teacher is None:
            raise ValueError("the online teacher needs the batch's teacher view (build the processor with the stage's teacher layout)")
        return teacher_states(self._teacher, batch.teacher, self.positions)

    def losses(self, model: LatentVLM, batch: Batch) -> dict[str, Tensor]:
        align_here = self.align_weight > 0
        fwd = latent_forward(
            model, batch.input_ids, batch.lm_attention_mask, batch.position_ids, batch.pixel_values,
            output_hidden_states=align_here and self.positions == "latent",
        )
        losses = {"ce_loss": weighted_cross_entropy(fwd.logits, batch.labels, batch.loss_weights)}
        if align_here:
            teacher = self._teacher_states(batch)
            positions = target_positions(model, batch.input_ids, self.positions)  # (B, L)
            if self.positions == "observation":
                align = latent_only_alignment(model, batch, fwd, positions, teacher)
            else:
                align = cosine_alignment(*_paired(gather_states(fwd.hidden_states, positions), teacher, batch.keys))
            losses["align_loss"] = self.align_weight * align
        losses.update(grounding_losses(model, batch, fwd.latent_mask, fwd.latent_vectors, self.cfg.grounding))
        return losses


STAGES: dict[str, type[Stage]] = {"stage1": SFTStage, "direct": SFTStage, "stage2": LatentStage, "stage3": LatentStage}


def build_stage(cfg: StageConfig) -> Stage:
    if cfg.name not in STAGES:
        raise ValueError(f"stage.name={cfg.name!r}: expected one of {sorted(STAGES)}")
    return STAGES[cfg.name](cfg)
