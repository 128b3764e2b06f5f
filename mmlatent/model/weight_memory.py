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

Until then, the file's pages a copy has read would stay resident beside the copies: loading would peak at
two models' worth of host memory (eight per node when eight ranks load at once). `FilePages.release` hands
the pages of a view that has been copied back to the kernel (`madvise(MADV_DONTNEED)` on the pages that lie
wholly inside it, in a file-backed mapping: a later read fetches them from the file again), so loading peaks
at one model plus one tensor. It is Linux-only and a no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from pathlib import Path

import torch
from torch import nn

ALIGNMENT = 64
"""Bytes; what PyTorch's CPU allocator guarantees and what vector kernels assume."""


MADV_DONTNEED = 4
"""Linux's madvise advice: drop these pages (a file-backed page is read from its file again when touched)."""


class FilePages:
    """The file-backed mappings of this process (from /proc/self/maps), to release a copied view's pages."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        maps = Path("/proc/self/maps")
        libc = ctypes.util.find_library("c")
        self._madvise = getattr(ctypes.CDLL(libc, use_errno=True), "madvise", None) if libc else None
        if self._madvise is None or not maps.is_file():
            return
        for line in maps.read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):  # a mapped file (not the heap, a stack, anonymous)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                self.ranges.append((lo, hi))

    def release(self, view: torch.Tensor) -> None:
        """Give back the pages wholly inside `view`'s bytes if they belong to a mapped file; call it only once
        nothing reads `view` any more (its values were copied)."""
        if self._madvise is None or view.device.type != "cpu" or view.untyped_storage().resizable():
            return
        start, end = view.data_ptr(), view.data_ptr() + view.numel() * view.element_size()
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo and any(a <= lo and hi <= b for a, b in self.ranges):
            self._madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)


def own_aligned_memory(module: nn.Module) -> nn.Module:
    """Copy, in place, every parameter and buffer of `module` that is not `ALIGNMENT`-byte aligned, that
    shares its storage with other tensors, or whose memory PyTorch did not allocate (a view of a mapped
    file); return `module`. Tied parameters stay tied (one object)."""
    tensors = [*module.parameters(), *module.buffers()]
    pages = FilePages()
    for t in tensors:
        if t.is_meta:
            continue
        storage = t.untyped_storage()
        shared = storage.nbytes() != t.numel() * t.element_size()
        borrowed = not storage.resizable()  # memory PyTorch's allocator does not own: a view of the file
        if t.data_ptr() % ALIGNMENT or shared or borrowed or not t.is_contiguous():
            view = t.data
            t.data = view.clone(memory_format=torch.contiguous_format)
            pages.release(view)
    return module
