"""Learning curves of training runs, read from Lightning's CSV logs and drawn in one picture.

`read_metrics` turns a `metrics.csv` (one row per logging event, one column per metric, blanks where a
row does not log it) into `{metric: [(step, value), …]}`. `plot_curves` draws, for every run, the
training loss (a running mean, so the trend reads through the noise of small batches), the validation
observation accuracy (whether the model reads its images) and, when logged, the validation answer
accuracy, against the optimiser step. A run that stays flat at chance is visible at a glance.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mmlatent.evaluation.chart import save_figure  # noqa: E402

PANELS: tuple[tuple[str, str, str], ...] = (
    ("train/loss", "training loss (running mean)", "loss"),
    ("val/observation_acc", "observation accuracy (dev, teacher-forced)", "accuracy"),
    ("val/answer_acc", "answer accuracy (dev, generated)", "accuracy"),
)
"""(metric, panel title, y label) of each panel; a panel no run logged is left out."""


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """`{metric: [(step, value), …]}` from a Lightning CSVLogger `metrics.csv`, in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"])) if row.get("step") not in (None, "") else None
            if step is None:
                continue
            for name, value in row.items():
                if name in ("step", "epoch") or value in (None, ""):
                    continue
                out.setdefault(name, []).append((step, float(value)))
    return out


def running_mean(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Each point replaced by the mean of the last `window` values up to it."""
    out, values = [], []
    for step, value in points:
        values.append(value)
        recent = values[-window:]
        out.append((step, sum(recent) / len(recent)))
    return out


def plot_curves(runs: dict[str, str | Path], out_path: str | Path, chance: float | None = None, window: int = 10) -> Path:
    """One PNG with a panel per metric in `PANELS`, a line per run (`{label: metrics.csv}`); `chance`
    draws the accuracy a guess gets."""
    metrics = {label: read_metrics(path) for label, path in runs.items()}
    panels = [p for p in PANELS if any(p[0] in m for m in metrics.values())]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (name, title, ylabel) in zip(axes[0], panels):
        for label, m in metrics.items():
            points = m.get(name)
            if not points:
                continue
            if name.startswith("train/"):
                points = running_mean(points, window)
            ax.plot([s for s, _ in points], [v for _, v in points], marker="" if name.startswith("train/") else "o",
                    markersize=3, label=label)
        if ylabel == "accuracy":
            ax.set_ylim(0, 1.02)
            if chance is not None:
                ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimiser step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out_path)
