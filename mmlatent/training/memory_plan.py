"""The memory model of a training run: per-device bytes of a recipe on N devices of M GiB, and the largest
micro-batch that fits (`mmlatent plan`).

Parameters are counted exactly, from the architecture the recipe names (`architectures.hf_config`: a local
folder, the stored table, or the Hub's `config.json`), built on the meta device; the freezing, LoRA and
latent-module settings decide which of them train. Activations are measured, not assumed: one and two
real-width decoder layers of that architecture run forward on the CPU at the run's compute dtype, and the
bytes autograd saves for the backward (deduplicated by storage) give the bytes per token per layer, with
and without activation checkpointing (`activation_probe`). The rest is arithmetic on those counts:

- weights: every parameter in its own dtype, divided by the devices under FSDP2 (decoder layers and the
  root unit alike), plus FSDP2's gathered copies in `param_dtype`: the root unit for the whole step and two
  decoder layers (the one running and the one prefetched), or every layer with `reshard_after_forward: false`;
  without FSDP2 and with bf16-mixed autocast, autocast's bf16 copy of each fp32 weight;
- gradients and AdamW's two moments: trainable parameters in their dtype, sharded like the weights;
- an online teacher: a whole unsharded copy in its checkpoint's dtype on every device, and the hidden states
  of all its layers at every token while it runs;
- activations: tokens × layers × the probed bytes (checkpointing: the layer inputs, plus one layer's full
  activations while it is recomputed), the KV cache of the latent loop, the logits (bf16 logits kept,
  fp32 log-probabilities saved, and in the backward their fp32 gradient and its bf16 cast: 14 bytes per token
  and vocabulary entry), with LoRA's trainable special rows the merged copy of the embedding matrix peft
  builds for the head, stage 2's second LM forward and its states of every layer;
- the runtime: on a CPU the resident memory of this process before any model exists (torch, transformers,
  Lightning loaded); on a GPU `GPU_RUNTIME_GIB` for the CUDA context and the allocator's slack;
- on a CPU, where the run's host memory is the device's, the start of a stage: the model while its weights
  are copied out of the mapped files, or out of the checkpoint it is initialised from (`init_from`), one
  chunk at a time whose file pages are released after it (`weight_memory.py`).

The trade-off: no allocator is simulated, so fragmentation and transient buffers of single kernels are
outside the model; the README compares its predictions with measured peaks.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
import yaml
from torch import nn

from mmlatent.config_io import from_dict, to_dict
from mmlatent.model.config import ModelConfig
from mmlatent.model.pretrained_source import DTYPES
from mmlatent.training.acceleration import AccelerationConfig
from mmlatent.training.checkpoint_reader import INIT_CHUNK_BYTES
from mmlatent.training.stages import StageConfig

GiB = 1024**3
GPU_RUNTIME_GIB = 1.5
"""CUDA context, cuBLAS/cuDNN workspaces and allocator slack per GPU: an allowance, not a measurement."""
LOGIT_BYTES = 2 + 4 + 4 + 4
"""Bytes per (token, vocabulary entry) at the loss's peak: bf16 logits kept for the metrics, fp32
log-probabilities saved by the cross-entropy, their fp32 gradient, and its bf16 cast."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Counts:
    """Parameter counts of a `LatentVLM`, by where FSDP2 puts them and whether they train."""

    layer: int
    """Parameters of one decoder layer (an FSDP2 unit)."""
    layer_trainable: int
    """Trainable parameters of one decoder layer (LoRA adapters only, with LoRA)."""
    layers: int
    """Decoder layers."""
    root: int
    """Every other parameter (embeddings, head, norms, vision tower, projector, latent modules)."""
    root_trainable: int
    """Trainable parameters outside the decoder layers."""
    total_bytes: int
    """Bytes of every parameter in its own dtype (the backbone its `dtype`; mmlatent's heads and LoRA fp32)."""
    trainable_bytes: int
    """Bytes of the trainable parameters (their gradients and each AdamW moment take as many)."""
    wide: int
    """Parameters stored in float32 (all of them with fp32 master weights; else mmlatent's heads and adapters)."""
    hidden: int
    """LM width D."""
    kv_dim: int
    """Key (or value) width per token: KV heads × head dim."""
    vocab: int
    """Rows of the output head."""
    tokens_per_image: int
    """LM tokens per image."""

    @property
    def total(self) -> int:
        return self.layers * self.layer + self.root

    @property
    def trainable(self) -> int:
        return self.layers * self.layer_trainable + self.root_trainable


