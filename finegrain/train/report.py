"""What a run shows while it trains: metrics.jsonl (one object per epoch) and curves.png."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from finegrain.fileio import atomic_path  # noqa: E402

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# Keys that are not quality metrics, plotted elsewhere or not at all.
_NOT_METRICS = {"epoch", "loss", "lr", "time", "images_per_s", "step"}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the whole file atomically (a resumed run drops rows past its checkpoint first)."""
    with atomic_path(run_dir / METRICS_FILE) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def split_columns(rows: Iterable[dict[str, Any]], metrics: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """(metrics.jsonl key, column label) of each (metric, label) on each split the rows hold,
    validation first: [("val_top1", "val top-1"), ("test_top1", "test top-1"), ...]."""
    present = {key for row in rows for key in row}
    return [(f"{split}_{metric}", f"{split} {label}") for split in ("val", "test") for metric, label in metrics
            if f"{split}_{metric}" in present]


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str = "",
                selected: dict[str, Any] | None = None) -> None:
    """Training loss, learning rate and every evaluation metric (fractions shown as %) by epoch;
    `selected` ({"metric", "epoch"}: the trainer's best) is marked, so the plot shows which epoch
    best.safetensors holds and on which split's figure it was chosen."""
    fig, (ax_loss, ax_lr, ax_metric) = plt.subplots(1, 3, figsize=(13, 3.6))
    train_rows = [r for r in rows if r.get("loss") is not None]
    epochs = [r["epoch"] for r in train_rows]
    ax_loss.plot(epochs, [r["loss"] for r in train_rows], marker="o")
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_lr.plot(epochs, [r.get("lr", math.nan) for r in train_rows], marker="o", color="tab:orange")
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch")
    metric_keys = sorted({k for r in rows for k, v in r.items()
                          if k not in _NOT_METRICS and isinstance(v, (int, float))})
    for key in metric_keys:
        points = [(r["epoch"], 100.0 * r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax_metric.plot(*zip(*points), marker="o", label=key)
    if selected is not None:
        ax_metric.axvline(selected["epoch"], color="black", linestyle="--", linewidth=1,
                          label=f"selected: epoch {selected['epoch']} ({selected['metric']})")
    ax_metric.set(title="evaluation (%)", xlabel="epoch")
    if metric_keys or selected is not None:
        ax_metric.legend(fontsize="small")
    for ax in (ax_loss, ax_lr, ax_metric):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
