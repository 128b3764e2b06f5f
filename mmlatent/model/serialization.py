"""The folder format of a `LatentVLM`: save it as a Hub-ready folder and load it back exactly.

Folder layout (format version 1), every file written deterministically (sorted keys, stable JSON, safetensors
with fixed metadata) so saving a loaded model again gives the same bytes:

    config.json                    {"format_version", "library_name", "architectures", "model": ModelConfig}
    model.safetensors              every weight outside the LM (vision tower, projector, latent heads), or
    model-0000i-of-0000n.safetensors + model.safetensors.index.json past `max_shard_size`
    lm/                            the causal LM as transformers writes it (config.json, safetensors, sharded
                                   the same way), loadable alone with `AutoModelForCausalLM`
    vlm/                           instead of lm/ for a native backbone (Qwen2.5-VL, LLaVA): the whole
                                   transformers VLM and its image processor, loadable alone with
                                   `AutoModelForImageTextToText` / `AutoImageProcessor`
    tokenizer.json, tokenizer_config.json, ...   the tokenizer with mmlatent's special tokens
    image_processor_config.json    the vision tower's eval transform, step by step (informational)
    generation_config.json         mmlatent's `GenerationConfig` (when one is given)

Trade-off: the LM sits in its own transformers folder instead of in one state dict with the rest. Loading
then builds it with `AutoModelForCausalLM.from_pretrained`, which reads the exact architecture from its
`config.json` and its weights straight from safetensors (no random init of a multi-billion-parameter LM that
is overwritten at once), and any transformers user can load the LM alone (a native VLM likewise, from
`vlm/`). The price is two weight sets in one folder. The small rest (vision tower, projector, heads) is built with random init, never downloading
pretrained weights, and overwritten from `model.safetensors`.

The written `ModelConfig` is relocatable: `tokenizer.name_or_path` is `"."` (the folder itself),
`lm.name_or_path` is `"lm"` (native: `native.name_or_path` is `"vlm"` and `native.image_size` is pinned), `vision.pretrained`
is None, revisions are None. LoRA adapters are merged into the weights before writing. The loader resolves those
against the folder it reads, so a local folder loads with no network and no file outside it; a Hub id is
first fetched whole with huggingface_hub's `snapshot_download` (as transformers fetches a Hub LM), with a
clear `HubAccessError` when that cannot work. Weights are read from safetensors only; nothing is unpickled.
Writes are atomic (`mmlatent.atomic.atomic_folder`). Uploading and model cards are `mmlatent.hub`'s job;
this module knows nothing of them (the dependency points hub -> model).

Loaded weights are copied into memory of their own (`weight_memory.py`), so a loaded model computes bit
for bit what the saved one did.

huggingface_hub's `ModelHubMixin` was considered for the download and push halves. It does not fit without
losses: its `save_pretrained` writes into the target folder in place (not atomically) after deleting
`config.json`, and its `__new__` re-derives a config from `__init__` arguments beside our typed
`ModelConfig`; so the format stays here and `mmlatent.hub.publish` pushes through `HfApi` directly.
"""


from __future__ import annotations

import copy
import dataclasses
import enum
import importlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import save_torch_state_dict, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor
from transformers import PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save

from mmlatent.atomic import atomic_folder, write_json
from mmlatent.config_io import from_dict, to_dict
from mmlatent.model.backbone import ComposedBackbone
from mmlatent.model.config import ModelConfig
from mmlatent.model.generation import GenerationConfig
from mmlatent.model.remote_code import AUTO_MAP, MODEL_TYPE, remote_code_files
from mmlatent.model.vision_tower import NAME_SCHEMES
from mmlatent.model.weight_memory import own_aligned_memory

if TYPE_CHECKING:
    from mmlatent.model.latent_vlm import LatentVLM

FORMAT_VERSION = 1
"""Version of the folder layout; bump on incompatible changes (the loader refuses newer versions)."""
LIBRARY_NAME = "mmlatent"
CONFIG_FILE = "config.json"
WEIGHTS_PATTERN = "model{suffix}.safetensors"
WEIGHTS_FILE = WEIGHTS_PATTERN.format(suffix="")
WEIGHTS_INDEX_FILE = WEIGHTS_FILE + ".index.json"
LM_FOLDER = "lm"
LM_PREFIX = "backbone.lm."
"""State-dict prefix of the LM inside a `LatentVLM` with a composed backbone (stored in `lm/` instead)."""
VLM_FOLDER = "vlm"
VLM_PREFIX = "backbone.vlm."
"""State-dict prefix of a native backbone's transformers VLM (stored in `vlm/` instead)."""
TOKENIZER_SOURCE = "."
IMAGE_PROCESSOR_FILE = "image_processor_config.json"
GENERATION_FILE = "generation_config.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
TOKENIZER_RUNTIME_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")
"""Load-time arguments transformers copies into `tokenizer_config.json`; they depend on where the tokenizer
was loaded from (a Hub id or a folder), so they are dropped to keep re-saves byte-identical."""


