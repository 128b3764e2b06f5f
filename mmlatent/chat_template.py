"""mmlatent's one chat template (ChatML), shared by training samples, evaluation prompts and `generate`.

A turn is `<|im_start|>role\\n`, its items, then `<|im_end|>` and a newline; text items are encoded one by
one (no BOS/EOS) and an image becomes `tokens_per_image` image tokens. The data processor renders every turn
but the assistant's with `render_turn` and frames the assistant turn with `turn_open` and `TURN_END`; a
prompt is its turns followed by the opened assistant turn (`prompt_ids`). A system turn comes first when a
chat has one: the sample's own, else the model's `system_prompt` (`with_system`), so a model is asked its
questions as it was trained. It sits below the data and model layers, which both import it.
"""

from __future__ import annotations

from typing import Callable

from transformers import PreTrainedTokenizerBase

from mmlatent.tokens import SPECIAL, token_ids

TURN_END = SPECIAL.turn_end
"""Closes a turn (the assistant's is labelled: it is how an answer ends)."""
TURN_SEPARATOR = "\n"
"""Follows every `TURN_END`."""


def turn_open(role: str) -> str:
    """The ChatML line that opens a `role` turn: `<|im_start|>role\\n`."""
    return f"{SPECIAL.turn_start}{role}\n"


def render_turn(
    role: str,
    content: list[dict],
    encode: Callable[[str], list[int]],
    image: Callable[[dict], list[int]],
    fixed: Callable[[str], list[int]] | None = None,
) -> list[int]:
    """The ids of one whole turn that is not the assistant's. `content` holds the sample format's items: a
    `{"type": "text", "text"}` item is encoded, any other is an image whose tokens `image(item)` returns (in
    order). `fixed` encodes the turn markers (default `encode`; the processor caches them)."""
    fixed = fixed or encode
    out = list(fixed(turn_open(role)))  # a copy: `fixed` may hand out a cached list
    for item in content:
        out += encode(item["text"]) if item["type"] == "text" else image(item)
    return out + fixed(TURN_END) + fixed(TURN_SEPARATOR)


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`messages` (the sample format's `{"role", "content"}` turns) with a system turn of `system_prompt`
    first, unless they hold one already or `system_prompt` is None."""
    if system_prompt is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}, *messages]


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tokens_per_image: int, system_prompt: str | None = None
) -> list[int]:
    """The ids a model continues from: `messages` (turns before the answer, in the sample format), a system
    turn of `system_prompt` first when they hold none, then the opened assistant turn."""
    image_tokens = [token_ids(tokenizer).image] * tokens_per_image

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out: list[int] = []
    for message in with_system(messages, system_prompt):
        out += render_turn(message["role"], message["content"], encode, lambda _: image_tokens)
    return out + encode(turn_open("assistant"))
