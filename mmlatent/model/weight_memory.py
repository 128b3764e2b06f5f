"""Give every weight of a loaded model its own freshly allocated, 64-byte aligned memory.

transformers and safetensors hand out loaded tensors as views into the file's buffer, at whatever offset
the tensor sits in the file (often only 4- or 8-byte aligned). The values are exact, but some BLAS kernels
reduce in a different order on unaligned memory: MKL's AVX and SSE paths, which AMD CPUs take, give a
loaded model's single-row matrix products (a latent step, a decoding step) results that differ in the
last bits from the same weights in memory PyTorch allocated itself. Copying each tensor once at load
time makes a loaded model compute exactly what the saved one did, on every CPU family, at the cost of one
transient copy of the weights.
"""

from __future__ import annotations

import torch
from torch import nn

ALIGNMENT = 64
"""Bytes; what PyTorch's CPU allocator guarantees and what vector kernels assume."""


def own_aligned_memory(module: nn.Module) -> nn.Module:
    """Copy, in place, every parameter and buffer of `module` that is not `ALIGNMENT`-byte aligned or that
    shares its storage with other tensors; return `module`. Tied parameters stay tied (one object)."""
    tensors = [*module.parameters(), *module.buffers()]
    for t in tensors:
        if t.is_meta:
            continue
        shared = t.untyped_storage().nbytes() != t.numel() * t.element_size()
        if t.data_ptr() % ALIGNMENT or shared or not t.is_contiguous():
            t.data = t.data.clone(memory_format=torch.contiguous_format)
    return module
