"""Writes `mmlatent predict` output as JSON lines, one per sample, per rank.

`predict_step` returns `{"key", "response", "answer"}` dicts; this callback appends them to
`{output_dir}/predictions.rank{R}.jsonl` as they come, so a long prediction run keeps what it has done.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter


# Lightning cannot know batch indices of an iterable stream; predictions carry their sample keys instead.
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")


class JsonlPredictionWriter(BasePredictionWriter):
    """Append each prediction batch to a per-rank JSONL file."""

    def __init__(self, output_dir: str = "runs/predict"):
        """
        Args:
            output_dir: Folder of the `predictions.rank{R}.jsonl` files.
        """
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def path(self, rank: int) -> Path:
        return self.output_dir / f"predictions.rank{rank}.jsonl"

    def on_predict_start(self, trainer, pl_module) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path(trainer.global_rank).write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        with self.path(trainer.global_rank).open("a") as f:
            for row in prediction:
                f.write(json.dumps(row) + "\n")
