"""The one answer normalisation every converter applies to a sample's `answer` field.

Corpora state answers in different dress: Monet-SFT's last assistant turn ends in `\\boxed{…}` (with nested
braces, `\\boxed{\\frac{1}{2}}`), Zebra-CoT's `Final Answer` column holds `$\\boxed{70^\\circ}$` or a plain
`B`, MMMU and ScienceQA a letter or a short text. Scoring and training code compare `answer` with what a
model says, so every converter stores the bare answer: the content of the last balanced `\\boxed{…}` when
there is one, without `$…$` / `$$…$$` / `\\(…\\)` math wrappers, stripped. Only the `answer` field is
normalised: the text the model trains on keeps the corpus's own wording, so the same text reaches the
model as in the authors' code.
"""

from __future__ import annotations

BOXED = "\\boxed{"
"""Opening of a LaTeX box."""

_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
"""Math delimiters stripped from around an answer, outermost first."""


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` in `text` (braces balanced), or None when there is none or it
    is never closed."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, open_at = 0, start + len(BOXED) - 1
    for j in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[open_at + 1 : j]
    return None


def _unwrap(text: str) -> str:
    text = text.strip()
    for left, right in _WRAPPERS:
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            return _unwrap(text[len(left) : -len(right)])
    return text


def normalize_answer(text: object) -> str:
    """The bare answer of `text`: `$\\boxed{70^\\circ}$` -> `70^\\circ`, `\\boxed{\\frac{1}{2}}` ->
    `\\frac{1}{2}`, `$5$` -> `5`, ` B ` -> `B`; None -> ""."""
    if text is None:
        return ""
    text = str(text)
    boxed = last_boxed(text)
    return _unwrap(boxed if boxed is not None else text)
