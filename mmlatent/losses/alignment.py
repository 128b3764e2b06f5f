"""Hidden-state alignment for latent distillation (Monet stages 2 and 3).

`cosine_alignment` is mean(1 - cos) between the student's and the teacher's hidden states, over the layers
and positions given. The caller gathers the positions (observation tokens in stage 2, latent slots in
stage 3) so the loss knows nothing about layouts; the teacher side is detached here, because a teacher is
a target, never a path for gradient.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cosine_alignment(student: Tensor, teacher: Tensor) -> Tensor:
    """mean over (layers, positions) of 1 - cos(student, teacher).

    student, teacher: (n_layers, n_positions, D). An empty position set gives 0 with the student's graph,
    so a batch without such positions still backpropagates (through nothing).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"cosine_alignment: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if student.shape[1] == 0:
        return student.sum() * 0.0
    cos = F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1, eps=1e-6)  # (n_layers, n_pos)
    return (1.0 - cos).mean()
