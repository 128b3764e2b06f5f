"""Training stages: each decides the sequence layout its data gets and which losses apply.

One small class per stage: `layout()` (what the processor renders: inline auxiliary images, latent
blocks, or the answer alone), `forward(model, batch)` (the model's forward in that layout) and
`losses(model, batch, out)` (a dict of named `*_loss` tensors, already weighted). The Lightning module sums
whatever a stage returns, logs each term and computes its metrics from the same forward, so adding a stage
never touches the training loop. `STAGES` maps `stage.name` to the class.

- `stage1` (`Stage1`, warm-up SFT, the teacher): the full interleaved chain of thought with auxiliary images inline;
  cross-entropy on assistant tokens, observation tokens ×2; optionally selection grounding before each aux image.
- `stage2` (`Stage2`, latent distillation): after each aux image comes a latent block, and a 4D mask hides the image
  from everything after the block. CE (observation ×4) + alignment of the student's hidden states at
  observation tokens with the stage-1 teacher's, whose gradient reaches the weights only through the
  latent vectors (`latent_only_alignment`).
- `stage3` (`Stage3`, latent only): each aux image is replaced by a latent block. CE (observation ×4) + 2.0 ×
  alignment of the hidden states at the latent slots with stage 2's.
- `direct` (`Direct`, the baseline): the same question, answered at once; plain cross-entropy.
Stages 2 and 3 share `_Distillation` (teacher, alignment, grounding losses of `grounding.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from mmlatent.config_io import from_dict
from mmlatent.data.batch import Batch
from mmlatent.data.processor import SequenceLayout
from mmlatent.losses.alignment import cosine_alignment
from mmlatent.losses.cross_entropy import weighted_cross_entropy
from mmlatent.losses.selection import selection_loss
from mmlatent.model.backbone import LMOutput
from mmlatent.model.latent_loop import LatentForward, latent_forward, planned_forwards
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.training.fsdp import busiest_rank, regather_root
from mmlatent.training.grounding import GroundingConfig, anchor_attention, anchor_relevance, grounding_losses
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
    """Stages 2 and 3: sketch, diffusion, contrastive and selection losses on latent blocks. Stage 1 and the
    direct baseline: selection and attention losses, asked at the tokens that read a region (`Batch.anchors`)."""
    reasoning: Literal["full", "latent_only"] = "full"
    """Stage 3: `full` keeps the text of the chain of thought between latent blocks (Monet); `latent_only`
    keeps only the blocks and the conclusion, so generation emits far fewer positions than a text chain."""
    aux_dropout: float = 0.0
    """Stage 1: probability that a sample is shown without its aux images, so the teacher also learns the
    text-only chain of thought it must produce when generating (the CoT baseline)."""
    answer_template: str = "The answer is {answer}."
    """Assistant text of the direct baseline."""


class Stage:
    """A layout and a set of losses. Subclasses set `name` and `default_observation_weight`."""

    name: ClassVar[str]
    """The `stage.name` that selects this class."""
    default_observation_weight: ClassVar[float] = 1.0
    """Observation-token weight when `stage.observation_weight` is None."""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg

    @property
    def observation_weight(self) -> float:
        w = self.cfg.observation_weight
        return self.default_observation_weight if w is None else w

    def layout(self, latent_slots: int) -> SequenceLayout:
        """The layout of this stage's training data (`latent_slots`: the model's N)."""
        raise NotImplementedError

    def online_teacher_layout(self, latent_slots: int) -> SequenceLayout | None:
        """The view an online teacher reads, which the processor must also render (None: no online teacher)."""
        return None

    @property
    def trains_latent_blocks(self) -> bool:
        """Whether the forward runs the KV-cached latent loop (acceleration must keep the cache usable)."""
        return False

    def forward(self, model: LatentVLM, batch: Batch):
        """The model's forward over the batch in this stage's layout (an output with `.logits`)."""
        raise NotImplementedError

    def losses(self, model: LatentVLM, batch: Batch, out) -> dict[str, Tensor]:
        """Named, weighted `*_loss` terms from the batch and the forward's output."""
        raise NotImplementedError

    def to(self, device: torch.device) -> "Stage":
        """Move whatever the stage holds (an online teacher) to the model's device."""
        return self

    def check_sample_keys(self, model: LatentVLM, keys: dict[str, list[str]]) -> None:
        """Before step 1, with every sample key of every split the run reads: fail if the stage cannot serve
        one of them (a teacher cache that lacks it)."""


@dataclass
class AnchoredOutput(LMOutput):
    """Stage 1's forward with grounding: the LM output and, at the anchors, the selector's maps and the LM's
    attention over the prompt's image tokens."""

    relevance: Tensor | None = None
    """(N_anc, M) the selector's relevance over the prompt's image tokens at each anchor (selection loss)."""
    attention: Tensor | None = None
    """(N_anc, M) the LM's attention over the prompt's image tokens at each anchor (attention loss)."""


