"""The model card (`README.md`) of an exported model: YAML metadata the Hub indexes, and a readable body.

The metadata is built with `huggingface_hub.ModelCardData` (library name `mmlatent`, base models, datasets,
tags, licence, pipeline tag) and, when evaluation results are given, `EvalResult`s that it writes in the
Hub's `model-index` form; the card is a `huggingface_hub.ModelCard`, so what we write is what the Hub's own
parser reads back. Base models are read from the model config where they are Hub ids (the LM, the
tokenizer, a timm or open_clip tower with Hub weights); local paths and random initialisations name none.

Evaluation results come from the `results.json` that `mmlatent eval` writes. The reader accepts one result
object, a list of them, or `{"results": [...]}`; each names its benchmark (`task`, e.g. `mmmu` or
`scienceqa`), optionally its `split` and its Hub `dataset` id, and an overall accuracy under `accuracy`,
`overall` or `average` (a number, or an object holding `accuracy`). Trade-off: only the overall accuracy
per benchmark goes into `model-index` (the Hub shows one number per dataset and metric); the per-subject
breakdowns stay in the evaluation's own files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from mmlatent.model.config import ModelConfig

PIPELINE_TAG = "image-text-to-text"
BASE_TAGS = ("mmlatent", "vision-language", "latent-reasoning", "image-text-to-text")
KNOWN_BENCHMARKS = {
    "mmmu": ("MMMU/MMMU", "MMMU"),
    "scienceqa": ("derek-thomas/ScienceQA", "ScienceQA"),
}
"""Benchmark name -> (Hub dataset id, display name), for results that do not name their dataset."""
METRIC_KEYS = ("accuracy", "overall", "average", "acc")


@dataclass
class CardInfo:
    """What the model card says beyond what the model config and the checkpoint tell."""

    model_name: str | None = None
    """Title of the card and name in `model-index`. None: the output folder's (or repo's) name."""
    license: str = "apache-2.0"
    """Licence identifier on the Hub (`apache-2.0`, `mit`, `other`, ...). Check the base models' licences."""
    base_models: list[str] = field(default_factory=list)
    """Hub ids of base models, added to those read from the model config."""
    datasets: list[str] = field(default_factory=list)
    """Hub ids of the training datasets."""
    tags: list[str] = field(default_factory=list)
    """Extra tags, added to mmlatent's own (`mmlatent`, `latent-reasoning`, the latent mode, the stage)."""
    language: list[str] = field(default_factory=lambda: ["en"])
    """Languages of the training text."""


@dataclass
class BenchmarkResult:
    """One benchmark's overall score, as it goes into `model-index`."""

    task: str
    """Benchmark name as `mmlatent eval` writes it (`mmmu`, `scienceqa`)."""
    dataset_id: str
    """Hub dataset id (`MMMU/MMMU`)."""
    dataset_name: str
    """Display name (`MMMU`)."""
    split: str | None
    """Evaluated split."""
    accuracy: float
    """Overall accuracy, as the results file states it."""
    unparsed: int | None = None
    """Responses no answer could be parsed from, when the results file counts them."""
    protocol: str | None = None
    """The scoring protocol that produced the accuracy (`llava`, `mmmu`, ...), when the results file names it."""


def is_hub_id(name: str | None) -> bool:
    """True for an `org/name` Hub id that is not also a path on this machine."""
    if not name or "/" not in name or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def base_models(cfg: ModelConfig) -> list[str]:
    """Hub ids the model starts from: the LM, the tokenizer, and the vision tower's pretrained weights."""
    found = [cfg.lm.name_or_path, cfg.tokenizer.name_or_path, _vision_hub_id(cfg)]
    return list(dict.fromkeys(name for name in found if is_hub_id(name)))


def _vision_hub_id(cfg: ModelConfig) -> str | None:
    vision = cfg.vision
    if vision.name.startswith("hf-hub:"):
        return vision.name.removeprefix("hf-hub:")
    if vision.pretrained is None or Path(vision.pretrained).expanduser().exists():
        return None  # random init or a local weights file: no Hub model to name
    if vision.library == "timm" and vision.pretrained == "hub":
        import timm

        pretrained_cfg = timm.models.get_pretrained_cfg(vision.name)
        return getattr(pretrained_cfg, "hf_hub_id", None)
    if vision.library == "open_clip":
        import open_clip

        hub = open_clip.get_pretrained_cfg(vision.name, vision.pretrained).get("hf_hub", "")
        return hub.strip("/") or None
    return None