@dataclass
class Settings:
    """What a recipe fixes that memory depends on."""

    vlm: ModelConfig
    stage: StageConfig
    acceleration: AccelerationConfig = field(default_factory=AccelerationConfig)
    precision: str = "32-true"
    """The Trainer's precision."""
    strategy: Literal["fsdp2", "ddp", "single"] = "single"
    param_dtype: str | None = "bfloat16"
    """FSDP2's gather/compute dtype (None: the parameters' own)."""
    reshard_after_forward: bool = True
    devices: int = 1
    """Devices per node × nodes."""
    batch_size: int = 1
    """Samples per device and step."""
    max_length: int = 1024
    """Longest sequence (the processor's `max_length`)."""
    init_from: str | None = None

    @property
    def checkpointing(self) -> bool:
        return self.acceleration.gradient_checkpointing

    @property
    def master_dtype(self) -> str:
        return self.vlm.lm.dtype if self.vlm.backbone == "composed" else self.vlm.native.dtype

    @property
    def compute_dtype(self) -> str:
        if self.strategy == "fsdp2" and self.param_dtype:
            return self.param_dtype
        return "bfloat16" if self.precision.startswith("bf16") else "float16" if self.precision.startswith("16") else self.master_dtype

    @property
    def aligns(self) -> bool:
        align = self.stage.align_weight
        default = {"stage2": 1.0, "stage3": 2.0}.get(self.stage.name, 0.0)
        return (default if align is None else align) > 0

    @property
    def online_teacher(self) -> bool:
        return self.aligns and self.stage.teacher.checkpoint is not None


def _set(tree: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for part in path:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ValueError(f"--{dotted}: {part} is not a group of options")
    tree[last] = value


def read_recipe(configs: list[str], overrides: list[str] = ()) -> dict:
    """The merged config tree of YAML files and `--key=value` overrides, the model preset expanded, as the CLI
    builds it (later files and overrides win)."""
    from mmlatent.model.presets import preset

    def merge(a: dict, b: dict) -> dict:
        for k, v in b.items():
            a[k] = merge(a.get(k, {}) if isinstance(a.get(k), dict) else {}, v) if isinstance(v, dict) else v
        return a

    tree: dict = {}
    for path in configs:
        merge(tree, yaml.safe_load(Path(path).read_text()) or {})
    for item in overrides:
        key, _, value = item.removeprefix("--").partition("=")
        _set(tree, key, yaml.safe_load(value))
    name = tree.get("model", {}).get("vlm", {}).get("preset")
    if name:
        tree["model"]["vlm"] = merge(to_dict(preset(name)), tree["model"]["vlm"])
    return tree


def settings_of(tree: dict) -> Settings:
    """`Settings` from a merged recipe tree."""
    model, trainer, data = tree.get("model", {}), tree.get("trainer", {}), tree.get("data", {})
    strategy = trainer.get("strategy", "auto")
    init = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
    name = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy)
    kind = "fsdp2" if ("FSDP2Strategy" in name or name == "fsdp2") else "ddp" if "ddp" in name.lower() else "single"
    devices = int(trainer.get("devices", 1) if str(trainer.get("devices", 1)).isdigit() else 1)
    return Settings(
        vlm=from_dict(ModelConfig, model.get("vlm", {}), "model.vlm"),
        stage=from_dict(StageConfig, model.get("stage", {}), "model.stage"),
        acceleration=from_dict(AccelerationConfig, model.get("acceleration", {}), "model.acceleration"),
        precision=str(trainer.get("precision", "32-true")),
        strategy=kind if devices * int(trainer.get("num_nodes", 1)) > 1 or kind == "fsdp2" else "single",
        param_dtype=init.get("param_dtype", "bfloat16"),
        reshard_after_forward=init.get("reshard_after_forward", True),
        devices=devices * int(trainer.get("num_nodes", 1)),
        batch_size=int(data.get("batch_size", 1)),
        max_length=int(data.get("processor", {}).get("max_length", 1024)),
        init_from=model.get("init_from"),
    )


