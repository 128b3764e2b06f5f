"""The `mmlatent` command: Lightning's `fit|validate|test|predict` plus `data`, `eval` and `export`.

The four training subcommands are LightningCLI, so every option of the model, the data module and the
Trainer is typed and documented (`mmlatent fit --help`, `--print_config`). The other subcommands have
their own small parsers. The dispatch is by the first word only.
"""

from __future__ import annotations

import difflib
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import yaml

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from mmlatent.atomic import DiskFull
from mmlatent.config_io import ConfigError

# Field docstrings of the typed configs (attribute docstrings, as litgpt writes them) become --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)
# the CLI hands LightningCLI the (preset-expanded) arguments explicitly, also when run from a shell
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

HELP = """usage: mmlatent COMMAND [options]

Train vision-language models to reason in latent space.

commands:
  fit        train a stage (LightningCLI): mmlatent fit -c train/configs/tiny/stage1.yaml
  validate   run the validation loop on a checkpoint
  test       run the test loop on a checkpoint
  predict    generate answers for the validation shards
  data       write shards: `mmlatent data synth --out DIR --train N --val M`, `mmlatent data convert SOURCE ...`
  teacher    precompute a distillation stage's teacher states (`--stage stage2|stage3`)
  eval       score a model on MMMU / ScienceQA: mmlatent eval --task mmmu --data MMMU/MMMU --model CKPT --output OUT
  export     write a Hub-ready folder from a checkpoint: mmlatent export CKPT OUT_DIR [--push-to-hub REPO]

Run `mmlatent COMMAND --help` for a command's options.
"""

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
    "log_every_n_steps": 10,
    # checkpoints are written to a temporary file and renamed: a failed write leaves the last good one
    "plugins": [{"class_path": "mmlatent.training.checkpointing.AtomicCheckpointIO"}],
}


