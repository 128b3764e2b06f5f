"""Helpers shared by the benchmark scripts: timing and synthetic latent batches."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from mmlatent.data.synthetic_tokenizer import build_synthetic_tokenizer

build_synthetic_tokenizer()  # the tiny preset's tokenizer, built once per machine (a no-op afterwards)


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int = 9) -> tuple[float, float]:
    """Median wall times of `fn_a()` and `fn_b()`, run alternately so that machine noise hits both alike."""
    fn_a(), fn_b()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times_a), statistics.median(times_b)


def latent_batch(model, batch: int, prefix: int, slots: int, suffix: int, seed: int = 0, image_size: int = 64):
    """(ids, mask, pos, pixels, labels) with one image in the prefix and one latent block of `slots` slots.

    Blocks start at slightly different positions per row (the loop must handle that), and the rows are
    right-padded to a common length.
    """
    g = torch.Generator().manual_seed(seed)
    T = model.tokens_per_image
    ids_ = model.ids
    rows = []
    for b in range(batch):
        shift = b % 3
        pre = torch.randint(10, 300, (prefix - T - 1 - shift,), generator=g).tolist()
        rows.append(
            pre[:4] + [ids_.image] * T + pre[4:] + [ids_.latent_start] + [ids_.latent] * slots
            + [ids_.latent_end] + torch.randint(10, 300, (suffix + shift,), generator=g).tolist()
        )
    L = max(map(len, rows))
    ids = torch.full((batch, L), ids_.pad)
    mask = torch.zeros(batch, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    pos = torch.arange(L).expand(batch, L)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    labels = torch.where(mask.bool() & (ids != ids_.image) & (ids != ids_.latent), ids, torch.full_like(ids, -100))
    return ids, mask, pos, pixels, labels
