"""transformers entry point of an mmlatent export (loaded with `trust_remote_code=True`).

`AutoModel.from_pretrained(folder_or_hub_id, trust_remote_code=True)` calls `from_pretrained` here, which
returns mmlatent's `LatentVLM` loaded by `LatentVLM.from_pretrained` (safetensors only; needs
`pip install mmlatent`). The class is never instantiated itself: it exists so that the Auto classes have
something to dispatch to.
"""

from transformers import PreTrainedModel

from .configuration_mmlatent import LatentVLMConfig


class LatentVLMForAutoModel(PreTrainedModel):
    config_class = LatentVLMConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        try:
            from mmlatent.model.latent_vlm import LatentVLM
        except ImportError as err:
            raise ImportError("this folder holds an mmlatent model: `pip install mmlatent` to load it") from err
        return LatentVLM.from_pretrained(
            str(pretrained_model_name_or_path), revision=kwargs.get("revision"), token=kwargs.get("token")
        )
