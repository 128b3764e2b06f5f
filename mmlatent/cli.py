"""The `mmlatent` command: Lightning's `fit|validate|test|predict` plus `data`, `eval` and `export`.

The four training subcommands are LightningCLI, so every option of the model, the data module and the
Trainer is typed and documented (`mmlatent fit --help`, `--print_config`). The other subcommands have
their own small parsers. The dispatch is by the first word only.
"""

from __future__ import annotations

import sys

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

# Field docstrings of the typed configs (attribute docstrings, as litgpt writes them) become --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

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
    """LightningCLI with mmlatent's module and data module, CSV logging and atomic checkpoint writes by default."""

    def __init__(self, args: list[str] | None):
        from mmlatent.training.datamodule import ShardDataModule
        from mmlatent.training.module import LatentVLMModule

        super().__init__(
            LatentVLMModule,
            ShardDataModule,
            args=args,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "mmlatent"},
        )


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_COMMANDS:
        MMLatentCLI(None if from_shell else [command, *rest])  # None: LightningCLI reads sys.argv itself
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
