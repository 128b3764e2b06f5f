"""Give every weight of a loaded model its own freshly allocated, 64-byte aligned memory.

transformers and safetensors hand out loaded tensors as views into the file's buffer, at whatever offset
the tensor sits in the file (often only 4- or 8-byte aligned). The values are exact, but some BLAS kernels
reduce in a different order on unaligned memory: MKL's AVX and SSE paths, which AMD CPUs take, give a
loaded model's single-row matrix products (a latent step, a decoding step) results that differ in the
last bits from the same weights in memory PyTorch allocated itself. Copying each tensor once at load
time makes a loaded model compute exactly what the saved one did, on every CPU family, at the cost of one
transient copy of the weights.

A view into the file can also be aligned and the only tensor on its storage (transformers 5 gives each
tensor its own storage over the mapped file), yet it keeps the whole mapping alive: every page the copies
read stays resident beside them, one more model's worth of host memory for as long as the model lives.
So a tensor whose memory PyTorch's allocator does not own (a storage that cannot be resized) is copied too,
and the mapping is released once the last view is gone.
"""

from __future__ import annotations

import torch
from torch import nn

ALIGNMENT = 64
"""Bytes; what PyTorch's CPU allocator guarantees and what vector kernels assume."""


def own_aligned_memory(module: nn.Module) -> nn.Module:
    """Copy, in place, every parameter and buffer of `module` that is not `ALIGNMENT`-byte aligned, that
    shares its storage with other tensors, or whose memory PyTorch did not allocate (a view of a mapped
    file); return `module`. Tied parameters stay tied (one object)."""
    tensors = [*module.parameters(), *module.buffers()]
    for t in tensors:
        if t.is_meta:
            continue
        storage = t.untyped_storage()
        shared = storage.nbytes() != t.numel() * t.element_size()
        borrowed = not storage.resizable()  # memory PyTorch's allocator does not own: a view of the file
        if t.data_ptr() % ALIGNMENT or shared or borrowed or not t.is_contiguous():
            t.data = t.data.clone(memory_format=torch.contiguous_format)
    return module