class Stage1(Stage):
    """Warm-up SFT (the teacher): the full interleaved chain of thought, aux images inline, observation ×2."""

    name = "stage1"
    default_observation_weight = 2.0

    def __init__(self, cfg: StageConfig):
        super().__init__(cfg)
        if cfg.grounding.path_layers and not isinstance(self, Direct):
            raise ValueError(f"stage.grounding.path_layers: {cfg.name} has no answer path to read (it is for direct)")

    def layout(self, latent_slots: int) -> SequenceLayout:
        return SequenceLayout(
            aux_images="inline", reasoning="full", observation_weight=self.observation_weight,
            aux_dropout=self.cfg.aux_dropout,
        )

    def forward(self, model: LatentVLM, batch: Batch) -> LMOutput:
        g = self.cfg.grounding
        anchored = batch.anchors.numel() > 0
        selects = anchored and g.selection_weight > 0 and model.lq_former is not None
        attends = anchored and g.attention_weight > 0
        if not (selects or attends):
            return model(batch.input_ids, batch.lm_attention_mask, batch.position_ids, batch.pixel_values)
        embeds = model.embed_inputs(batch.input_ids, batch.pixel_values)  # (B, L, D): what model(...) computes
        out = model.backbone.forward_lm(embeds, batch.lm_attention_mask, batch.position_ids, output_attentions=attends)
        return AnchoredOutput(
            **{**vars(out), "attentions": None},
            relevance=anchor_relevance(model, batch, embeds, out.last_hidden) if selects else None,
            attention=anchor_attention(model, batch, embeds, out.attentions, g.attention_layers, g.path_layers) if attends else None,
        )

    def losses(self, model: LatentVLM, batch: Batch, out: LMOutput) -> dict[str, Tensor]:
        losses = {"ce_loss": weighted_cross_entropy(out.logits, batch.labels, batch.loss_weights)}
        if isinstance(out, AnchoredOutput):
            g = self.cfg.grounding
            for name, maps, weight in (("selection_loss", out.relevance, g.selection_weight),
                                       ("attention_loss", out.attention, g.attention_weight)):
                if maps is not None:
                    n, M = maps.shape
                    valid = torch.ones(n, 1, dtype=torch.bool, device=maps.device)
                    region = batch.anchor_regions[:, :M]  # (N_anc, M): the prompt's images come first
                    losses[name] = weight * selection_loss(maps[:, None], valid, region)
        return losses



class Direct(Stage1):
    """The direct-answer baseline: the same question answered at once (`answer_template`), plain CE."""

    name = "direct"
    default_observation_weight = 1.0

    def layout(self, latent_slots: int) -> SequenceLayout:
        return SequenceLayout(
            aux_images="drop", reasoning="answer_only", observation_weight=self.observation_weight,
            answer_template=self.cfg.answer_template,
            answer_path=len(self.cfg.grounding.path_layers) if self.cfg.grounding.attention_weight > 0 else 0,
        )


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
    regather_root(model)  # under FSDP2 that backward resharded the root unit, which the rest of the step uses
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


