"""Shared fixtures: a private cache folder, small synthetic shard sets, the tiny model.

Everything is built under pytest's tmp folders; nothing is downloaded.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch  # noqa: F401  (first import here: see below)
import pytest

# Lightning's logger gets a StreamHandler on `sys.stderr` at its first import. Imported first inside a test
# that captures output (capsys), the handler would keep that test's stream, closed once it ends, and every
# later Lightning log line would print a "--- Logging error ---" traceback into other tests' stderr.

REPO = Path(__file__).resolve().parents[1]


def random_png(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    """PNG bytes of (width, height) random pixels, the same for the same seed."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def read_samples(out: Path) -> dict[str, dict]:
    """key -> {"json": dict, "<ref>.<ext>": bytes} from every shard of `out`, in shard order."""
    import json
    import tarfile

    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, _, suffix = m.name.partition(".")
                data = tf.extractfile(m).read()
                samples.setdefault(key, {})[suffix] = json.loads(data) if suffix == "json" else data
    return samples


@contextmanager
def one_thread():
    """torch on one intra-op thread inside: tiny models train faster so, most of all on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def latent_block(model, n: int) -> list[int]:
    """Token ids of one latent block of `n` slots."""
    return [model.ids.latent_start, *[model.ids.latent] * n, model.ids.latent_end]


def right_pad(rows: list[list[int]], pad_id: int):
    """Right-padded (ids, attention mask, position ids), each [B, L], of token-id rows."""
    import torch

    B, L = len(rows), max(map(len, rows))
    ids = torch.full((B, L), pad_id)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, torch.arange(L).expand(B, L)


def assert_cached_loop_matches_recompute(model, ids, mask, pos, pixels):
    """The KV-cached latent loop gives the full-recompute reference's logits, with one forward for the prefix
    and one per slot column (the last carries the rest of the sequence). Returns the cached run."""
    import torch

    from mmlatent.model.latent_loop import latent_forward, reference_latent_forward

    with torch.no_grad():
        fast = latent_forward(model, ids, mask, pos, pixels)
        slow = reference_latent_forward(model, ids, mask, pos, pixels)
    assert (fast.logits - slow.logits)[mask.bool()].abs().max() <= 1e-4
    assert fast.forwards == 1 + int((ids == model.ids.latent).any(0).sum())
    assert fast.latent_vectors.shape == (int((ids == model.ids.latent).sum()), model.backbone.hidden_size)
    return fast


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Build the synthetic tokenizer into a session folder, not the user's ~/.cache."""
    os.environ["MMLATENT_CACHE"] = str(tmp_path_factory.mktemp("mmlatent-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mmlatent.data.synthetic_tokenizer import build_synthetic_tokenizer

    build_synthetic_tokenizer()  # the tiny presets' tokenizer (the data layer builds it, the model loads it)
    yield


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """64 training and 32 held-out synthetic samples, 16 per shard (4 + 2 shards)."""
    from mmlatent.data.synthetic import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, SynthConfig(), train=64, val=32, seed=0, samples_per_shard=16, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny preset, built once per session (tests must not train it in place)."""
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    return LatentVLM(preset("tiny")).eval()
