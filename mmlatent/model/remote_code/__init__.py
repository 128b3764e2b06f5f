"""The two files every saved folder carries, so that transformers' Auto classes load it with
`trust_remote_code=True` (when mmlatent is installed):

    AutoConfig.from_pretrained(folder_or_hub_id, trust_remote_code=True)   -> LatentVLMConfig
    AutoModel.from_pretrained(folder_or_hub_id, trust_remote_code=True)    -> mmlatent's LatentVLM

`config.json` names them in its `auto_map`, and `mmlatent.model.serialization` copies them beside it. They
are thin on purpose: the model class hands loading to `LatentVLM.from_pretrained` (safetensors only, the
same path as `mmlatent`'s own loader), so there is one loading path, not two. `remote_code_files` lists them.
"""

from __future__ import annotations

from pathlib import Path

MODEL_TYPE = "mmlatent"
AUTO_MAP = {
    "AutoConfig": "configuration_mmlatent.LatentVLMConfig",
    "AutoModel": "modeling_mmlatent.LatentVLMForAutoModel",
}


def remote_code_files() -> list[Path]:
    """The files copied beside `config.json`."""
    here = Path(__file__).parent
    return [here / "configuration_mmlatent.py", here / "modeling_mmlatent.py"]
