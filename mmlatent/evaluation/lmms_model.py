"""lmms-eval's model `latent_vlm`: any mmlatent model inside the harness the field reports with.

`pip install 'mmlatent[lmms]'` registers it through lmms-eval's `lmms_eval.models` entry point
(`lmms_registration.py`), so `python -m lmms_eval --model latent_vlm --model_args pretrained=DIR …` runs every
lmms-eval task a multiple-choice or short-answer VLM can answer, and `lmms_eval.simple_evaluate(model=
LatentVLMLmms(pretrained=model))` scores an in-memory model during training.

`generate_until` answers through `LatentVLM.generate`, the batched loop `mmlatent eval` runs, on the prompt
`mmlatent eval` builds for the same question: lmms-eval's text (for ScienceQA and MMMU the same characters as
ours) with the images first, or at their `<image k>` tags (`interleave_visuals`, MMMU's layout in
`mmlatent eval`). Requests are batched as `mmlatent eval` batches a split: per task, in the harness's order,
stably sorted by prompt length, `batch_size` at a time, so on hardware where padding changes numerics the
batches hold the same questions too. Answers are cut before the first `until` string; `max_new_tokens` and
temperature come from the task (temperature 0: greedy). `loglikelihood` scores a continuation teacher-forced
right after the prompt, so it measures the model without its latent reasoning (a block only opens in
generation); the trade-off is that such tasks say nothing about the latents. One process only: lmms-eval's
data parallelism across ranks is not supported.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string
from PIL import Image

from mmlatent.benchmarks import IMAGE_TAG, interleave
from mmlatent.evaluation.runner import cut_at_stop
from mmlatent.model.generation import GenerationConfig
from mmlatent.model.interventions import INTERVENTIONS
from mmlatent.model.latent_vlm import IMAGE_MARKER, LatentVLM

_HARNESS_ARGS = ("max_batch_size",)
"""Arguments lmms-eval passes to every model that this one has no use for."""


def _flag(name: str, value: Any) -> bool:
    """A model_args boolean (lmms-eval turns `true`/`false` into bools; accept the strings too)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"latent_vlm: model_args {name}={value!r} is not true or false")


def user_turn(context: str, visuals: list[Image.Image], interleave_visuals: bool) -> list[str | int]:
    """The user turn `mmlatent eval` builds: text pieces and ints k for `visuals[k]`.

    With `interleave_visuals` and one `<image k>` tag per distinct visual (lmms-eval's MMMU sends the tagged
    images, sorted by k), each image goes to its first tag (`benchmarks.interleave`, as MMMU prompts in
    `mmlatent eval`); `<image>` markers, one per visual, place them too; otherwise the images come first.
    """
    tags = sorted({int(m.group(1)) for m in IMAGE_TAG.finditer(context)})
    if interleave_visuals and tags and len(tags) == len(visuals):
        present = [k + 1 in tags for k in range(max(tags))]
        return [tags.index(item + 1) if isinstance(item, int) else item for item in interleave(context, present)]
    pieces = context.split(IMAGE_MARKER)
    if len(pieces) > 1 and len(pieces) - 1 == len(visuals):
        return [x for k, piece in enumerate(pieces) for x in ([k - 1, piece] if k else [piece]) if x != ""]
    return [*range(len(visuals)), context.replace(IMAGE_MARKER, "")]


