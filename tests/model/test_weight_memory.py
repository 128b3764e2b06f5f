"""Loaded weights live in their own aligned memory, so a loaded model computes bit for bit what it did.

The failure this guards against was seen on AMD EPYC CPUs: MKL's non-AVX-512 kernels reduce single-row
matrix products differently on unaligned memory, and safetensors/transformers hand out weights as views at
4- or 8-byte offsets of the file. `MKL_ENABLE_INSTRUCTIONS=AVX` selects such a kernel on any x86 CPU, so
the subprocess test reproduces the AMD behaviour here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.presets import preset
from mmlatent.model.weight_memory import ALIGNMENT, own_aligned_memory
from tests.conftest import REPO


def test_own_aligned_memory_copies_views_and_keeps_ties():
    buf = torch.arange(1 + 6 * 4, dtype=torch.float32)
    lin = torch.nn.Linear(4, 6, bias=False)
    lin.weight.data = buf[1:].view(6, 4)  # a view at a 4-byte offset, like a weight read from a file
    assert lin.weight.data_ptr() % ALIGNMENT
    tied = torch.nn.Module()
    tied.a, tied.b = lin, torch.nn.Linear(4, 6, bias=False)
    tied.b.weight = lin.weight  # the same Parameter in two places
    own_aligned_memory(tied)
    assert lin.weight.data_ptr() % ALIGNMENT == 0 and tied.b.weight is lin.weight
    assert torch.equal(lin.weight, buf[1:].view(6, 4)) and lin.weight.untyped_storage().nbytes() == 6 * 4 * 4


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2.5-vl"])
def test_every_loaded_weight_is_aligned_and_owns_its_memory(name, tmp_path):
    torch.manual_seed(0)
    cfg = preset(name)
    cfg.latent.mode = "thought"
    LatentVLM(cfg).save_pretrained(tmp_path / "m")
    loaded = LatentVLM.from_pretrained(tmp_path / "m")
    for key, t in loaded.state_dict().items():
        assert t.data_ptr() % ALIGNMENT == 0, key
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), key
        assert t.untyped_storage().resizable(), key  # PyTorch's own memory, not a view of the mapped file


def test_an_aligned_view_of_borrowed_memory_is_copied_too():
    import numpy as np

    block = np.arange(6 * 4 + ALIGNMENT, dtype=np.float32)  # memory PyTorch did not allocate, like a mapped file's
    skip = (-block.ctypes.data % ALIGNMENT) // 4
    outside = block[skip:skip + 6 * 4]  # aligned, so only the ownership check can catch it
    assert outside.ctypes.data % ALIGNMENT == 0
    lin = torch.nn.Linear(4, 6, bias=False)
    lin.weight.data = torch.from_numpy(outside).view(6, 4)
    assert not lin.weight.untyped_storage().resizable()
    own_aligned_memory(lin)
    assert lin.weight.untyped_storage().resizable() and lin.weight.data_ptr() != outside.ctypes.data
    assert torch.equal(lin.weight, torch.from_numpy(outside).view(6, 4))


ROUND_TRIP = """
import sys, torch
from mmlatent.model.latent_loop import latent_forward
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.presets import preset
from tests.conftest import latent_block, right_pad
torch.manual_seed(0)
cfg = preset("tiny"); cfg.latent.mode = "thought"
model = LatentVLM(cfg).eval()
model.save_pretrained(sys.argv[1])
loaded = LatentVLM.from_pretrained(sys.argv[1])
img = [model.ids.image] * model.tokens_per_image
rows = [[5, 6, *img, 7, *latent_block(model, 3), 8, 9], [5, *img, 6, 7, 8, *latent_block(model, 2), 9]]
ids, mask, pos = right_pad(rows, model.ids.pad)
pixels = torch.randn(2, 3, 64, 64)
with torch.no_grad():
    want, got = latent_forward(model, ids, mask, pos, pixels), latent_forward(loaded, ids, mask, pos, pixels)
print("max_diff", float((want.logits - got.logits).abs().max()))
sys.exit(0 if torch.equal(want.logits, got.logits) else 1)
"""


@pytest.mark.slow
def test_round_trip_is_bit_identical_on_an_alignment_sensitive_blas(tmp_path):
    env = {**os.environ, "MKL_ENABLE_INSTRUCTIONS": "AVX", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(tmp_path / "m")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]


def _resident_file_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_released_file_pages_leave_memory_and_read_back_the_same(tmp_path):
    from mmlatent.model.weight_memory import FilePages

    want = torch.arange(8 * 2**20, dtype=torch.float32)  # 32 MiB
    torch.save({"w": want}, tmp_path / "c.pt")
    mapped = torch.load(tmp_path / "c.pt", mmap=True, weights_only=True)["w"]
    assert torch.equal(mapped, want)  # every page read: resident
    before = _resident_file_bytes()
    FilePages().release(mapped)
    assert before - _resident_file_bytes() > 24 * 2**20
    assert torch.equal(mapped, want)  # a released page is read from the file again
    FilePages().release(want)  # PyTorch's own memory: left alone
    assert torch.equal(want, torch.arange(8 * 2**20, dtype=torch.float32))
