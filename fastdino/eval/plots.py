"""Training curves from the JSONL log: loss, and kNN accuracy / learning rate / teacher entropy when logged (with
ln K, the entropy of a uniform teacher output, so that a reader sees which way a collapse goes)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work on headless machines
import matplotlib.pyplot as plt  # noqa: E402

# Panels in drawing order: (log key, axis label). 'loss' is required, the others are drawn when present.
_PANELS = (("loss", "DINO loss"), ("knn_top1", "kNN top-1 (%)"), ("lr", "learning rate"),
           ("teacher_entropy", "teacher entropy"))


def read_jsonl(jsonl_path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a log file, one per non-empty line; ValueError names the first malformed line."""
    path = Path(jsonl_path)
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number} is not valid JSON: {error}") from error
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number} is not a JSON object")
        rows.append(row)
    return rows


def plot_training_curves(jsonl_path: str | os.PathLike, out_png: str | os.PathLike,
                         out_dim: int | None = None) -> Path:
    """Draw one panel per logged metric against 'step' and save a PNG; returns its path.

    Rows need 'step'; a metric is drawn from the rows that hold it (rows written at eval time may hold only
    'knn_top1'). At least one row must hold 'loss'. `out_dim` (K): the entropy panel spans 0 (one-hot collapse) to
    ln K (uniform collapse), with a line at ln K.
    """
    return save_training_curves(read_jsonl(jsonl_path), out_png, out_dim, jsonl_path)


def save_training_curves(rows: list[dict], out_png: str | os.PathLike, out_dim: int | None = None,
                         source: str | os.PathLike = "the log") -> Path:
    """`plot_training_curves` from rows already read (`source` names where they come from, for errors)."""
    figure = training_curves_figure([row for row in rows if "step" in row], out_dim, source)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png


def training_curves_figure(rows: list[dict], out_dim: int | None = None,
                           source: str | os.PathLike = "the log") -> plt.Figure:
    """The figure `plot_training_curves` saves, from rows that all hold 'step'."""
    series = {}
    for key, _ in _PANELS:
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
        if points:
            series[key] = points
    if "loss" not in series:
        raise ValueError(f"{source} has no row with both 'step' and a numeric 'loss'")

    panels = [(key, label) for key, label in _PANELS if key in series]
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for axis, (key, label) in zip(axes[:, 0], panels):
        steps, values = zip(*series[key])
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if key == "teacher_entropy" and out_dim:
            ln_k = math.log(out_dim)
            axis.axhline(ln_k, color="gray", linestyle="--", label=f"ln K = {ln_k:.2f}: uniform")
            axis.set_ylim(bottom=0)  # 0: one-hot
            axis.legend(loc="best", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    return figure
