"""What a training step does when its loss is not a finite number, or when a rank has no data for it.

`StepGuard` looks at every batch's loss before the backward pass and decides, identically on every rank,
whether this step's optimiser update runs. The ranks agree through one all-reduce of two flags per step
(this rank's loss is NaN/Inf; this rank's batch is a filler), which costs a device-to-host sync per step
(NaN detection needs one anyway). A rank never skips its backward pass: under DDP or FSDP that would
leave the others waiting in the gradient all-reduce. Instead every rank runs forward and backward, and
the *optimiser step* is skipped on all ranks together, so the weights and the AdamW moments stay exactly
as they were (the learning-rate schedule still advances: a skipped step is a step).

- non-finite loss on any rank: `skip` drops the step (counted, logged with the step and the batch keys
  of the ranks that produced it), or `stop` ends the run with an error naming them. After
  `max_consecutive_skips` skipped steps in a row the run stops anyway: a diverged run does not heal.
- filler batches (a step whose samples were all unusable, see `data/pipeline.py`): the module weighs their
  loss by zero; when every rank held a filler in every micro-batch of the optimiser step the step is
  skipped (nothing to learn, and AdamW would still move the weights on a zero gradient). With gradient
  accumulation, one filler micro-batch among real ones only contributes nothing; the step still runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass
class FaultConfig:
    """What training does when a step's loss is NaN or Inf."""

    nonfinite_loss: Literal["skip", "stop"] = "skip"
    """`skip`: no optimiser step for that batch on any rank (counted in `train/skipped_steps`, logged with the
    step and the batch's sample keys). `stop`: end the run with an error naming the step and the keys."""
    max_consecutive_skips: int = 20
    """Stop (as `stop` would) once this many optimiser steps in a row were skipped for non-finite losses."""

    def __post_init__(self) -> None:
        if self.max_consecutive_skips < 1:
            raise ValueError(f"fault.max_consecutive_skips={self.max_consecutive_skips} must be at least 1")


def _dist_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class StepGuard:
    """Decides, the same on every rank, whether the optimiser step of the current batch runs."""

    def __init__(self, cfg: FaultConfig):
        self.cfg = cfg
        self._nonfinite_pending = False
        """A micro-batch of the current optimiser step had a non-finite loss on some rank."""
        self._checked = 0
        """Micro-batches checked since the last optimiser step."""
        self._with_data = 0
        """... of which some rank held real data (not a filler)."""
        self.consecutive = 0
        self.skipped_steps = 0
        """Optimiser steps skipped for non-finite losses since the module was built."""

    def check(self, loss: Tensor, keys: list[str], filler: bool, step: int, epoch: int, batch_idx: int) -> None:
        """Look at one batch's loss (before backward); raise under `stop`, else remember to skip."""
        world = _dist_world()
        flags = torch.stack([(~torch.isfinite(loss.detach())).any(), torch.tensor(filler, device=loss.device)]).float()
        if world > 1:
            torch.distributed.all_reduce(flags)  # sums: ranks with a non-finite loss, ranks with a filler
        bad_ranks, filler_ranks = (int(x) for x in flags.tolist())
        self._checked += 1
        self._with_data += filler_ranks < world
        if not bad_ranks:
            return
        mine = not bool(torch.isfinite(loss.detach()).all())
        offenders = [keys if mine else None]
        if world > 1:
            offenders = [None] * world
            torch.distributed.all_gather_object(offenders, keys if mine else None)
        named = "; ".join(f"rank {r}: {k}" for r, k in enumerate(offenders) if k is not None)
        where = f"step {step} (epoch {epoch}, batch {batch_idx})"
        if self.cfg.nonfinite_loss == "stop":
            raise FloatingPointError(f"non-finite loss at {where} on {bad_ranks} rank(s); batch keys: {named}. "
                                     f"Set model.fault.nonfinite_loss=skip to drop such steps instead.")
        log.warning("non-finite loss at %s; skipping the optimiser step; batch keys: %s", where, named)
        self._nonfinite_pending = True

    def take(self, step: int) -> bool:
        """Whether to skip the optimiser step now (resets the decision for the next step); stops after too
        many non-finite skips in a row."""
        nonfinite = self._nonfinite_pending
        only_fillers = self._checked > 0 and self._with_data == 0
        skip = nonfinite or only_fillers
        self._nonfinite_pending, self._checked, self._with_data = False, 0, 0
        if nonfinite:
            self.consecutive += 1
            self.skipped_steps += 1
            if self.consecutive >= self.cfg.max_consecutive_skips:
                raise FloatingPointError(f"{self.consecutive} optimiser steps in a row up to step {step} had a "
                                         f"non-finite loss (model.fault.max_consecutive_skips); the run has diverged")
        elif not skip:
            self.consecutive = 0
        return skip
