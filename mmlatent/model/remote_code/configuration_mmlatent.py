"""transformers config class of an mmlatent export (loaded with `trust_remote_code=True`).

The whole mmlatent `ModelConfig` is the `model` entry of `config.json`; transformers keeps it as a plain
attribute. mmlatent itself reads `config.json` with its own typed loader.
"""

from transformers import PretrainedConfig


class LatentVLMConfig(PretrainedConfig):
    model_type = "mmlatent"