# ----------------------------------------------------------------------------------------- counting


def _tokenizer_length(vlm: ModelConfig) -> int:
    from mmlatent.model.architectures import ARCHITECTURES
    from mmlatent.model.tokenizer import load_tokenizer
    from mmlatent.tokens import SPECIAL

    name = vlm.tokenizer.name_or_path
    if name in ARCHITECTURES and not Path(name).is_dir():
        return ARCHITECTURES[name].tokenizer_length + len(SPECIAL.all())
    return len(load_tokenizer(vlm.tokenizer))


def _meta_model(vlm: ModelConfig) -> tuple[nn.Module, nn.Module | None, int]:
    """(the transformers model holding the LM, a composed backbone's vision tower or None, tokens per image),
    the transformers model on the meta device."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from mmlatent.model.architectures import hf_config

    if vlm.backbone == "composed":
        if vlm.lm.name_or_path is None:
            raise ValueError("mmlatent plan sizes released architectures: model.vlm.lm.name_or_path is null (a random LM)")
        cfg = hf_config(vlm.lm.name_or_path, vlm.lm.revision)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[vlm.lm.dtype])
            lm.resize_token_embeddings(_tokenizer_length(vlm), mean_resizing=False)
        from dataclasses import replace

        from mmlatent.model.projector import Projector
        from mmlatent.model.vision_tower import VisionTower

        tower = VisionTower(replace(vlm.vision, pretrained=None))  # random init on the CPU: only shapes are read
        with torch.device("meta"):
            projector = Projector(vlm.projector, tower.hidden_size, cfg.get_text_config().hidden_size, tower.grid_size)
        return lm, nn.ModuleList([tower, projector]), projector.num_tokens
    if vlm.native.name_or_path is None:
        raise ValueError("mmlatent plan sizes released architectures: model.vlm.native.name_or_path is null")
    cfg = hf_config(vlm.native.name_or_path, vlm.native.revision)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=DTYPES[vlm.native.dtype])
    if vlm.backbone == "qwen2_5_vl":
        v = cfg.vision_config
        side = vlm.native.image_size or 448
        tokens = (side // (v.patch_size * v.spatial_merge_size)) ** 2
    else:
        v = cfg.vision_config
        tokens = (v.image_size // v.patch_size) ** 2
    return model, None, tokens


def _frozen_parts(vlm: ModelConfig, model: nn.Module) -> list[nn.Module]:
    """The modules of a native VLM its config freezes (the backbone's own choice of vision/projector modules)."""
    from mmlatent.model.native_families import native_backbone_class

    family = native_backbone_class(vlm.backbone)
    view = SimpleNamespace(vlm=model)  # the family's module lookups read only `self.vlm`
    parts = []
    if vlm.native.freeze_vision:
        parts += family.vision_modules(view)
    if vlm.native.freeze_projector:
        parts += family.projector_modules(view)
    return parts


def count_parameters(vlm: ModelConfig) -> Counts:
    """Exact parameter counts of the model a `ModelConfig` builds (released architecture, meta device)."""
    from mmlatent.tokens import SPECIAL

    model, extra, tokens = _meta_model(vlm)
    decoder = model.get_decoder()
    layers = list(decoder.layers)
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_dim = getattr(text, "num_key_value_heads", heads) * head_dim
    D = text.hidden_size
    frozen: set[int] = set()
    if vlm.backbone == "composed":
        if vlm.vision.freeze:
            frozen |= {id(p) for p in extra[0].parameters()}
        if vlm.lm.freeze or vlm.lora.enabled:
            frozen |= {id(p) for p in model.parameters()}
    else:
        frozen |= {id(p) for m in _frozen_parts(vlm, model) for p in m.parameters()}
        lm_modules = [decoder, model.get_input_embeddings(), model.get_output_embeddings()]
        if vlm.native.freeze_lm or vlm.lora.enabled:
            frozen |= {id(p) for m in lm_modules if m is not None for p in m.parameters()}
    params = {id(p): p for p in [*model.parameters(), *(extra.parameters() if extra is not None else [])]}
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    lora = 0
    if vlm.lora.enabled:
        lora = sum(vlm.lora.rank * (m.in_features + m.out_features) for name, m in layers[0].named_modules()
                   if isinstance(m, nn.Linear) and name.split(".")[-1] in vlm.lora.target_modules)
    with torch.device("meta"):  # the latent modules mmlatent adds, as `LatentVLM` builds them
        heads_model = _latent_modules(vlm, D)
    latent = sum(p.numel() for p in heads_model.parameters())
    specials = len(SPECIAL.all()) * D if vlm.lora.enabled and vlm.lora.train_special_tokens else 0
    root = sum(p.numel() for i, p in params.items() if i not in in_layers) + latent
    root_trainable = sum(p.numel() for i, p in params.items() if i not in in_layers and i not in frozen) + latent + specials
    layer = sum(p.numel() for p in layers[0].parameters()) + lora
    layer_trainable = lora if vlm.lora.enabled or id(next(layers[0].parameters())) in frozen else layer
    ours = 4 * (latent + lora * len(layers) + specials)  # mmlatent's heads, peft's adapters and token rows: fp32
    trained = [p for i, p in params.items() if i not in frozen]
    fp32 = latent + lora * len(layers) + specials + sum(p.numel() for p in params.values() if p.dtype == torch.float32)
    return Counts(
        layer=layer, layer_trainable=layer_trainable, layers=len(layers), root=root, root_trainable=root_trainable,
        total_bytes=sum(p.numel() * p.element_size() for p in params.values()) + ours,
        trainable_bytes=sum(p.numel() * p.element_size() for p in trained) + ours,
        wide=fp32,
        hidden=D, kv_dim=kv_dim, vocab=model.get_output_embeddings().weight.shape[0], tokens_per_image=tokens,
    )


def _latent_modules(vlm: ModelConfig, hidden: int) -> nn.Module:
    from mmlatent.model.diffusion_head import DiffusionHead
    from mmlatent.model.lq_former import LQFormer
    from mmlatent.model.sketch_head import SketchHead

    lat = vlm.latent
    mods = nn.ModuleList()
    if lat.mode == "sketch":
        mods.append(SketchHead(lat.sketch_head, hidden))
    else:
        mods.append(LQFormer(lat.lq_former, hidden))
    if lat.diffusion_head:
        mods.append(DiffusionHead(lat.diffusion, target_dim=hidden, cond_dim=hidden))
    return mods


# -------------------------------------------------------------------------------------- activations


@dataclass
class ActivationBytes:
    """Bytes autograd keeps for the backward, per token, measured on the architecture's own decoder layer."""

    per_layer: float
    """Per decoder layer and token, without activation checkpointing."""
    per_layer_checkpointed: float
    """Per decoder layer and token with it (what the checkpoint keeps: the layer's input)."""
    outside: float
    """Per token outside the layers (final norm)."""


def _small_lm(vlm: ModelConfig, layers: int, dtype: torch.dtype) -> nn.Module:
    """The decoder (`get_decoder()`) of the recipe's architecture with `layers` layers, a 64-row vocabulary and one
    vision block, random, on the CPU."""
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from mmlatent.model.architectures import hf_config

    source = vlm.lm if vlm.backbone == "composed" else vlm.native
    cfg = copy.deepcopy(hf_config(source.name_or_path, source.revision))
    text = cfg.get_text_config()
    text.num_hidden_layers, text.vocab_size = layers, 64
    if hasattr(text, "max_window_layers"):
        text.max_window_layers = layers
    if getattr(text, "layer_types", None):  # one entry per layer (the stored config may be cut to fewer)
        text.layer_types = [text.layer_types[0]] * layers
    if (getattr(text, "pad_token_id", None) or 0) >= 64:  # LLaVA's padding row lies beyond the small vocabulary
        text.pad_token_id = None
    vision = getattr(cfg, "vision_config", None)
    if vision is not None:
        for key in ("depth", "num_hidden_layers"):
            if hasattr(vision, key):
                setattr(vision, key, 1)
        if hasattr(vision, "fullatt_block_indexes"):
            vision.fullatt_block_indexes = [0]
    auto = AutoModelForCausalLM if vlm.backbone == "composed" else AutoModelForImageTextToText
    cfg._attn_implementation = source.attn_implementation
    return auto.from_config(cfg, dtype=dtype).get_decoder()


def _saved_bytes(decoder: nn.Module, tokens: int, dtype: torch.dtype, checkpointing: bool) -> int:
    """Bytes of the tensors autograd saves over one forward of `tokens` positions (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in decoder.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    if checkpointing:
        decoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    decoder.train()
    x = torch.randn(1, tokens, decoder.config.hidden_size, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = decoder(inputs_embeds=x, position_ids=torch.arange(tokens)[None], use_cache=False).last_hidden_state
    del out
    return sum(seen.values())


def activation_probe(vlm: ModelConfig, dtype: str, tokens: int = 128) -> ActivationBytes:
    """Measure `ActivationBytes` on one- and two-layer decoders of the recipe's architecture."""
    torch_dtype = DTYPES[dtype]
    with torch.no_grad():
        small = [_small_lm(vlm, n, torch_dtype) for n in (1, 2)]
    plain = [_saved_bytes(m, tokens, torch_dtype, checkpointing=False) for m in small]
    ckpt = [_saved_bytes(m, tokens, torch_dtype, checkpointing=True) for m in small]
    per_layer = (plain[1] - plain[0]) / tokens
    return ActivationBytes(per_layer=per_layer, per_layer_checkpointed=(ckpt[1] - ckpt[0]) / tokens,
                           outside=max(0.0, plain[0] / tokens - per_layer))


# --------------------------------------------------------------------------------------------- plan


@dataclass
class Device:
    """The devices a run trains on."""

    memory_gib: float
    """Memory of one device."""
    count: int = 1
    """Devices, over every node."""
    kind: Literal["gpu", "cpu"] = "gpu"
    """`cpu`: the host is the device (the rehearsal); its runtime is this process's resident memory."""


@dataclass
class Plan:
    """Predicted bytes per device, by part, for one micro-batch size."""

    batch_size: int
    tokens: int
    """Tokens per micro-batch (batch × sequence length)."""
    weights: float
    gathered: float
    """FSDP2's gathered copies (or autocast's bf16 weight copies without FSDP2)."""
    gradients: float
    optimizer: float
    teacher: float
    activations: float
    logits: float
    runtime: float
    start: float
    """At the start of a stage on a CPU: the model plus the chunk of its file or checkpoint being copied."""

    @property
    def training(self) -> float:
        return (self.weights + self.gathered + self.gradients + self.optimizer + self.teacher + self.activations
                + self.logits + self.runtime)

    @property
    def total(self) -> float:
        return max(self.training, self.start)

    def row(self) -> dict:
        out = {k: v if k in ("batch_size", "tokens") else round(v / GiB, 2) for k, v in asdict(self).items()}
        out["total"] = round(self.total / GiB, 2)
        return out


def runtime_bytes(device: Device) -> float:
    """The runtime's share: `GPU_RUNTIME_GIB` on a GPU; on a CPU this process's peak resident memory so far
    (VmHWM, which unlike `ru_maxrss` does not include a forking parent's)."""
    if device.kind == "gpu":
        return GPU_RUNTIME_GIB * GiB
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # kB on Linux


def plan_memory(s: Settings, counts: Counts, act: ActivationBytes, device: Device, seq_len: int | None = None,
                batch_size: int | None = None, images_per_sample: int = 4, runtime: float | None = None) -> Plan:
    """Per-device bytes of `s` (optionally at another sequence length or micro-batch) on `device`."""
    B = batch_size or s.batch_size
    L = seq_len or s.max_length
    tokens = B * L
    shards = device.count if s.strategy == "fsdp2" else 1
    compute = DTYPE_BYTES[s.compute_dtype]
    weights = counts.total_bytes / shards
    if s.strategy == "fsdp2":
        units = counts.layers if not s.reshard_after_forward else min(2, counts.layers)
        gathered = float((counts.root + units * counts.layer) * DTYPE_BYTES[s.param_dtype or s.master_dtype])
    elif s.precision.startswith(("bf16-mixed", "16-mixed")):
        gathered = float(counts.wide * compute)  # autocast's cached bf16 casts of the fp32 weights
    else:
        gathered = 0.0
    trainable = float(counts.trainable_bytes)
    gradients = trainable / shards + (trainable if s.strategy == "ddp" else 0.0)  # DDP's reduction buckets
    optimizer = 2 * trainable / shards
    D, layers = counts.hidden, counts.layers
    states = (layers + 1) * tokens * D * compute  # hidden states of every layer at every token
    teacher = counts.total_bytes + states if s.online_teacher else 0.0
    per_layer = act.per_layer_checkpointed if s.checkpointing else act.per_layer
    activations = tokens * (layers * per_layer + act.outside)
    if s.checkpointing:
        activations += tokens * act.per_layer  # one layer recomputed in the backward
    latent = s.stage.name in ("stage2", "stage3")
    if latent:
        activations += tokens * layers * 2 * counts.kv_dim * compute  # the latent loop's KV cache
    if s.stage.name == "stage2" and s.aligns:
        activations += states + tokens * layers * per_layer  # the latent-only alignment's second forward
    logits = float(tokens * counts.vocab * LOGIT_BYTES)
    if s.vlm.lora.enabled and s.vlm.lora.train_special_tokens:  # peft's trainable rows: a merged copy of the matrix
        logits += counts.vocab * D * compute  # that the head's backward keeps
    rt = runtime if runtime is not None else runtime_bytes(device)
    start = 0.0
    if device.kind == "cpu":
        start = rt + counts.total_bytes + min(INIT_CHUNK_BYTES, counts.total_bytes) + (teacher if s.online_teacher else 0.0)
    return Plan(batch_size=B, tokens=tokens, weights=weights, gathered=gathered, gradients=gradients, optimizer=optimizer,
                teacher=teacher, activations=activations, logits=logits, runtime=rt, start=start)


def largest_micro_batch(s: Settings, counts: Counts, act: ActivationBytes, device: Device, seq_len: int | None = None,
                        limit: int = 256) -> int:
    """The largest micro-batch whose plan fits `device.memory_gib` (0: not even one sample)."""
    runtime = runtime_bytes(device)
    best = 0
    for b in range(1, limit + 1):
        if plan_memory(s, counts, act, device, seq_len, b, runtime=runtime).total > device.memory_gib * GiB:
            break
        best = b
    return best