def read_results(path: str | Path) -> list[BenchmarkResult]:
    """Benchmark results from a `results.json` (see the module docstring for the accepted shapes)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"results file {path}: {err}") from err
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        data = data["results"]
    items = data if isinstance(data, list) else [data]
    return [_result(item, f"{path}[{i}]" if isinstance(data, list) else str(path)) for i, item in enumerate(items)]


def _result(item: Any, where: str) -> BenchmarkResult:
    if not isinstance(item, dict):
        raise ValueError(f"results file {where}: expected an object, got {type(item).__name__}")
    task = item.get("task") or item.get("benchmark")
    if not isinstance(task, str):
        raise ValueError(f"results file {where}: no `task` naming the benchmark (e.g. \"mmmu\", \"scienceqa\")")
    known = KNOWN_BENCHMARKS.get(task.lower())
    dataset_id = item.get("dataset") if is_hub_id(item.get("dataset")) else (known[0] if known else None)
    if dataset_id is None:
        raise ValueError(
            f"results file {where}: task {task!r} is not one of {sorted(KNOWN_BENCHMARKS)}; add a `dataset` Hub id"
        )
    accuracy = _metric(item)
    if accuracy is None:
        raise ValueError(f"results file {where}: no overall accuracy under any of {list(METRIC_KEYS)}")
    unparsed = item.get("unparsed")
    return BenchmarkResult(
        task=task,
        dataset_id=dataset_id,
        dataset_name=known[1] if known else task,
        split=item.get("split"),
        accuracy=float(accuracy),
        unparsed=int(unparsed) if isinstance(unparsed, (int, float)) else None,
        protocol=item.get("protocol") if isinstance(item.get("protocol"), str) else None,
    )


def _metric(item: dict) -> float | None:
    for key in METRIC_KEYS:
        value = item.get(key)
        if isinstance(value, dict):
            value = next((value[k] for k in METRIC_KEYS if isinstance(value.get(k), (int, float))), None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def card_data(
    cfg: ModelConfig,
    info: CardInfo,
    stage: str | None = None,
    results: list[BenchmarkResult] = (),
) -> ModelCardData:
    """The card's YAML metadata."""
    bases = list(dict.fromkeys([*base_models(cfg), *info.base_models]))
    tags = list(dict.fromkeys([*BASE_TAGS, f"latent-{cfg.latent.mode}", *([stage] if stage else []), *info.tags]))
    model_name = info.model_name or "mmlatent-model"
    evals = [
        EvalResult(
            task_type="visual-question-answering",
            task_name="Visual Question Answering",
            dataset_type=r.dataset_id,
            dataset_name=r.dataset_name,
            dataset_split=r.split,
            metric_type="accuracy",
            metric_name="Accuracy" if r.protocol is None else f"Accuracy ({r.protocol} protocol)",
            metric_value=r.accuracy,
        )
        for r in results
    ]
    return ModelCardData(
        model_name=model_name,
        library_name="mmlatent",
        pipeline_tag=PIPELINE_TAG,
        license=info.license,
        language=info.language or None,
        base_model=bases or None,
        datasets=info.datasets or None,
        tags=tags,
        eval_results=evals or None,
    )


def _describe(cfg: ModelConfig) -> list[tuple[str, str]]:
    v, lm, tok, lat = cfg.vision, cfg.lm, cfg.tokenizer, cfg.latent
    vision = f"{v.library} `{v.name}`" + (f", weights `{v.pretrained}`" if v.pretrained else ", random init")
    vision += f", {v.image_size or 'native'} px, {'frozen' if v.freeze else 'trained'}"
    r = lm.random_init
    language = (
        f"`{lm.name_or_path}`" if lm.name_or_path
        else f"random-init {r.model_type} ({r.num_hidden_layers} layers, width {r.hidden_size})"
    )
    tokenizer = f"`{tok.name_or_path}`" if tok.name_or_path else f"synthetic byte-level BPE ({tok.synthetic_vocab_size})"
    heads = [n for n, on in (("diffusion head", lat.diffusion_head), ("contrastive", lat.contrastive)) if on]
    latent = f"{lat.mode} mode, {lat.slots} slots per block, {lat.schedule} schedule"
    latent += f" ({lat.sketch_head} sketch head)" if lat.mode == "sketch" else " (LQ-Former)"
    latent += f"; grounding heads: {', '.join(heads)}" if heads else ""
    projector = f"{cfg.projector.kind}, pixel shuffle {cfg.projector.pixel_shuffle}"
    return [("Vision tower", vision), ("Projector", projector), ("Language model", language),
            ("Tokenizer", tokenizer), ("Latent reasoning", latent), ("LM dtype", lm.dtype)]


