"""`finegrain robustness` (top-1, mCE, mFR, throughput of one model) and `finegrain compare`
(several such runs side by side, like the paper's Table 7)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from finegrain.eval.robustness_report import checkpoint_robustness, load_run, percent, protocol_differences


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
    result, out, chart = checkpoint_robustness(
        weights, data, kind, corruptions=corruptions, severities=severities, perturbations=perturbations,
        frames=frames, max_images=max_images, json_out=json_out, cache=cache, normalize=normalize, seed=seed,
        batch_size=batch_size, workers=workers, throughput_iterations=throughput_iters, device=device,
        echo=lambda message: typer.echo(message, err=True))
    Console().print(summary_table([result], title=f"Robustness of {result['name']}"))
    typer.echo(f"wrote {out} and {chart}")


def summary_table(runs: list[dict[str, Any]], title: str = "") -> Table:
    """One row per run: the columns of the paper's Table 7 (input size, top-1, mCE, mFR, throughput)."""
    table = Table(title=title or None)
    for column in ("Run", "Model", "Input Size", "Top-1 %", "mCE %", "mFR %", "Throughput img/s"):
        table.add_column(column, justify="left" if column in ("Run", "Model") else "right")
    for run in runs:
        throughput = run.get("throughput")
        table.add_row(
            str(run.get("name", "?")), str(run.get("arch", "?")), str(run.get("resolution", "?")),
            percent(run.get("top1")), percent(run.get("mce")), percent(run.get("mfr")),
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
        table.add_row(name, *[percent(run.get("corruption_errors", {}).get(name)) for run in runs])
    return table


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
