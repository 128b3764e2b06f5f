"""`mmlatent export CKPT OUT_DIR`: a Lightning checkpoint to a Hub-ready folder, optionally pushed.

The checkpoint (a `.ckpt` file or a sharded FSDP2 checkpoint folder) is read with
`training.module.load_module` (`torch.load(weights_only=True)`: no pickle of arbitrary objects;
hyper-parameters are plain dicts). The folder gets the model files of
`mmlatent.model.serialization` (config, safetensors weights, LM folder, tokenizer, image transform), the
module's decoding settings as `generation_config.json`, the training settings under `training/` (the
checkpoint's `hparams.json` and copies of the stage YAML configs given with `--stage-configs`, so all three
stages' recipes travel with the model), and `README.md`, the model card with evaluation results in
`model-index` form when `--results` files are given.

Inputs that can be wrong (results files, YAML configs, an occupied output folder, a missing Hub token when
pushing) are checked before the checkpoint is loaded, so a mistake costs seconds, not a model load.
Everything is written into a temporary folder and renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, set_parsing_settings

from mmlatent.hub.model_card import BenchmarkResult, CardInfo, build_model_card, read_results
from mmlatent.atomic import atomic_folder, write_json
from mmlatent.hub.publish import push_folder, resolve_token
from mmlatent.model.serialization import DEFAULT_MAX_SHARD_SIZE, HubAccessError, write_model_files

TRAINING_FOLDER = "training"
HPARAMS_FILE = "hparams.json"
CARD_FILE = "README.md"


def read_stage_configs(paths: list[str | Path]) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each stage YAML config, after checking it parses and names are distinct."""
    out: list[tuple[str, bytes]] = []
    for path in map(Path, paths):
        try:
            raw = path.read_bytes()
            yaml.safe_load(raw)
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"stage config {path}: {err}") from err
        if path.name in {name for name, _ in out} or path.name == HPARAMS_FILE:
            raise ValueError(f"stage config {path}: another file is already stored as training/{path.name}; rename one")
        out.append((path.name, raw))
    return out


def export_checkpoint(
    ckpt: str | Path,
    out_dir: str | Path,
    card: CardInfo | None = None,
    results: list[str | Path] = (),
    stage_configs: list[str | Path] = (),
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> Path:
    """Write the Hub-ready folder of a checkpoint, and push it when `push_to_hub` names a repo.

    Args:
        ckpt: A Lightning checkpoint of `LatentVLMModule` (`.ckpt`).
        out_dir: The folder to write (absent or empty, unless `overwrite`).
        card: Model-card name, licence, datasets, tags and extra base models.
        results: `results.json` files of `mmlatent eval`, for the card's evaluation section and `model-index`.
        stage_configs: The stage YAML configs to store under `training/` (e.g. stage1/2/3.yaml).
        max_shard_size: Shard the safetensors files past this size.
        overwrite: Replace an existing non-empty `out_dir`.
        push_to_hub: Hub repo (`org/name`) to upload the folder to.
        private: Create the repo private (when it does not exist yet).
        revision: Branch to push to (created if missing).
        token: Hub token (default: HF_TOKEN or the login cache).
    """
    from mmlatent.training.module import load_module  # Lightning only when exporting

    out = Path(out_dir)
    if "://" not in str(ckpt) and not Path(ckpt).exists():
        raise FileNotFoundError(f"checkpoint {ckpt}: no such file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    benchmarks: list[BenchmarkResult] = [r for path in results for r in read_results(path)]
    stages = read_stage_configs(list(stage_configs))
    if push_to_hub is not None:
        token = resolve_token(token)
    info = card or CardInfo()
    if info.model_name is None:
        info = dataclasses.replace(info, model_name=push_to_hub.split("/")[-1] if push_to_hub else out.resolve().name)

    module = load_module(ckpt)  # a .ckpt file or a sharded checkpoint folder
    model = module.model.eval()
    hparams = json.loads(json.dumps(dict(module.hparams)))  # plain JSON types (tuples become lists)
    with atomic_folder(out, if_exists="replace" if overwrite else "error") as tmp:
        files = write_model_files(model, tmp, max_shard_size=max_shard_size, generation=module.gen_cfg)
        (tmp / TRAINING_FOLDER).mkdir()
        write_json(tmp / TRAINING_FOLDER / HPARAMS_FILE, {"checkpoint": Path(ckpt).name, **hparams})
        for name, raw in stages:
            (tmp / TRAINING_FOLDER / name).write_bytes(raw)
        files = sorted([*files, f"{TRAINING_FOLDER}/{HPARAMS_FILE}", *(f"{TRAINING_FOLDER}/{n}" for n, _ in stages)])
        build_model_card(
            module.vlm_cfg,
            info,
            repo_or_dir=push_to_hub,
            stage=hparams.get("stage"),
            optim=hparams.get("optim"),
            results=benchmarks,
            num_parameters=model.num_parameters(),
            files=[CARD_FILE, *files],
        ).save(tmp / CARD_FILE)
    if push_to_hub is not None:
        push_folder(out, push_to_hub, private=private, revision=revision, token=token)
    return out


def parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # CardInfo's field docstrings -> --help
    p = ArgumentParser(
        prog="mmlatent export",
        description="Write a Hub-ready folder (safetensors, tokenizer, configs, model card) from a checkpoint.",
    )
    p.add_argument("ckpt", type=str, help="Lightning checkpoint of a LatentVLMModule (.ckpt).")
    p.add_argument("out_dir", type=str, help="Folder to write (absent or empty unless --overwrite).")
    p.add_argument("--push-to-hub", type=str, default=None, metavar="REPO",
                   help="Hub repo `org/name` to upload the folder to (token: HF_TOKEN or `hf auth login`).")
    p.add_argument("--private", action="store_true", help="Create the Hub repo private (new repos only).")
    p.add_argument("--revision", type=str, default=None, help="Branch to push to (created if missing).")
    p.add_argument("--results", nargs="+", default=[], metavar="JSON", help="results.json files of `mmlatent eval`.")
    p.add_argument("--stage-configs", nargs="+", default=[], metavar="YAML",
                   help="Stage YAML configs (stage1/2/3) to store under training/.")
    p.add_argument("--max-shard-size", type=str, default=DEFAULT_MAX_SHARD_SIZE,
                   help="Shard the safetensors weights past this size (e.g. 5GB, 200MB).")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT_DIR.")
    p.add_class_arguments(CardInfo, "card", help="Model card metadata.")
    return p


def main(argv: list[str]) -> int:
    """`mmlatent export ...`; prints one JSON line (folder, files, pushed repo) and returns the exit code."""
    p = parser()
    args = p.parse_args(argv)
    card = p.instantiate_classes(args).card
    try:
        out = export_checkpoint(
            args.ckpt, args.out_dir, card=card, results=args.results, stage_configs=args.stage_configs,
            max_shard_size=args.max_shard_size, overwrite=args.overwrite, push_to_hub=args.push_to_hub,
            private=args.private, revision=args.revision,
        )
    except (FileExistsError, FileNotFoundError, ValueError, HubAccessError) as err:
        print(f"mmlatent export: error: {err}", file=sys.stderr)
        return 2
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    print(json.dumps({"out_dir": str(out), "files": len(files), "pushed_to": args.push_to_hub}))
    return 0
