"""`finegrain robustness` and `finegrain compare` below the command line: which data set a
checkpoint is measured on, whether its errors are normalised by AlexNet's, the results file and
its bar chart, and reading runs back to compare them. The measures are finegrain.eval.robustness.
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any, Callable

from finegrain.errors import FinegrainError
from finegrain.fileio import atomic_path

# Settings that must agree for two runs' mCE / mFR to be comparable.
PROTOCOL_KEYS = ("normalize", "severities", "frames", "seed", "data")
NORMALIZE_CHOICES = ("auto", "alexnet", "none")


def recorded_data(metadata: dict[str, str]) -> tuple[str, Path, dict[str, Any]] | None:
    """(kind, root, options) of the data set a checkpoint records (`finegrain.data`), if any."""
    from finegrain.models.metadata import parse_metadata

    record = parse_metadata(metadata, "the weights").data
    return None if record is None else (record.kind, Path(record.root), dict(record.options))


def resolve_data(weights_metadata: dict[str, str], data: Path | None, kind: str,
                 echo: Callable[[str], None]) -> tuple[str, Path, dict[str, Any]]:
    """--data, else the data set the weights record, else the shipped demo (saying so)."""
    from finegrain.data import demo_root

    if data is not None:
        return kind, data, {}
    recorded = recorded_data(weights_metadata)
    if recorded is not None:
        if not recorded[1].exists():
            raise FinegrainError(f"The weights were trained on {recorded[1]} ({recorded[0]}), which is not here. "
                                 f"Pass --data DIR (and --kind {recorded[0]}) where that data set is.")
        echo(f"data: {recorded[1]} ({recorded[0]}), recorded in the weights")
        return recorded
    echo("The weights record no data set: evaluating on the shipped demo photos. Pass --data DIR (and --kind) "
         "for the data set the model was trained on.")
    return "folder", demo_root(), {}


def normalization(normalize: str, num_classes: int) -> str | None:
    """The `normalize` of evaluate_robustness: AlexNet's published errors exist for ImageNet only,
    so `auto` normalises on 1000-class data and reports plain means elsewhere."""
    if normalize not in NORMALIZE_CHOICES:
        raise FinegrainError(f"--normalize {normalize} is not known. Use auto, alexnet or none.")
    if normalize == "auto":
        return "alexnet" if num_classes == 1000 else None
    return "alexnet" if normalize == "alexnet" else None


def run_name(weights: Path) -> str:
    """A run's name in tables: its folder for a trainer's best / last checkpoint, else the file's stem."""
    return weights.parent.name if weights.stem in ("best", "last") else weights.stem


def checkpoint_robustness(weights: Path, data: Path | None = None, kind: str = "folder", *,
                          corruptions: str | None = None, severities: str = "1,2,3,4,5",
                          perturbations: str | None = None, frames: int = 10, max_images: int | None = None,
                          json_out: Path | None = None, cache: Path | None = None, normalize: str = "auto",
                          seed: int = 0, batch_size: int = 64, workers: int | None = None,
                          throughput_iterations: int = 5, device: str | None = None,
                          echo: Callable[[str], None] | None = None) -> tuple[dict[str, Any], Path, Path]:
    """Measure a checkpoint on the test split of its data set and write the results file (default
    NAME.robustness.json beside the weights) and its bar chart (.png beside it).

    Refuses data whose classes differ from the checkpoint's; `echo` (default: stderr) says which
    data set it measures. Returns (results, results file, chart).
    """
    from finegrain.data import load_splits
    from finegrain.eval.robustness import evaluate_robustness
    from finegrain.models import check_classes, load_model

    echo = echo or (lambda message: print(message, file=sys.stderr))
    model = load_model(weights)
    data_kind, data_root, options = resolve_data(model.metadata, data, kind, echo)
    split = load_splits(data_kind, data_root, **options)["test"]
    check_classes(model.info, split.classes, f"The weights {weights}", str(data_root),
                  "Pass --data DIR (and --kind) of the data set the model was trained on")
    result = evaluate_robustness(
        model, split.samples, model.preprocessing, corruptions, severities, frames, max_images, seed,
        cache if cache is not None else "default", device, perturbations=perturbations,
        normalize=normalization(normalize, len(split.classes)), batch_size=batch_size, num_workers=workers,
        throughput_iterations=throughput_iterations)
    result.update({
        "name": run_name(weights),
        "weights": str(weights.resolve()),
        "arch": getattr(model, "arch", type(model).__name__),
        "data": {"kind": data_kind, "root": str(Path(data_root).resolve()), "split": "test", "options": options},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    })
    out = json_out or weights.with_name(f"{weights.stem}.robustness.json")
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    chart = out.with_suffix(".png")
    plot_corruption_errors(result, chart)
    return result, out, chart


def plot_corruption_errors(result: dict[str, Any], path: Path) -> None:
    """Grouped bars: top-1 error per corruption, one bar per severity, the clean error as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    errors: dict[str, dict[Any, float]] = result["errors"]
    names = list(errors)
    levels = sorted({int(s) for row in errors.values() for s in row})
    width = 0.8 / max(len(levels), 1)
    colors = plt.cm.viridis([i / max(len(levels) - 1, 1) for i in range(len(levels))])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(names) + 2), 4.5))
    for k, level in enumerate(levels):
        heights = [100 * float({int(s): e for s, e in errors[c].items()}.get(level, float("nan"))) for c in names]
        ax.bar([i + (k - (len(levels) - 1) / 2) * width for i in range(len(names))], heights, width,
               label=f"severity {level}", color=colors[k])
    ax.axhline(100 * (1 - result["top1"]), color="black", linestyle="--", linewidth=1, label="clean error")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("top-1 error (%)")
    ax.set_ylim(0, 118)  # headroom above 100% for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(f"{result.get('name', '')}  mCE {percent(result['mce'])}%")
    ax.legend(fontsize="small", ncols=min(len(levels) + 1, 6), loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def percent(value: float | None) -> str:
    """A fraction as the paper's tables print it (two decimals of %), '-' where not measured."""
    return "-" if value is None else f"{100 * value:.2f}"


def load_run(path: Path) -> dict[str, Any]:
    """A results file written by `finegrain robustness`, checked for the summary keys."""
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:  # ValueError: not UTF-8 or not JSON
        raise FinegrainError(f"Cannot read results {path} ({type(error).__name__}). "
                             "Pass files written by `finegrain robustness --json`.") from None
    missing = [k for k in ("top1", "mce", "mfr", "throughput") if not isinstance(run, dict) or k not in run]
    if missing:
        raise FinegrainError(f"{path} lacks {', '.join(missing)}. Pass files written by `finegrain robustness --json`.")
    run.setdefault("name", Path(path).stem)
    return run


def protocol_differences(runs: list[dict[str, Any]]) -> list[str]:
    """Settings that differ between runs (then their mCE / mFR do not compare)."""
    differing = []
    for key in PROTOCOL_KEYS:
        values = {json.dumps(run.get(key), sort_keys=True) for run in runs}
        if len(values) > 1:
            differing.append(key)
    if len({tuple(run.get("errors", {})) for run in runs}) > 1:
        differing.append("corruptions")
    return differing
