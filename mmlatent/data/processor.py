"""Render one decoded sample into token ids for one stage's layout.

The processor is where a stage's view of the data is decided: question images always expand to
`tokens_per_image` image tokens; auxiliary images (the pictures inside the reasoning) are kept inline
(stage 1), or dropped with the reasoning (the direct-answer baseline); later stages turn them into latent
blocks. The chat is rendered with mmlatent's one chat template (`mmlatent.chat_template`, ChatML: the format of
Qwen and of the tiny tokenizer), which evaluation and generation render prompts with too, a model's
`system_prompt` first where a sample has no system turn; only assistant tokens are labelled, and tokens
inside `<observation>…</observation>` get a heavier loss weight.

It runs in the data-loader workers, so it is plain CPU code: the tokenizer is a fast tokenizer and image
preprocessing is the vision library's own transform handed in by the model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from mmlatent.chat_template import TURN_END, TURN_SEPARATOR, render_turn, turn_open, with_system
from mmlatent.data.batch import Batch, ProcessedSample, collate
from mmlatent.data.masks import observation_mask
from mmlatent.data.sample import SampleError
from mmlatent.tokens import IGNORE_INDEX, token_ids


@dataclass
class SequenceLayout:
    """How a stage lays a sample out as a token sequence. Stages build this; the processor obeys it."""

    aux_images: Literal["inline", "image_then_latent", "latent", "drop"] = "inline"
    """`inline`: auxiliary images appear as real images in the reasoning (stage 1 teacher).
    `image_then_latent`: each aux image is followed by a latent block (stage 2).
    `latent`: each aux image is replaced by a latent block (stage 3); the image becomes the block's
    grounding target. `drop`: aux images are removed."""
    reasoning: Literal["full", "answer_only", "latent_only"] = "full"
    """`full`: the assistant turn is the whole chain of thought. `answer_only`: it is replaced by
    `answer_template` (the direct-answer baseline). `latent_only`: the reasoning's text items are dropped and
    only its latent blocks and final text item (the conclusion) remain: a chain that is latent end to end,
    generating a fraction of the positions of a text chain (use with `aux_images="latent"`)."""
    aux_dropout: float = 0.0
    """`inline` only: probability that a sample is rendered without its auxiliary images (drawn per sample
    key and epoch), so the model also learns to reason in text alone, as it must when it generates."""
    observation_weight: float = 2.0
    """Cross-entropy weight of tokens inside `<observation>…</observation>` (stage 1: ×2, later ×4)."""
    answer_template: str = "The answer is {answer}."
    """Assistant text when `reasoning="answer_only"`."""
    answer_path: int = 0
    """`answer_only`: how many of the reasoning's regions before the answer's (the regions of its aux images,
    in order: a walk's start cell, then each cell passed) the token before the answer also anchors, the k-th
    tagged k (`ProcessedSample.anchor_steps`) so the direct baseline's grounding reads it at its own layer;
    0: the answer's region only."""
    latent_slots: int = 4
    """Slots N of each latent block that stands for an auxiliary image."""
    coconut_steps: int = 0
    """Coconut curriculum: replace the first k reasoning steps (a step = a text item of the assistant turn
    with the aux images just before it) by one latent block of k × `coconut_slots_per_step` slots."""
    coconut_slots_per_step: int = 1
    """Slots c per replaced step."""
    coconut_growth: int = 0
    """Steps added to `coconut_steps` per epoch (k grows with the epoch). The final step is never replaced."""

    def deterministic(self) -> "SequenceLayout":
        """This layout without training-time augmentation (`aux_dropout`, the Coconut curriculum's growth): what
        validation and test render, the same in every epoch."""
        return replace(self, aux_dropout=0.0, coconut_growth=0)


@dataclass
class ProcessorConfig:
    """Sequence limits of the processor."""

    max_length: int = 1024
    """Longest token sequence; longer samples follow `overlong`."""
    overlong: Literal["drop", "truncate"] = "drop"
    """`drop`: skip and count the sample (reason `too_long`). `truncate`: cut the sequence at `max_length`
    (only if no image is cut in half; otherwise dropped)."""


class Processor:
    """Callable turning `{"key", "meta", "images"}` into a `ProcessedSample`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokens_per_image: int,
        layout: SequenceLayout,
        cfg: ProcessorConfig = ProcessorConfig(),
        teacher_layout: SequenceLayout | None = None,
        token_grid: tuple[int, int] | None = None,
        system_prompt: str | None = None,
    ):
        """`teacher_layout`: also render each sample in this layout (`ProcessedSample.teacher`), for a
        distillation stage whose teacher runs online on its own view of the same sample. `token_grid`: the
        (rows, cols) of an image's tokens (default: square), to map `regions` boxes onto tokens.
        `system_prompt`: the system turn of a sample that has none (the model's; None: no system turn)."""
        self.tok = tokenizer
        self.transform = image_transform
        self.tokens_per_image = tokens_per_image
        self.layout = layout
        self.teacher_layout = teacher_layout
        self.cfg = cfg
        self.system_prompt = system_prompt
        side = int(round(tokens_per_image ** 0.5))
        self.token_grid = token_grid or (side, tokens_per_image // max(side, 1))
        self.ids = token_ids(tokenizer)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def for_model(
        cls, model, layout: SequenceLayout, cfg: ProcessorConfig = ProcessorConfig(), teacher_layout: SequenceLayout | None = None
    ) -> "Processor":
        """The processor matching a `LatentVLM`'s tokenizer, image transform, image-token count and system prompt."""
        backbone = model.backbone
        return cls(model.tokenizer, backbone.image_transform(train=False), backbone.tokens_per_image, layout, cfg,
                   teacher_layout, token_grid=backbone.token_grid, system_prompt=model.cfg.system_prompt)

    def collate(self, samples: list[ProcessedSample]) -> Batch:
        """Pad this processor's samples into a `Batch` (`batch.collate` with the tokenizer's special ids)."""
        return collate(samples, pad_id=self.ids.pad, latent_start_id=self.ids.latent_start, image_id=self.ids.image)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` with no BOS/EOS added."""
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _fixed(self, text: str) -> list[int]:
        """Encode a template string once (turn headers and footers recur in every sample)."""
        if text not in self._cache:
            self._cache[text] = self.encode_text(text)
        return self._cache[text]

    def set_epoch(self, epoch: int) -> None:
        """The stream calls this at each epoch's start (the Coconut curriculum grows with it)."""
        self.epoch = epoch

    def coconut_k(self, n_steps: int, lay: SequenceLayout | None = None) -> int:
        """Reasoning steps the Coconut curriculum replaces this epoch (of `n_steps`; the last is kept)."""
        lay = lay or self.layout
        k = lay.coconut_steps + lay.coconut_growth * getattr(self, "epoch", 0)
        return max(0, min(k, n_steps - 1))

    def _block(self, n: int) -> list[int]:
        return [self.ids.latent_start, *[self.ids.latent] * n, self.ids.latent_end]

    def _drops_aux(self, lay: SequenceLayout, key: str) -> bool:
        """Whether this sample is rendered without its aux images this epoch (`aux_dropout`)."""
        if lay.aux_images != "inline" or lay.aux_dropout <= 0:
            return False
        digest = hashlib.sha256(f"{key}/{getattr(self, 'epoch', 0)}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64 < lay.aux_dropout

    def _assistant(self, lay: SequenceLayout, meta: dict, content: list[dict], key: str, emit, emit_image, add_target, hide,
                   add_anchor) -> None:
        """Emit an assistant turn's content in the layout's form."""
        if lay.reasoning == "answer_only":
            self._answer(lay, meta, content, emit, add_anchor)
            return
        k = self.coconut_k(sum(1 for it in content if it["type"] == "text"), lay) if lay.coconut_steps or lay.coconut_growth else 0
        texts_seen = 0
        if k:
            emit(self._block(k * lay.coconut_slots_per_step), True)
        last_text = max((i for i, it in enumerate(content) if it["type"] == "text"), default=-1)
        drop_aux = self._drops_aux(lay, key)
        dropped: list[str] = []  # aux images left out since the last text: their region is read in the next one
        for i, item in enumerate(content):
            if texts_seen < k:  # inside the replaced steps: text and aux images are dropped
                texts_seen += item["type"] == "text"
                continue
            if item["type"] == "text":
                if lay.reasoning != "latent_only" or i == last_text:
                    self._text(item["text"], dropped, emit, add_anchor)
                dropped = []
            elif item["type"] == "image":
                emit_image(item["ref"])
            elif lay.aux_images == "inline":
                if drop_aux:
                    dropped.append(item["ref"])
                else:
                    add_anchor(item["ref"])
                    emit_image(item["ref"])
            elif lay.aux_images == "image_then_latent":
                start = emit_image(item["ref"])
                add_target(item["ref"])
                block = self._block(lay.latent_slots)
                hide(start, len(block) - 1)  # the image is visible to the block's start and slots only
                emit(block, True)
            elif lay.aux_images == "latent":
                add_target(item["ref"])
                emit(self._block(lay.latent_slots), True)

    def _text(self, text: str, dropped: list[str], emit, add_anchor) -> None:
        """A reasoning text item. Where aux images were dropped before it, each of its observation spans in
        turn reads one of their regions off the question image: its `<observation>` token is that region's
        anchor (text-only reasoning, whose grounding is where that token looks)."""
        tokens = self.encode_text(text)
        done = 0
        for ref in dropped:
            opened = [j for j in range(done, len(tokens)) if tokens[j] == self.ids.observation_open]
            if not opened:
                break
            emit(tokens[done : opened[0] + 1], True)
            add_anchor(ref)
            done = opened[0] + 1
        emit(tokens[done:], True)

    def _answer(self, lay: SequenceLayout, meta: dict, content: list[dict], emit, add_anchor) -> None:
        """The answer-only turn; the token before the answer anchors the sample's `answer` region (the part of
        the image the answer is read from), when the template's head tokenises on its own, and with
        `answer_path` the first regions the reasoning reads on its way there (each tagged with its step)."""
        tokens = self.encode_text(lay.answer_template.format(answer=meta["answer"]))
        head = self.encode_text(lay.answer_template.split("{answer}")[0].rstrip())
        if head and tokens[: len(head)] == head:
            emit(head, True)
            add_anchor("answer")
            path = [it["ref"] for it in content if it["type"] == "aux_image"][:-1]  # the last is the answer's
            for step, ref in enumerate(path[: lay.answer_path]):
                add_anchor(ref, step)
            tokens = tokens[len(head) :]
        emit(tokens, True)

    def render(self, meta: dict, images: dict[str, Image.Image], key: str = "?") -> ProcessedSample:
        """The sample in this processor's layout, with the teacher's view attached when there is one."""
        sample = self._render(self.layout, meta, images, key)
        if self.teacher_layout is not None:
            sample.teacher = self._render(self.teacher_layout, meta, images, key)
        return sample

    def _render(self, lay: SequenceLayout, meta: dict, images: dict[str, Image.Image], key: str) -> ProcessedSample:
        ids: list[int] = []
        labelled: list[bool] = []
        pixels: list[torch.Tensor] = []
        targets: list[tuple[int, torch.Tensor, str]] = []  # (block index within the sample, aux image, its ref)
        image_slots: dict[str, int] = {}  # ref -> index of its first token among the sample's image tokens
        spans: list[tuple[int, int, int]] = []  # (image start, image end, visible until): stage-2 mask
        anchors: list[tuple[int, str, int]] = []  # (position of a token that reads a region, its ref, its path step or -1)
        prompt_length = None

        def emit(tokens: list[int], label: bool) -> None:
            ids.extend(tokens)
            labelled.extend([label] * len(tokens))

        def image_tokens(ref: str) -> list[int]:  # the image's pixels are the next ones; returns its tokens
            image_slots[ref] = len(pixels) * self.tokens_per_image
            pixels.append(self.transform(images[ref]))
            return [self.ids.image] * self.tokens_per_image

        def emit_image(ref: str) -> int:
            emit(image_tokens(ref), False)
            return len(ids) - self.tokens_per_image

        def add_target(ref: str) -> None:  # the block about to be emitted stands for this image
            targets.append((ids.count(self.ids.latent_start), self.transform(images[ref]), ref))

        def add_anchor(ref: str, step: int = -1) -> None:  # the region `ref` is read from the token emitted last
            if ref in (meta.get("regions") or {}):
                anchors.append((len(ids) - 1, ref, step))

        def hide(image_start: int, visible_tokens_after: int) -> None:  # called before the block is emitted
            end = image_start + self.tokens_per_image
            spans.append((image_start, end, len(ids) + visible_tokens_after))

        for msg in with_system(meta["messages"], self.system_prompt):
            role = msg["role"]
            if role != "assistant":  # the prompt's turns, exactly as generation renders them
                turn = render_turn(role, msg["content"], self.encode_text, lambda item: image_tokens(item["ref"]), self._fixed)
                emit(turn, False)
                continue
            emit(self._fixed(turn_open(role)), False)
            if prompt_length is None:
                prompt_length = len(ids)
            self._assistant(lay, meta, msg["content"], key, emit, emit_image, add_target, hide, add_anchor)
            emit(self._fixed(TURN_END), True)
            emit(self._fixed(TURN_SEPARATOR), False)
        if prompt_length is None:
            raise SampleError("no_assistant_turn", "the sample has no assistant turn to learn", key)
        regions = self._regions(meta.get("regions") or {}, [ref for _, _, ref in targets], image_slots, len(pixels))
        sample = self._finish(lay, key, meta, ids, labelled, pixels, targets, spans, prompt_length, regions)
        anchor_regions = self._regions(meta.get("regions") or {}, [ref for _, ref, _ in anchors], image_slots, len(pixels))
        kept = [i for i, (pos, _, _) in enumerate(anchors) if pos + 1 < len(sample.input_ids)]  # truncation keeps its image
        sample.anchors = torch.tensor([anchors[i][0] for i in kept], dtype=torch.long)
        sample.anchor_steps = torch.tensor([anchors[i][2] for i in kept], dtype=torch.long)
        sample.anchor_regions = anchor_regions[kept][:, : sample.pixel_values.shape[0] * self.tokens_per_image]
        return sample

    def _regions(self, regions: dict, refs: list[str], image_slots: dict[str, int], n_images: int) -> torch.Tensor:
        """(N_tgt, n_images · T) bool: for each latent target, the image tokens inside its `regions` box (none
        when the sample gives no region for it, or its image is not in this layout)."""
        T, (gh, gw) = self.tokens_per_image, self.token_grid
        out = torch.zeros(len(refs), n_images * T, dtype=torch.bool)
        rows = (torch.arange(gh, dtype=torch.float32) + 0.5) / gh  # token centres, image units
        cols = (torch.arange(gw, dtype=torch.float32) + 0.5) / gw
        for t, ref in enumerate(refs):
            region = regions.get(ref)
            if region is None or region["image"] not in image_slots:
                continue
            x0, y0, x1, y1 = region["box"]
            inside = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None]  # (gh, gw)
            start = image_slots[region["image"]]
            out[t, start : start + T] = inside.flatten()
        return out

    def _finish(self, lay, key, meta, ids, labelled, pixels, targets, spans, prompt_length, regions) -> ProcessedSample:
        truncated = len(ids) > self.cfg.max_length
        if truncated:
            cut = self.cfg.max_length
            inside = {self.ids.image, self.ids.latent, self.ids.latent_start}
            if self.cfg.overlong == "drop" or ids[cut - 1] in inside:  # never cut an image or a block in half
                raise SampleError("too_long", f"{len(ids)} tokens > max_length={cut}", key)
            kept_images = sum(1 for t in ids[:cut] if t == self.ids.image) // self.tokens_per_image
            kept_blocks = sum(1 for t in ids[:cut] if t == self.ids.latent_start)
            ids, labelled, pixels = ids[:cut], labelled[:cut], pixels[:kept_images]
            regions = regions[[t[0] < kept_blocks for t in targets]][:, : kept_images * self.tokens_per_image]
            targets = [t for t in targets if t[0] < kept_blocks]
            spans = [(a, b, min(u, cut)) for a, b, u in spans if b <= cut]
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.where(torch.tensor(labelled), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        weights = self._weights(lay, input_ids, labels)
        pixel_values = torch.stack(pixels) if pixels else torch.zeros(0, 3, 1, 1)  # (N_img, 3, H, W)
        aux = torch.stack([t for _, t, _ in targets]) if targets else torch.zeros(0, 3, 1, 1)  # (N_tgt, 3, H, W)
        return ProcessedSample(
            key=key,
            input_ids=input_ids,
            labels=labels,
            loss_weights=weights,
            pixel_values=pixel_values,
            prompt_length=prompt_length,
            answer=str(meta["answer"]),
            choices=[str(c) for c in meta.get("choices") or []],
            aux_pixel_values=aux,
            aux_blocks=torch.tensor([b for b, _, _ in targets], dtype=torch.long),
            aux_regions=regions,
            hidden_spans=torch.tensor(spans, dtype=torch.long).view(-1, 3),
            truncated=truncated,
        )

    def _weights(self, lay: SequenceLayout, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """1 on labelled tokens, `observation_weight` strictly inside observation spans, 0 elsewhere."""
        inside = observation_mask(input_ids, self.ids.observation_open, self.ids.observation_close)  # (L,)
        weights = torch.where(inside, lay.observation_weight, 1.0)
        return weights * (labels != IGNORE_INDEX)

    def __call__(self, sample: dict) -> ProcessedSample:
        return self.render(sample["meta"], sample["images"], sample["key"])
