"""Where a transformers model's weights come from, and how they are loaded: the fields the causal LM of a
composed VLM (`LanguageModelConfig`) and a native VLM (`NativeBackboneConfig`) share.

Both load through transformers' `from_pretrained` from a Hub id or a local folder (the same code path; a
test saves a tiny random model and loads it back as a user's Hub id would load), or build a random model
from their own `random_init` shape when `name_or_path` is None. Only what is common lives here; each config
adds its own random shape and freezing options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""`dtype` names -> torch dtypes."""


@dataclass
class PretrainedSource:
    """A transformers model to load (or to build at random), and how."""

    name_or_path: str | None = None
    """A Hub id (`Qwen/Qwen2.5-0.5B-Instruct`, `Qwen/Qwen2.5-VL-3B-Instruct`) or a local folder written by
    `save_pretrained`. None builds a random model from `random_init`."""
    revision: str | None = None
    """Hub revision when `name_or_path` is a Hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype at load time. Mixed precision is the Trainer's `precision` setting, not this."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel. `sdpa` runs everywhere and accepts the 4D masks of the latent stages."""
