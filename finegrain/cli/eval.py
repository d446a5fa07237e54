"""`finegrain eval`: top-1 / top-5 accuracy of a classifier checkpoint on a data set."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

results = Console()


def evaluate(
    weights: Path = typer.Option(..., "--weights", help="A classifier checkpoint (e.g. RUN/best.safetensors)"),
    data: Path = typer.Option(..., "--data", help="Data set folder"),
    kind: str = typer.Option("folder", "--kind", help="Data set layout: folder, food101, cars196, flowers102, "
                             "aircraft, pets"),
    split: str = typer.Option("test", "--split", help="Which split to evaluate"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0, help="DataLoader worker processes"),
    as_json: bool = typer.Option(False, "--json", help="Print {top1, top5, images} as JSON (fractions)"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar"),
    allow_non_finite: bool = typer.Option(False, "--allow-non-finite", help="Evaluate weights holding NaN / inf "
                                          "anyway (to inspect a run that diverged); refused by default"),
) -> None:
    """Evaluate a checkpoint at the preprocessing it records (eval resize and centre crop)."""
    from finegrain.eval.classification import evaluate_classifier

    metrics = evaluate_classifier(weights, data, kind, split, batch_size, workers, progress=not quiet,
                                  allow_non_finite=allow_non_finite)
    if as_json:
        results.print_json(json.dumps(metrics))
    else:
        results.print(f"{weights} on {data} ({split}, {metrics['images']} images): "
                      f"top-1 {100 * metrics['top1']:.2f}%  top-5 {100 * metrics['top5']:.2f}%", highlight=False)