def card_body(
    cfg: ModelConfig,
    info: CardInfo,
    repo_or_dir: str | None = None,
    stage: dict | None = None,
    optim: dict | None = None,
    results: list[BenchmarkResult] = (),
    num_parameters: int | None = None,
    files: list[str] | None = None,
) -> str:
    """The card's Markdown body."""
    name = info.model_name or "mmlatent-model"
    source = repo_or_dir or f"path/to/{name}"
    lines = [
        f"# {name}",
        "",
        "A vision-language model trained with mmlatent to reason in text and in latent "
        "blocks: at a latent slot the language model's input is a continuous vector made from its own last "
        "hidden state instead of a token embedding.",
        "",
        "## Model",
        "",
        "| Part | Setting |",
        "| --- | --- |",
        *[f"| {part} | {value} |" for part, value in _describe(cfg)],
    ]
    if num_parameters is not None:
        lines.append(f"| Parameters | {num_parameters:,} |")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from mmlatent.model.latent_vlm import LatentVLM",
        "",
        f'model = LatentVLM.from_pretrained("{source}")  # a local folder or a Hub id; safetensors only',
        "",
        "# or through transformers (the same loader; needs `pip install mmlatent`)",
        "from transformers import AutoModel",
        f'model = AutoModel.from_pretrained("{source}", trust_remote_code=True)',
        "```",
        "",
        "`mmlatent.model.generation.generate_from_prompts(model, prompts, pixel_values, cfg)` decodes, text and "
        "latent blocks interleaved; `generation_config.json` holds the decoding settings used in training.",
    ]
    if stage is not None or optim is not None:
        lines += ["", "## Training", ""]
        if stage is not None:
            lines.append(f"Last stage: `{stage.get('name', '?')}`. Settings of the checkpoint this export comes from "
                         "are in `training/hparams.json`; stage configs passed to the export are in `training/`.")
            lines += ["", "```json", json.dumps({"stage": stage, "optim": optim}, indent=2, sort_keys=True), "```"]
    if results:
        lines += ["", "## Evaluation", "", "| Benchmark | Split | Protocol | Accuracy | Unparsed |", "| --- | --- | --- | --- | --- |"]
        for r in results:
            unparsed = "" if r.unparsed is None else str(r.unparsed)
            lines.append(f"| {r.dataset_name} (`{r.dataset_id}`) | {r.split or ''} | {r.protocol or ''} | {r.accuracy:g} | {unparsed} |")
    if files:
        lines += ["", "## Files", "", *[f"- `{f}`" for f in files]]
    return "\n".join(lines) + "\n"


def build_model_card(
    cfg: ModelConfig,
    info: CardInfo,
    repo_or_dir: str | None = None,
    stage: dict | None = None,
    optim: dict | None = None,
    results: list[BenchmarkResult] = (),
    num_parameters: int | None = None,
    files: list[str] | None = None,
) -> ModelCard:
    """The whole card: YAML metadata and Markdown body, as a `huggingface_hub.ModelCard` (`.save(path)`).

    Args:
        cfg: The model config as trained (with its original sources, so base models can be named).
        info: Name, licence, datasets, extra tags and base models.
        repo_or_dir: What the usage snippet loads (the Hub repo, when known).
        stage: The checkpoint's stage settings (`StageConfig` as a dict).
        optim: The checkpoint's optimiser settings.
        results: Benchmark scores for `model-index`.
        num_parameters: Parameter count to show.
        files: The folder's files to list.
    """
    data = card_data(cfg, info, stage=(stage or {}).get("name"), results=list(results))
    body = card_body(cfg, info, repo_or_dir, stage, optim, list(results), num_parameters, files)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