class HubAccessError(RuntimeError):
    """The Hugging Face Hub could not be used: no network, offline mode, no token, no permission, no repo."""


# ----------------------------------------------------------------------------------------------- writing


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def portable_config(cfg: ModelConfig, image_size: int | None = None) -> ModelConfig:
    """The config written to `config.json`: every source points inside the folder, nothing to download.

    `image_size`: a native backbone's resolved image side, pinned so that a random model's size (taken from
    `random_init`) survives being loaded back as a saved model.
    """
    out = copy.deepcopy(cfg)
    out.tokenizer.name_or_path = TOKENIZER_SOURCE
    out.tokenizer.revision = None
    if cfg.backbone != "composed":
        out.native.name_or_path = VLM_FOLDER
        out.native.revision = None
        out.native.image_size = image_size
        return out
    out.lm.name_or_path = LM_FOLDER
    out.lm.revision = None
    out.vision.pretrained = None  # the architecture is rebuilt at random init, then the saved weights load
    return out


def _backbone_prefix(cfg: ModelConfig) -> str:
    """State-dict prefix of the weights that live in the transformers subfolder (`lm/` or `vlm/`)."""
    return LM_PREFIX if cfg.backbone == "composed" else VLM_PREFIX


def _check_exportable(model: LatentVLM) -> None:
    if model.cfg.backbone != "composed":
        return  # a native VLM is written whole in transformers' layout: nothing outside the folder is needed
    if not isinstance(model.backbone, ComposedBackbone):
        raise ValueError(
            f"save_pretrained writes composed backbones (vision tower + projector + LM); got "
            f"{type(model.backbone).__name__}"
        )
    name = model.cfg.vision.name
    if name.startswith(NAME_SCHEMES):
        # timm and open_clip read an `hf-hub:` (or `local-dir:`) tower's architecture from that repo even at
        # random init, so the folder could not be loaded offline or on another machine.
        raise ValueError(
            f"vision.name={name!r}: this tower needs {name.split(':')[0]} to rebuild its architecture; export a "
            f"model whose vision.name is a timm or open_clip config name (with vision.pretrained a weights file)"
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if callable(value):
        return getattr(value, "__name__", type(value).__name__)
    return repr(value)


def image_processor_config(model: LatentVLM) -> dict:
    """The vision tower's eval transform described step by step, plus the image/token geometry.

    Informational (for users preprocessing without mmlatent): loading rebuilds the transform from the vision
    config through the library's own `image_transform`, so this file can never disagree with the model.
    """
    vision = model.backbone.vision
    steps = []
    for step in getattr(vision.image_transform(train=False), "transforms", []):
        args = {k: _jsonable(v) for k, v in vars(step).items() if not k.startswith("_") and k != "training"}
        steps.append({"type": type(step).__name__, **args})
    return {
        "library": vision.cfg.library,
        "image_size": list(vision.image_size),
        "patch_grid": list(vision.grid_size),
        "tokens_per_image": model.tokens_per_image,
        "image_token": model.tokenizer.convert_ids_to_tokens(model.ids.image),
        "transform": steps,
    }


def native_image_config(model: LatentVLM) -> dict:
    """A native backbone's image geometry (informational; the processor itself is in `vlm/`)."""
    backbone = model.backbone
    return {
        "backbone": model.cfg.backbone,
        "image_size": [backbone.image_size, backbone.image_size],
        "token_grid": list(backbone.token_grid),
        "tokens_per_image": model.tokens_per_image,
        "image_token": model.tokenizer.convert_ids_to_tokens(model.ids.image),
        "processor": f"{VLM_FOLDER}/preprocessor_config.json",
        "transform": "resize to image_size x image_size, then the processor (its own resize off where it has one)",
    }


def _clean_tokenizer_config(folder: Path) -> None:
    path = folder / "tokenizer_config.json"
    if path.exists():
        data = read_json(path)
        for key in TOKENIZER_RUNTIME_KEYS:
            data.pop(key, None)
        write_json(path, data)


def save_state_dict(state: dict[str, Tensor], folder: Path, max_shard_size: int | str) -> None:
    """`model.safetensors`, or shards and `model.safetensors.index.json`, with byte-stable content.

    Keys are sorted before sharding (the shard a tensor lands in depends only on the names and sizes),
    the per-file metadata is huggingface_hub's fixed `{"format": "pt"}`, and the index is rewritten as
    stable JSON.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ordered = {k: state[k].detach().cpu() for k in sorted(state)}
    save_torch_state_dict(ordered, folder, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    index = folder / WEIGHTS_INDEX_FILE
    if index.exists():
        write_json(index, read_json(index))  # huggingface_hub writes it without sorted keys or a final newline


def save_lm(lm: PreTrainedModel, folder: Path, max_shard_size: int | str) -> None:
    """The LM (or a native VLM) as a transformers folder `from_pretrained` reads: config and weights.

    The weights go through `save_state_dict` rather than `lm.save_pretrained`, whose assignment of tensors to
    shards is not reproducible between a built and a loaded model. Tied weights (the output head sharing
    the input embeddings) are stored once, as transformers stores them, and re-tied on load.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(lm.config)  # as transformers' own save_pretrained: record dtype and class
    config.dtype = str(lm.dtype).removeprefix("torch.")
    config.architectures = [type(lm).__name__]
    if lm.is_remote_code():  # trust_remote_code LMs: copy their modelling code beside the config
        custom_object_save(lm, str(folder), config=config)
    config.save_pretrained(str(folder))
    if lm.can_generate() and lm.generation_config is not None:
        lm.generation_config.save_pretrained(str(folder))
    state = lm.state_dict()
    for target, source in getattr(lm, "all_tied_weights_keys", {}).items():
        if target in state and source in state and state[target].data_ptr() == state[source].data_ptr():
            del state[target]
    save_state_dict(state, folder, max_shard_size)


def write_model_files(
    model: LatentVLM,
    folder: str | Path,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    generation: GenerationConfig | None = None,
) -> list[str]:
    """Write the model's files into an existing (usually temporary) folder; return their relative paths.

    A model with LoRA adapters is written merged (from a merged copy; the model itself is left as it is).
    """
    if model.lora is not None:
        model = copy.deepcopy(model).merge_lora()
    _check_exportable(model)
    folder = Path(folder)
    native = model.cfg.backbone != "composed"
    write_json(
        folder / CONFIG_FILE,
        {
            "architectures": ["LatentVLM"],
            "format_version": FORMAT_VERSION,
            "library_name": LIBRARY_NAME,
            "model_type": MODEL_TYPE,  # with auto_map: transformers' Auto classes load it (trust_remote_code)
            "auto_map": AUTO_MAP,
            "model": to_dict(portable_config(model.cfg, image_size=model.backbone.image_size if native else None)),
        },
    )
    if native:
        save_lm(model.backbone.vlm, folder / VLM_FOLDER, max_shard_size)
        model.backbone.image_processor.save_pretrained(str(folder / VLM_FOLDER))
    else:
        save_lm(model.backbone.lm, folder / LM_FOLDER, max_shard_size)
    prefix = _backbone_prefix(model.cfg)
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    save_state_dict(rest, folder, max_shard_size)
    model.tokenizer.save_pretrained(str(folder))
    _clean_tokenizer_config(folder)
    for path in remote_code_files():
        shutil.copyfile(path, folder / path.name)
    write_json(folder / IMAGE_PROCESSOR_FILE, native_image_config(model) if native else image_processor_config(model))
    if generation is not None:
        write_json(folder / GENERATION_FILE, dataclasses.asdict(generation))
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def save_pretrained(
    model: LatentVLM,
    out_dir: str | Path,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    generation: GenerationConfig | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a folder `load_pretrained` reads back exactly (atomically; see the module docstring).

    Args:
        model: The model to save (any device; tensors are copied to CPU).
        out_dir: Target folder; must be absent or empty unless `overwrite`.
        max_shard_size: Shard the safetensors files past this size (`"5GB"`, `"200MB"` or bytes).
        generation: Decoding settings to store as `generation_config.json`.
        overwrite: Replace an existing non-empty `out_dir`.
    """
    with atomic_folder(out_dir, if_exists="replace" if overwrite else "error") as tmp:
        write_model_files(model, tmp, max_shard_size=max_shard_size, generation=generation)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------- reading


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (`httpx2` in 2.4, `httpx` before)."""
    errors: list[type[BaseException]] = [OfflineModeIsEnabled]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def resolve_folder(dir_or_hub_id: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local export folder as is, or a Hub id downloaded (or found in the cache) with `snapshot_download`."""
    path = Path(dir_or_hub_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids; {path} is a local folder")
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; expected an mmlatent export folder or a Hub id")
    repo_id = str(dir_or_hub_id)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(f"{repo_id}: no such folder, and not a Hub model id (`org/name`)") from None
    if "/" not in repo_id:
        raise FileNotFoundError(f"{repo_id}: no such folder, and not a Hub model id (`org/name`)")
    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, library_name=LIBRARY_NAME))
    except LocalEntryNotFoundError as err:
        raise HubAccessError(
            f"could not download {where}: the Hub is unreachable (no network, or HF_HUB_OFFLINE=1) and it is not "
            f"in the local cache. Connect, or pass a local export folder. ({err})"
        ) from err
    except GatedRepoError as err:
        raise HubAccessError(f"{where} is gated: accept its terms on the Hub and log in (HF_TOKEN). ({err})") from err
    except RepositoryNotFoundError as err:
        raise HubAccessError(
            f"{where}: repository not found, or private and the token (HF_TOKEN or `hf auth login`) has no "
            f"access. ({err})"
        ) from err
    except RevisionNotFoundError as err:
        raise HubAccessError(f"{where}: no such revision. ({err})") from err
    except transport_errors() as err:
        raise HubAccessError(f"could not reach the Hugging Face Hub to download {where}: {err}") from err


def read_config(folder: str | Path) -> ModelConfig:
    """The `ModelConfig` stored in an export folder (relocatable form), after checking the format version."""
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; not an mmlatent export folder")
    data = read_json(path)
    if data.get("library_name") != LIBRARY_NAME or "model" not in data:
        raise ValueError(f"{path}: not an mmlatent config (library_name={data.get('library_name')!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version={version!r}, this mmlatent reads versions up to {FORMAT_VERSION}; upgrade mmlatent"
        )
    return from_dict(ModelConfig, data["model"], path="model")


def loading_config(cfg: ModelConfig, folder: Path) -> ModelConfig:
    """`cfg` with its folder-relative sources resolved against `folder` (so nothing is downloaded)."""
    out = copy.deepcopy(cfg)
    out.tokenizer.name_or_path = str(_inside(folder, cfg.tokenizer.name_or_path or TOKENIZER_SOURCE, "tokenizer"))
    if cfg.backbone != "composed":
        out.native.name_or_path = str(_inside(folder, cfg.native.name_or_path or VLM_FOLDER, "native"))
        return out
    out.lm.name_or_path = str(_inside(folder, cfg.lm.name_or_path or LM_FOLDER, "lm"))
    out.vision.pretrained = None
    return out


def _inside(folder: Path, relative: str, field: str) -> Path:
    """`folder / relative`, refusing a source outside the folder (a config must not point elsewhere)."""
    root = folder.resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{folder / CONFIG_FILE}: model.{field}.name_or_path={relative!r} points outside the folder")
    return path


def read_weights(folder: str | Path) -> dict[str, Tensor]:
    """The non-LM state dict from `model.safetensors` or its shards. Safetensors only; never a pickle."""
    folder = Path(folder)
    if (folder / WEIGHTS_INDEX_FILE).exists():
        files = sorted(set(read_json(folder / WEIGHTS_INDEX_FILE)["weight_map"].values()))
    elif (folder / WEIGHTS_FILE).exists():
        files = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(
            f"{folder}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} (only safetensors weights are read)"
        )
    state: dict[str, Tensor] = {}
    for name in files:
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise ValueError(f"{folder / WEIGHTS_INDEX_FILE}: shard {name!r} is not a safetensors file in the folder")
        state.update(load_file(str(folder / name)))
    return state


def read_pretrained(dir_or_hub_id: str | Path, revision: str | None = None, token: str | None = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The config (sources resolved inside the folder) and the non-backbone weights of a saved model.

    The caller builds the model from the config (which loads the LM or native VLM from the folder) and puts
    the weights in with `restore`; `LatentVLM.from_pretrained` does both.
    """
    folder = resolve_folder(dir_or_hub_id, revision=revision, token=token)
    check_weight_files(folder)
    return loading_config(read_config(folder), folder), read_weights(folder)


def check_weight_files(folder: Path) -> None:
    """Every safetensors file of the folder (its own, `lm/`'s or `vlm/`'s) has a whole header and all the
    bytes it announces, else a one-line error naming the file: a truncated download or copy is found
    before any weight is read (only headers are read here)."""
    for path in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a complete safetensors file ({err}); it is truncated or corrupt: "
                             f"download or export the model again") from err


def restore(model: LatentVLM, state: dict[str, Tensor], where: str | Path = "the folder") -> LatentVLM:
    """Put `read_pretrained`'s weights into `model` (built from its config): eval mode, on the CPU, exactly
    as saved, every tensor in memory of its own."""
    prefix = _backbone_prefix(model.cfg)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not match the model built from {CONFIG_FILE}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{where}: {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    # assign=True keeps the stored dtypes (a bf16 save stays bf16); requires_grad stays the module's
    model.load_state_dict(state, strict=False, assign=True)
    return own_aligned_memory(model).eval()  # out of the file's buffers: see weight_memory.py


def load_generation_config(
    dir_or_hub_id: str | Path, revision: str | None = None, token: str | None = None
) -> GenerationConfig:
    """The folder's `generation_config.json` as a `GenerationConfig` (the defaults when there is none)."""
    path = resolve_folder(dir_or_hub_id, revision=revision, token=token) / GENERATION_FILE
    return from_dict(GenerationConfig, read_json(path), path="generation") if path.exists() else GenerationConfig()
