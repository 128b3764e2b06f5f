"""Random-number-generator states in checkpoints, one per rank, for bit-exact resumes.

Lightning's checkpoint holds the weights, the optimiser and scheduler states, the loop counters and (from
our `EpochLoader`) the data stream's position, but not the RNG states: a resumed run would restart its
generators from `seed_everything` and draw different dropout masks, aux-image dropouts of the model
side, or diffusion noise. `gather_rng_states` collects the torch (CPU and CUDA), Python and NumPy states of
every rank into the checkpoint (one `all_gather_object` while the checkpoint is being dumped, which
every rank does); `set_rng_state` puts this rank's back. The module restores them just before the first
batch after a resume, i.e. after the data loader's workers have drawn their seeds, which is the point
the uninterrupted run had reached when it saved. States are stored as tensors, lists and numbers so the
checkpoint still loads with `torch.load(weights_only=True)`.

The trade-off: the gather moves a few KB per rank at every checkpoint; a resume on a different number of
ranks reuses the saved states modulo the old world size (exactness then is not promised anyway).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """This process's generator states, as checkpoint-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def gather_rng_states() -> list[dict]:
    """Every rank's `rng_state()`, in rank order (a collective when a process group is up)."""
    dist = torch.distributed
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    states: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states
