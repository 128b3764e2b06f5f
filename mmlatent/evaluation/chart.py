"""The results chart: accuracy per group as horizontal bars, with counts and unparsed answers.

One panel per grouping of the task's breakdown (MMMU: the disciplines, then the subjects; ScienceQA: its
nine columns, NAT … Avg; shards: the sources; synthetic: the sources, task kinds and hops), the overall bar
heading the first. Bars are labelled `acc% (n, unparsed u)`, so a reader sees how much each bar rests
on. It is a plain matplotlib figure on the Agg backend (no display needed); the trade-off is a static
picture, the numbers themselves live in results.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out `fig`, write it to `path` (its folder created) and close it: every mmlatent picture ends so."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def panels(results: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """(title, {label: group}) per panel, in display order (top to bottom): one panel per grouping of the
    breakdown, in its order, the overall bar heading the first; so every task's breakdown draws, whatever
    groupings it has (MMMU's disciplines and subjects, ScienceQA's groups, shards' sources, synthetic's
    tasks and hops)."""
    b = results["breakdown"]
    groupings = [(name, groups) for name, groups in b.items() if name != "overall" and groups]
    if not groupings:
        return [("overall", {"Overall": b["overall"]})]
    (first, groups), rest = groupings[0], groupings[1:]
    return [(f"overall and {first}", {"Overall": b["overall"], **groups}), *rest]


def _draw(ax, title: str, groups: dict[str, dict[str, Any]]) -> None:
    labels = list(groups)
    values = [100 * g["acc"] if g["acc"] is not None else 0.0 for g in groups.values()]
    colours = ["#DD8452" if label in ("Overall", "Avg") else "#4C72B0" for label in labels]  # the headline stands out
    bars = ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    for bar, g in zip(bars, groups.values()):
        acc = "n/a" if g["acc"] is None else f"{100 * g['acc']:.1f}%"
        label = f"{acc} (n={g['num']}, unparsed {g['unparsed']})"
        ax.text(bar.get_width() + 1, bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=7)


def plot_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write the chart of `results` (the results.json object) to `path` (PNG)."""
    parts = panels(results)
    heights = [max(1.5, 0.28 * len(groups) + 0.8) for _, groups in parts]
    fig, axes = plt.subplots(
        len(parts), 1, figsize=(8, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    for ax, (title, groups) in zip(axes[:, 0], parts):
        _draw(ax, title, groups)
    acc = results.get("acc")
    headline = "no gold answers" if acc is None else f"{100 * acc:.2f}%"
    fig.suptitle(
        f"{results['task']} {results['split']} ({results['subset']}): {headline}, n={results['num']}, "
        f"unparsed {results['unparsed']}",
        fontsize=11,
    )
    return save_figure(fig, path, dpi=100)
