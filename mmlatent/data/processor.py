"""Render one decoded sample into token ids for one stage's layout.

The processor is where a stage's view of the data is decided: question images always expand to
`tokens_per_image` image tokens; auxiliary images (the pictures inside the reasoning) are kept inline
(stage 1), or dropped with the reasoning (the direct-answer baseline); later stages turn them into latent
blocks. The chat is rendered in ChatML (`<|im_start|>role\\n ... <|im_end|>\\n`), the format of Qwen and of
the tiny tokenizer; only assistant tokens are labelled, and tokens inside `<observation>…</observation>`
get a heavier loss weight.

It runs in the data-loader workers, so it is plain CPU code: the tokenizer is a fast tokenizer and image
preprocessing is the vision library's own transform handed in by the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from mmlatent.data.batch import IGNORE_INDEX, ProcessedSample
from mmlatent.data.sample import SampleError
from mmlatent.model.tokenizer import SPECIAL, token_ids


@dataclass
class SequenceLayout:
    """How a stage lays a sample out as a token sequence. Stages build this; the processor obeys it."""

    aux_images: Literal["inline", "drop"] = "inline"
    """`inline`: auxiliary images appear as real images in the reasoning (stage 1 teacher). `drop`: they
    are removed (used with `reasoning="answer_only"`)."""
    reasoning: Literal["full", "answer_only"] = "full"
    """`full`: the assistant turn is the whole chain of thought. `answer_only`: it is replaced by
    `answer_template` (the direct-answer baseline)."""
    observation_weight: float = 2.0
    """Cross-entropy weight of tokens inside `<observation>…</observation>` (stage 1: ×2)."""
    answer_template: str = "The answer is {answer}."
    """Assistant text when `reasoning="answer_only"`."""


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
    ):
        self.tok = tokenizer
        self.transform = image_transform
        self.tokens_per_image = tokens_per_image
        self.layout = layout
        self.cfg = cfg
        self.ids = token_ids(tokenizer)
        self._cache: dict[str, list[int]] = {}

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` with no BOS/EOS added."""
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _fixed(self, text: str) -> list[int]:
        """Encode a template string once (turn headers and footers recur in every sample)."""
        if text not in self._cache:
            self._cache[text] = self.encode_text(text)
        return self._cache[text]

    def render(self, meta: dict, images: dict[str, Image.Image], key: str = "?") -> ProcessedSample:
        ids: list[int] = []
        labelled: list[bool] = []
        pixels: list[torch.Tensor] = []
        prompt_length = None

        def emit(tokens: list[int], label: bool) -> None:
            ids.extend(tokens)
            labelled.extend([label] * len(tokens))

        def emit_image(ref: str) -> None:
            pixels.append(self.transform(images[ref]))
            emit([self.ids.image] * self.tokens_per_image, False)

        for msg in meta["messages"]:
            role = msg["role"]
            is_assistant = role == "assistant"
            emit(self._fixed(f"{SPECIAL.turn_start}{role}\n"), False)
            if is_assistant and prompt_length is None:
                prompt_length = len(ids)
            if is_assistant and self.layout.reasoning == "answer_only":
                emit(self.encode_text(self.layout.answer_template.format(answer=meta["answer"])), True)
            else:
                for item in msg["content"]:
                    if item["type"] == "text":
                        emit(self.encode_text(item["text"]), is_assistant)
                    elif item["type"] == "image":
                        emit_image(item["ref"])
                    elif self.layout.aux_images == "inline":  # aux_image
                        emit_image(item["ref"])
            emit(self._fixed(SPECIAL.turn_end), is_assistant)
            emit(self._fixed("\n"), False)
        if prompt_length is None:
            raise SampleError("no_assistant_turn", "the sample has no assistant turn to learn", key)
        return self._finish(key, meta, ids, labelled, pixels, prompt_length)

    def _finish(self, key, meta, ids, labelled, pixels, prompt_length) -> ProcessedSample:
        if len(ids) > self.cfg.max_length:
            cut = self.cfg.max_length
            if self.cfg.overlong == "drop" or ids[cut - 1] == self.ids.image == ids[min(cut, len(ids) - 1)]:
                raise SampleError("too_long", f"{len(ids)} tokens > max_length={cut}", key)
            kept_images = sum(1 for t in ids[:cut] if t == self.ids.image) // self.tokens_per_image
            ids, labelled, pixels = ids[:cut], labelled[:cut], pixels[:kept_images]
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.where(torch.tensor(labelled), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        weights = self._weights(input_ids, labels)
        pixel_values = torch.stack(pixels) if pixels else torch.zeros(0, 3, 1, 1)  # (N_img, 3, H, W)
        return ProcessedSample(
            key=key,
            input_ids=input_ids,
            labels=labels,
            loss_weights=weights,
            pixel_values=pixel_values,
            prompt_length=prompt_length,
            answer=str(meta["answer"]),
        )

    def _weights(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """1 on labelled tokens, `observation_weight` strictly inside observation spans, 0 elsewhere."""
        opens = (input_ids == self.ids.observation_open).long()
        closes = (input_ids == self.ids.observation_close).long()
        depth = torch.cumsum(opens, 0) - torch.cumsum(closes, 0) - opens  # (L,) >0 strictly inside a span
        weights = torch.where(depth > 0, self.layout.observation_weight, 1.0)
        return weights * (labels != IGNORE_INDEX)

    def __call__(self, sample: dict) -> ProcessedSample:
        return self.render(sample["meta"], sample["images"], sample["key"])
