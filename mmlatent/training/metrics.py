"""Training-time metrics computed from a stage's forward: pure functions of logits and token ids.

`observation_accuracy` is the learning signal of grounding: the teacher-forced accuracy of the tokens
inside `<observation>…</observation>` spans, the words the reasoning reads off an image (the synthetic set
wraps exactly the colour or arrow word; converted corpora wrap the sentence that reads an image). The loss
falls long before these tokens are right (the template is easy), so this is the curve that shows whether a
model looks at its images. It returns counts, not a ratio, so batches and ranks add up exactly.
"""

from __future__ import annotations

from torch import Tensor

from mmlatent.tokens import IGNORE_INDEX
from mmlatent.data.masks import observation_mask


def observation_accuracy(logits: Tensor, input_ids: Tensor, labels: Tensor, open_id: int, close_id: int) -> tuple[int, int]:
    """(correct, total) of the argmax next-token predictions at labelled targets strictly inside observation
    spans. logits (B, L, V) predict position t + 1 from position t; input_ids, labels (B, L) aligned."""
    target = labels[:, 1:]  # (B, L-1)
    inside = observation_mask(input_ids, open_id, close_id)[:, 1:] & (target != IGNORE_INDEX)  # (B, L-1)
    hit = (logits[:, :-1].argmax(-1) == target) & inside  # (B, L-1)
    return int(hit.sum()), int(inside.sum())
