"""Figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def learning_curve(history: list[dict[str, Any]], title: str, path: Path) -> Path | None:
    """Training loss every few steps (a line) and validation loss per epoch (markers), against the epoch
    (the LoRA-vs-IA3 study's Figures 1-2); see `curve_series`."""
    series = curve_series(history)
    if not series:
        return None
    styles = {
        "training loss (steps)": {"fmt": "-", "color": "C0", "lw": 1.2},
        "training loss (epoch mean)": {"fmt": "o", "color": "C0", "mfc": "none"},
        "training loss": {"fmt": "o-", "color": "C0"},
        "validation loss": {"fmt": "s--", "color": "C1", "lw": 0.8},
    }
    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=110)
    for label, points in series.items():
        style = dict(styles[label])
        ax.plot(*zip(*points, strict=True), style.pop("fmt"), label=label, **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def curve_series(history: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """(epoch, loss) points of a learning curve by label: the step rows' training loss, each epoch's mean
    training loss and the validation loss per epoch. A history without step rows (runs from before them)
    has its per-epoch training loss as the line, as then."""
    from peftlab.store import epoch_rows, step_rows

    epochs = epoch_rows(history)
    steps = [(r["epoch"], r["train_loss"]) for r in step_rows(history) if "train_loss" in r]
    train = [(r["epoch"], r["train_loss"]) for r in epochs if "train_loss" in r]
    val = [(r["epoch"], r["val_loss"]) for r in epochs if "val_loss" in r]
    if steps:
        series = {"training loss (steps)": steps, "training loss (epoch mean)": train}
    else:
        series = {"training loss": train}
    series["validation loss"] = val
    return {label: points for label, points in series.items() if points}


def confusion(matrix: list[list[int]], labels: list[str], title: str, path: Path) -> Path:
    """A confusion-matrix heat map with counts, rows = true label, columns = prediction."""
    data = np.asarray(matrix)
    size = max(3.2, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 0.6, size), dpi=110)
    image = ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = data.max() / 2 if data.size else 0
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(
                j,
                i,
                str(data[i, j]),
                ha="center",
                va="center",
                color="white" if data[i, j] > threshold else "black",
                fontsize=8,
            )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def label_shares(true: dict[str, float], predicted: dict[str, dict[str, float]], title: str, path: Path) -> Path:
    """Grouped bars: the true share of each label, then each run's share of predictions."""
    labels = list(true)
    series = [("true share", true), *predicted.items()]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.2, 1.2 * len(labels) * len(series) / 2), 3.4), dpi=110)
    for i, (name, shares) in enumerate(series):
        xs = np.arange(len(labels)) + (i - (len(series) - 1) / 2) * width
        ax.bar(xs, [shares.get(label, 0) for label in labels], width, label=name, hatch="//" if i == 0 else None)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("share of examples")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