class LatentVLMLmms(lmms):
    """An mmlatent `LatentVLM` as an lmms-eval model (`--model latent_vlm`)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | LatentVLM = "runs/demo/export",
        latent: bool | str = True,
        latent_intervention: str = "none",
        batch_size: int | str = 16,
        device: str | None = None,
        interleave_visuals: bool | str = True,
        max_new_tokens: int = 128,
        revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            pretrained: An exported folder, a Hub id or a Lightning `.ckpt` (as `mmlatent eval --model`), or a
                `LatentVLM` already in memory (evaluation during training).
            latent: Allow latent blocks (the model opens them itself); false: text only.
            latent_intervention: Replace every latent input: `none`, `zero`, `noise` or `swap`.
            batch_size: Questions per generation batch.
            device: Torch device (default: the model's own when in memory, else cuda if available, else cpu).
            interleave_visuals: Put each image at its `<image k>` tag, as `mmlatent eval` does for MMMU (false:
                images first, tags left as text, as lmms-eval's LLaVA models do).
            max_new_tokens: Generated positions per answer when the task does not say.
            revision: Hub revision of `pretrained`.
        """
        super().__init__()
        unknown = sorted(set(kwargs) - set(_HARNESS_ARGS))
        if unknown:
            raise ValueError(f"latent_vlm: unknown model_args {unknown}; known: pretrained, latent, latent_intervention, "
                             "batch_size, device, interleave_visuals, max_new_tokens, revision")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("latent_vlm runs in one process; launch lmms-eval without accelerate/torchrun ranks")
        if latent_intervention not in INTERVENTIONS:
            raise ValueError(f"latent_vlm: latent_intervention={latent_intervention!r}; expected one of {INTERVENTIONS}")
        try:
            self.batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"latent_vlm: batch_size={batch_size!r} is not a whole number") from None
        if self.batch_size < 1:
            raise ValueError(f"latent_vlm: batch_size={batch_size!r} must be >= 1")
        if isinstance(pretrained, LatentVLM):
            self.model = pretrained if device is None else pretrained.to(device)
        else:
            from mmlatent.evaluation.command import load_model

            self.model = load_model(str(pretrained), device or ("cuda" if torch.cuda.is_available() else "cpu"), revision)
        self.latent = _flag("latent", latent)
        self.latent_intervention = latent_intervention
        self.interleave_visuals = _flag("interleave_visuals", interleave_visuals)
        self.max_new_tokens = int(max_new_tokens)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LatentVLMLmms":
        """`--model_args` over the harness's own settings: lmms-eval passes `--batch_size` (1 unless given) and
        `--device` to every model, and `batch_size=` in `--model_args` would otherwise clash with them."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list[Image.Image]:
        raw = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        flat = [v for item in (raw or []) for v in (item if isinstance(item, (list, tuple)) else [item])]
        for v in flat:
            if not isinstance(v, Image.Image):
                raise ValueError(f"latent_vlm reads images only; task {task!r} gives a {type(v).__name__} visual")
        return [v.convert("RGB") for v in flat]

    def _config(self, gen_kwargs: dict[str, Any], task: str) -> tuple[GenerationConfig, list[str]]:
        """Decoding settings and stop strings from a task's generation kwargs."""
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            raise ValueError(f"latent_vlm decodes greedily or by sampling; task {task!r} asks for num_beams={gen_kwargs['num_beams']}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        cfg = GenerationConfig(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
            top_p=float(gen_kwargs.get("top_p") or 1.0), latent=self.latent, latent_intervention=self.latent_intervention,
        )
        return cfg, until

    def _prompt(self, content: list[str | int], visuals: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt `generate` decodes from for a user turn (`user_turn`'s items): ids (L,) and the images in
        prompt order (N_img, 3, H, W), rendered by the model's own chat template and system prompt."""
        text = "".join(IMAGE_MARKER if isinstance(x, int) else x for x in content)
        return self.model.prompt([visuals[x] for x in content if isinstance(x, int)], text)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        by_task: dict[str, list[int]] = defaultdict(list)
        turns: list[tuple[list[str | int], list[Image.Image]]] = []
        for i, (context, _gen, doc_to_visual, doc_id, task, split) in enumerate(r.args for r in requests):
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            turns.append((user_turn(context, visuals, self.interleave_visuals), visuals))
            by_task[task].append(i)
        out: list[str | None] = [None] * len(requests)
        for task, indices in by_task.items():  # mmlatent eval's batches: one split, sorted by prompt length
            lengths = {i: self._prompt(*turns[i])[0].numel() for i in indices}
            order = sorted(indices, key=lengths.__getitem__)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                cfg, until = self._config(requests[chunk[0]].args[1], task)
                texts = ["".join(IMAGE_MARKER if isinstance(x, int) else x for x in turns[i][0]) for i in chunk]
                images = [[turns[i][1][x] for x in turns[i][0] if isinstance(x, int)] for i in chunk]
                for i, g in zip(chunk, self.model.generate(images, texts, cfg)):
                    out[i] = cut_at_stop(g.text, until)
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), out[i])
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log P(continuation | prompt), whether greedy decoding gives the continuation), teacher-forced."""
        model = self.model
        device = next(model.parameters()).device
        out = []
        was_training = model.training
        model.eval()
        try:
            for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
                continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                content = user_turn(context, visuals, self.interleave_visuals)
                prompt, pixels = self._prompt(content, visuals)
                cont = model.tokenizer(continuation, add_special_tokens=False)["input_ids"]
                if not cont:
                    out.append((0.0, True))
                    continue
                ids = torch.cat([prompt, torch.tensor(cont)])[None].to(device)  # (1, L)
                pixels = pixels.to(device) if pixels.shape[0] else None  # (N_img, 3, H, W)
                L = ids.shape[1]
                logits = model(ids, torch.ones_like(ids), torch.arange(L, device=device)[None], pixels).logits
                logp = logits[0, prompt.numel() - 1 : L - 1].float().log_softmax(-1)  # (len(cont), V)
                target_ids = ids[0, prompt.numel() :]  # (len(cont),)
                total = float(logp.gather(-1, target_ids[:, None]).sum())
                out.append((total, bool((logp.argmax(-1) == target_ids).all())))
        finally:
            model.train(was_training)
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        tasks = sorted({r.args[4] for r in requests if len(r.args) > 4})
        raise NotImplementedError(f"latent_vlm answers in one round; multi-round task(s) {tasks} are not supported")
