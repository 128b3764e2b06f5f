"""A Lightning callback for `benchmarks/rehearsal.py`: what one training run holds and how long its steps take.

Loaded into a `mmlatent fit` run by class path (`rehearsal_probe.StepProbe`, with `benchmarks/` on
PYTHONPATH). Per training step it writes one JSON line: wall seconds, tokens (non-padding positions),
the bytes autograd saved for the backward during the forward (activations; parameters excluded, each
storage counted once), the parameter, gradient and optimiser-state bytes, and the process's peak
resident memory so far (VmHWM; and on a GPU the CUDA allocator's peak reserved bytes).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import lightning as L
import torch


def _high_water() -> int:
    """This program's peak resident memory (VmHWM; `ru_maxrss` would include the forking parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _checkpointed_layers(module: torch.nn.Module) -> dict[str, int]:
    """Layers that recompute in the backward: transformers' checkpointing layers whose flag is on, in train mode."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    return {"on": sum(bool(m.gradient_checkpointing and m.training) for m in layers), "of": len(layers)}


class StepProbe(L.Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self._t0 = 0.0
        self._hooks = None
        self._saved: dict[int, int] = {}
        self._grads = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        params = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
        self._saved = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                self._saved[ptr] = t.untyped_storage().nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        self._tokens = int(batch.attention_mask.sum())
        self._checkpointed = _checkpointed_layers(pl_module)
        self._t0 = time.perf_counter()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._grads = _bytes(p.grad for p in pl_module.parameters())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._t0
        optimizer = trainer.optimizers[0]
        line = {
            "step": trainer.global_step, "seconds": round(seconds, 2), "tokens": self._tokens,
            "activation_bytes": sum(self._saved.values()), "parameter_bytes": _bytes(pl_module.parameters()),
            "gradient_bytes": self._grads,
            "optimizer_bytes": _bytes(v for state in optimizer.state.values() for v in state.values()
                                      if isinstance(v, torch.Tensor)),
            "checkpointed_layers": self._checkpointed,
            "peak_rss_bytes": _high_water(),
            "peak_cuda_bytes": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0,
        }
        with open(self.out, "a") as f:
            f.write(json.dumps(line) + "\n")
