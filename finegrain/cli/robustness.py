"""`finegrain robustness` (top-1, mCE, mFR, throughput of one model) and `finegrain compare`
(several such runs side by side, like the paper's Table 7)."""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from finegrain.errors import FinegrainError
from finegrain.fileio import atomic_path

# Settings that must agree for two runs' mCE / mFR to be comparable.
_PROTOCOL_KEYS = ("normalize", "severities", "frames", "seed", "data")


def recorded_data(metadata: dict[str, str]) -> tuple[str, Path, dict[str, Any]] | None:
    """(kind, root, options) of the data set a checkpoint records (`finegrain.data`), if any."""
    from finegrain.models.metadata import parse_metadata

    record = parse_metadata(metadata, "the weights").data
    return None if record is None else (record.kind, Path(record.root), dict(record.options))


def _resolve_data(weights_metadata: dict[str, str], data: Optional[Path],
                  kind: str) -> tuple[str, Path, dict[str, Any]]:
    """--data, else the data set the weights record, else the shipped demo (saying so)."""
    from finegrain.data import demo_root

    if data is not None:
        return kind, data, {}
    recorded = recorded_data(weights_metadata)
    if recorded is not None:
        if not recorded[1].exists():
            raise FinegrainError(f"The weights were trained on {recorded[1]} ({recorded[0]}), which is not here. "
                                 f"Pass --data DIR (and --kind {recorded[0]}) where that data set is.")
        typer.echo(f"data: {recorded[1]} ({recorded[0]}), recorded in the weights", err=True)
        return recorded
    typer.echo("The weights record no data set: evaluating on the shipped demo photos. Pass --data DIR (and --kind) "
               "for the data set the model was trained on.", err=True)
    return "folder", demo_root(), {}


def robustness(
    weights: Path = typer.Option(..., "--weights", help="A finegrain .safetensors checkpoint"),
    data: Optional[Path] = typer.Option(None, "--data", help="Data set folder (default: the one the weights "
                                        "record, else the shipped demo); its test split is evaluated"),
    kind: str = typer.Option("folder", "--kind", help="Data set kind of --data (see `finegrain data info`)"),
    corruptions: Optional[str] = typer.Option(None, "--corruptions", help="Comma-separated imagecorruptions "
                                              "names (default: the 15 of mCE)"),
    severities: str = typer.Option("1,2,3,4,5", "--severities", help="Comma-separated severities 1-5"),
    perturbations: Optional[str] = typer.Option(None, "--perturbations", help="Comma-separated ImageNet-P "
                                                "perturbations (default: the 10 of mFR)"),
    frames: int = typer.Option(10, "--frames", help="Frames per perturbation sequence (2-31); 0 skips mFR"),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="At most N images per class"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Results file (default: beside the weights, "
                                            "NAME.robustness.json); a bar chart .png is written beside it"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Corrupted-image cache (default: "
                                         "$FINEGRAIN_CACHE/corruptions or ~/.cache/finegrain/corruptions)"),
    normalize: str = typer.Option("auto", "--normalize", help="auto (AlexNet on 1000-class data), alexnet or none"),
    seed: int = typer.Option(0, "--seed", help="Seed of the corruptions and perturbations"),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass"),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes"),
    throughput_iters: int = typer.Option(5, "--throughput-iters", help="Timed batches of 64; 0 skips throughput"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cpu, ... (default: CUDA if present)"),
) -> None:
    """Top-1, mCE, mFR and throughput of one model, as the paper reports them (Tables 1, 7, 10)."""
    from finegrain.data import load_splits
    from finegrain.eval.robustness import evaluate_robustness
    from finegrain.models import check_classes, load_model

    model = load_model(weights)
    data_kind, data_root, options = _resolve_data(model.metadata, data, kind)
    split = load_splits(data_kind, data_root, **options)["test"]
    check_classes(model.info, split.classes, f"The weights {weights}", str(data_root),
                  "Pass --data DIR (and --kind) of the data set the model was trained on")
    mode = {"auto": "alexnet" if len(split.classes) == 1000 else None, "alexnet": "alexnet", "none": None}
    if normalize not in mode:
        raise FinegrainError(f"--normalize {normalize} is not known. Use auto, alexnet or none.")
    result = evaluate_robustness(
        model, split.samples, model.preprocessing, corruptions, severities, frames, max_images, seed,
        cache if cache is not None else "default", device, perturbations=perturbations,
        normalize=mode[normalize], batch_size=batch_size, num_workers=workers,
        throughput_iterations=throughput_iters)
    result.update({
        "name": weights.parent.name if weights.stem in ("best", "last") else weights.stem,
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
    Console().print(summary_table([result], title=f"Robustness of {result['name']}"))
    typer.echo(f"wrote {out} and {chart}")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def summary_table(runs: list[dict[str, Any]], title: str = "") -> Table:
    """One row per run: the columns of the paper's Table 7 (input size, top-1, mCE, mFR, throughput)."""
    table = Table(title=title or None)
    for column in ("Run", "Model", "Input Size", "Top-1 %", "mCE %", "mFR %", "Throughput img/s"):
        table.add_column(column, justify="left" if column in ("Run", "Model") else "right")
    for run in runs:
        throughput = run.get("throughput")
        table.add_row(
            str(run.get("name", "?")), str(run.get("arch", "?")), str(run.get("resolution", "?")),
            _percent(run.get("top1")), _percent(run.get("mce")), _percent(run.get("mfr")),
            "-" if throughput is None else f"{throughput:.0f}",
        )
    return table


def corruption_table(runs: list[dict[str, Any]]) -> Table:
    """CE per corruption (rows) for every run (columns)."""
    table = Table(title="Corruption error per corruption (%)")
    table.add_column("Corruption")
    for run in runs:
        table.add_column(str(run.get("name", "?")), justify="right")
    names = list(dict.fromkeys(c for run in runs for c in run.get("corruption_errors", {})))
    for name in names:
        table.add_row(name, *[_percent(run.get("corruption_errors", {}).get(name)) for run in runs])
    return table


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
    ax.set_title(f"{result.get('name', '')}  mCE {_percent(result['mce'])}%")
    ax.legend(fontsize="small", ncols=min(len(levels) + 1, 6), loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


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
    for key in _PROTOCOL_KEYS:
        values = {json.dumps(run.get(key), sort_keys=True) for run in runs}
        if len(values) > 1:
            differing.append(key)
    if len({tuple(run.get("errors", {})) for run in runs}) > 1:
        differing.append("corruptions")
    return differing


def compare(
    runs: list[Path] = typer.Argument(..., help="Results files written by `finegrain robustness --json`"),
    per_corruption: bool = typer.Option(False, "--per-corruption", help="Also print CE per corruption"),
) -> None:
    """Print several robustness runs side by side, like the paper's Table 7."""
    loaded = [load_run(path) for path in runs]
    console = Console()
    console.print(summary_table(loaded, title="Robustness comparison"))
    if per_corruption:
        console.print(corruption_table(loaded))
    differing = protocol_differences(loaded)
    if differing:
        console.print(f"[yellow]note:[/yellow] the runs differ in {', '.join(differing)}; "
                      "their mCE / mFR are not directly comparable.")