class MMLatentCLI(LightningCLI):
    """LightningCLI with mmlatent's module and data module, CSV logging and atomic checkpoint writes by default.

    Three additions. A model config naming a preset (`model.vlm.preset: tiny-demo`) starts from that preset's
    fields and every field given beside it overrides them (`with_preset`). A bad option or config key is
    reported in a few lines, first, naming where it came from and the closest valid key, instead of after
    the whole usage text (`explain`); `--help` still prints the usage. `fit --ckpt_path` keeps the command's
    settings rather than the checkpoint's (`_parse_ckpt_path`).
    """

    def __init__(self, args: list[str], run: bool = True):
        from mmlatent.training.datamodule import ShardDataModule
        from mmlatent.training.module import LatentVLMModule

        self._args = args
        super().__init__(
            LatentVLMModule,
            ShardDataModule,
            args=with_preset(args, subcommand=run),
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "mmlatent"},
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        """The data module's sequence layouts follow the model's stage and slot count (one place to set them)."""
        from mmlatent.training.stages import data_layout, data_teacher_layout

        sources = ("model.stage", "model.vlm.latent.slots")
        parser.link_arguments(sources, "data.layout", compute_fn=data_layout)
        parser.link_arguments(sources, "data.teacher_layout", compute_fn=data_teacher_layout)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI replaces the command's model settings by a `--ckpt_path` checkpoint's hyper-parameters.
        `fit` keeps the command's as given: a resume continues the run the command describes, and the module
        stops at restore when the checkpoint's stage or model settings differ (`training/resume_check.py`).
        `validate`, `test` and `predict` evaluate the checkpoint, with its settings, as Lightning does."""
        if self.config.get("subcommand") == "fit":
            return
        from mmlatent.training.checkpoint_reader import READ_ERRORS, checkpoint_error

        try:
            super()._parse_ckpt_path()
        except FileNotFoundError:
            raise
        except READ_ERRORS as err:
            raise checkpoint_error(self.config[self.config.subcommand].get("ckpt_path"), err) from err

    def parse_arguments(self, parser, args) -> None:
        subcommand = args[0] if args else None
        parsers = [parser, *getattr(parser._subcommands_action, "_name_parser_map", {}).values()]
        for p in parsers:
            p.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            sub = getattr(parser._subcommands_action, "_name_parser_map", {}).get(subcommand, parser)
            print(explain(str(err), self._args, list(sub.get_defaults().keys()), subcommand), file=sys.stderr)
            sys.exit(2)


def config_sources(args: list[str]) -> list[tuple[str, dict]]:
    """(where, parsed YAML) of every `-c/--config` value in `args`, in order (a path, or YAML text)."""
    out = []
    for i, arg in enumerate(args):
        value = None
        if arg in ("-c", "--config") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        try:
            text = Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value
            data = yaml.safe_load(text)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            out.append((value if Path(value).is_file() else "a --config string", data))
    return out


def _dotted(data: dict, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def with_preset(args: list[str], subcommand: bool = True) -> list[str]:
    """`args` with the named model preset's fields put first, so everything the user gave overrides them.

    The preset is the last `model.vlm.preset` among the config files and `--model.vlm.preset` options.
    `subcommand`: whether `args` start with one (`fit ...`; a CLI built with `run=False` has none)."""
    name = None
    for i, arg in enumerate(args):
        if arg.startswith("--model.vlm.preset="):
            name = arg.split("=", 1)[1]
        elif arg == "--model.vlm.preset" and i + 1 < len(args):
            name = args[i + 1]
        elif arg in ("-c", "--config") or arg.startswith("--config="):
            found = [_dotted(data, "model.vlm.preset") for _, data in config_sources(args[i : i + 2])]
            name = next((f for f in found if f), name)
    if not name or (subcommand and (not args or args[0] not in LIGHTNING_COMMANDS)):
        return args
    from mmlatent.config_io import to_dict
    from mmlatent.model.presets import preset

    base = ["--config", yaml.safe_dump({"model": {"vlm": to_dict(preset(name))}})]
    return [args[0], *base, *args[1:]] if subcommand else [*base, *args]


def explain(message: str, args: list[str], valid_keys: list[str], subcommand: str | None) -> str:
    """A parse error in a few lines: what is wrong, which file (or the command line) gave it, the closest
    valid key, and where the full list is."""
    message = message.strip().splitlines()
    first = message[0] if message else "invalid arguments"
    key = None
    for pattern in (r"option '([\w.]+)'", r"--([\w.]+)=", r"--([\w.]+)", r'key "([\w.]+)"', r"Key '([\w.]+)'"):
        m = re.search(pattern, " ".join(message))
        if m:
            key = m.group(1)
            break
    lines = [f"mmlatent {subcommand or ''}: error: {first}".replace("  ", " ")]
    lines += [f"  {line.strip()}" for line in message[1:3]]
    if key:
        on_line = any(a == f"--{key}" or a.startswith(f"--{key}=") for a in args)
        files = [src for src, data in config_sources(args) if _dotted(data, key) is not None]
        where = "the command line" if on_line or not files else files[-1]  # the last one given wins
        lines.append(f"  key: {key} (from {where})")
        close = difflib.get_close_matches(key, valid_keys, n=1, cutoff=0.6)
        if close and close[0] != key:
            lines.append(f"  did you mean: {close[0]}")
    lines.append(f"  all options: mmlatent {subcommand or ''} --help".replace("  --", " --"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The `mmlatent` command. A bad setting found at start (`ConfigError`: a shard set, a teacher cache, a
    resume that does not fit) and a full disk (`DiskFull`) print one line naming the file and the cause."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except ConfigError as err:
        print(f"mmlatent {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except DiskFull as err:
        print(f"mmlatent {argv[0]}: error: {err.strerror}", file=sys.stderr)
        return 1


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_COMMANDS:
        try:
            MMLatentCLI([command, *rest])
        except ConfigError as err:  # a bad setting found when the run starts (a shard path, a field's value)
            print(f"mmlatent {command}: error: {err}", file=sys.stderr)
            return 2
        return 0
    if command == "data":
        from mmlatent.data.command import main as data_main

        return data_main(rest)
    if command == "teacher":
        from mmlatent.training.teacher_command import main as teacher_main

        teacher_main(rest)
        return 0
    if command == "export":
        from mmlatent.hub.export import main as export_main

        return export_main(rest)
    if command == "eval":
        from mmlatent.evaluation.command import main as eval_main

        eval_main(rest)
        return 0
    print(f"mmlatent: unknown command {command!r}\n\n{HELP}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