class _Distillation(Stage):
    """What stages 2 and 3 share: latent blocks trained by CE, alignment to a teacher, grounding losses.

    A subclass says which positions it aligns (`positions`), its default alignment weight, its own layout
    and the layout its teacher reads.
    """

    default_observation_weight = 4.0
    positions: ClassVar[Positions]
    """Where the student's hidden states are aligned with the teacher's."""
    default_align_weight: ClassVar[float]
    """Alignment weight when `stage.align_weight` is None."""

    def __init__(self, cfg: StageConfig):
        super().__init__(cfg)
        if cfg.grounding.attention_weight > 0:
            raise ValueError(f"stage.grounding.attention_weight: {cfg.name} grounds its latent blocks (selection_weight); "
                             f"the attention loss is for stage1 and direct")
        self._teacher: LatentVLM | None = None
        self._cache: TeacherCache | None = None
        t = cfg.teacher
        if self.align_weight > 0 and (t.checkpoint is None) == (t.cache is None):
            raise ValueError(
                f"stage.teacher: {cfg.name} aligns to a teacher (align_weight={self.align_weight}); set exactly one "
                f"of stage.teacher.checkpoint (run online) or stage.teacher.cache (precomputed), or align_weight: 0"
            )

    @property
    def align_weight(self) -> float:
        w = self.cfg.align_weight
        return self.default_align_weight if w is None else w

    @property
    def online(self) -> bool:
        return self.align_weight > 0 and self.cfg.teacher.checkpoint is not None

    @property
    def trains_latent_blocks(self) -> bool:
        return True

    def teacher_layout(self, latent_slots: int) -> SequenceLayout:
        """The view the teacher reads (online, or when its cache is written)."""
        raise NotImplementedError

    def online_teacher_layout(self, latent_slots: int) -> SequenceLayout | None:
        return self.teacher_layout(latent_slots) if self.online else None

    def load_teacher(self) -> None:
        """Open the cache or load the frozen teacher (at fit/validate start, not when a checkpoint is read
        back for evaluation or export, which need no teacher)."""
        t = self.cfg.teacher
        if self.align_weight <= 0 or self._teacher is not None or self._cache is not None:
            return
        if t.cache is not None:
            self._cache = TeacherCache(t.cache)
            if self._cache.kind != self.positions:
                self._cache.check(self.positions, 0, 0, {})  # raises, naming the file and both kinds
        else:
            from mmlatent.training.checkpoint_reader import load_model

            self._teacher = load_model(t.checkpoint).requires_grad_(False)

    def check_sample_keys(self, model: LatentVLM, keys: dict[str, list[str]]) -> None:
        if self.align_weight > 0 and self.cfg.teacher.cache is not None:  # an online teacher serves any sample
            self.load_teacher()
            self._cache.check(self.positions, model.backbone.num_layers, model.backbone.hidden_size, keys)

    def to(self, device: torch.device) -> "_Distillation":
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

    def forward(self, model: LatentVLM, batch: Batch) -> LatentForward:
        return latent_forward(
            model, batch.input_ids, batch.lm_attention_mask, batch.position_ids, batch.pixel_values,
            output_hidden_states=self.align_weight > 0 and self.positions == "latent", prompt_end=batch.prompt_end,
            min_forwards=busiest_rank(planned_forwards(model, batch.input_ids), model),  # FSDP2: as many on every rank
        )

    def alignment(self, model: LatentVLM, batch: Batch, fwd: LatentForward, positions: Tensor, teacher: list[Tensor]) -> Tensor:
        """The unweighted alignment of the student's states at `positions` with the teacher's."""
        raise NotImplementedError

    def losses(self, model: LatentVLM, batch: Batch, out: LatentForward) -> dict[str, Tensor]:
        losses = {"ce_loss": weighted_cross_entropy(out.logits, batch.labels, batch.loss_weights)}
        if self.align_weight > 0:
            teacher = self._teacher_states(batch)
            positions = target_positions(model, batch.input_ids, self.positions)  # (B, L)
            losses["align_loss"] = self.align_weight * self.alignment(model, batch, out, positions, teacher)
        losses.update(grounding_losses(model, batch, out.latent_mask, out.latent_vectors, self.cfg.grounding, out.relevance))
        return losses


class Stage2(_Distillation):
    """Latent distillation: a latent block after each aux image, which a 4D mask hides from everything after
    the block; CE (observation ×4) + alignment at observation tokens with the stage-1 teacher, through the
    latent vectors only."""

    name = "stage2"
    positions = "observation"
    default_align_weight = 1.0

    def layout(self, latent_slots: int) -> SequenceLayout:
        return SequenceLayout(aux_images="image_then_latent", observation_weight=self.observation_weight, latent_slots=latent_slots)

    def teacher_layout(self, latent_slots: int) -> SequenceLayout:
        return SequenceLayout(aux_images="inline")  # stage 1 reads the aux images inline

    def alignment(self, model, batch, fwd, positions, teacher) -> Tensor:
        return latent_only_alignment(model, batch, fwd, positions, teacher)


class Stage3(_Distillation):
    """Latent only: each aux image replaced by a latent block; CE (observation ×4) + 2.0 × alignment of the
    hidden states at the latent slots with stage 2's."""

    name = "stage3"
    positions = "latent"
    default_align_weight = 2.0

    def layout(self, latent_slots: int) -> SequenceLayout:
        return SequenceLayout(
            aux_images="latent", reasoning=self.cfg.reasoning, observation_weight=self.observation_weight,
            latent_slots=latent_slots,
        )

    def teacher_layout(self, latent_slots: int) -> SequenceLayout:
        return SequenceLayout(aux_images="image_then_latent", latent_slots=latent_slots)  # stage 2's layout

    def alignment(self, model, batch, fwd, positions, teacher) -> Tensor:
        return cosine_alignment(*_paired(gather_states(fwd.hidden_states, positions), teacher, batch.keys))


STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (Stage1, Direct, Stage2, Stage3)}
"""Stage classes by `stage.name`."""


def build_stage(cfg: StageConfig) -> Stage:
    if cfg.name not in STAGES:
        raise ValueError(f"stage.name={cfg.name!r}: expected one of {sorted(STAGES)}")
    return STAGES[cfg.name](cfg)


def _stage_config(cfg) -> StageConfig:
    """A `StageConfig` from itself or from the parser's view of one (a namespace or a dict)."""
    if isinstance(cfg, StageConfig):
        return cfg
    return from_dict(StageConfig, cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg), "model.stage")


def data_layout(stage: StageConfig, latent_slots: int) -> SequenceLayout:
    """The layout the data module renders for this stage (the CLI links it from `model.stage`)."""
    return build_stage(_stage_config(stage)).layout(latent_slots)


def data_teacher_layout(stage: StageConfig, latent_slots: int) -> SequenceLayout | None:
    """The online teacher's view the data module also renders, None without one (linked like `data_layout`)."""
    return build_stage(_stage_config(stage)).online_teacher_layout(latent_slots)
