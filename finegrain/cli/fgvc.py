"""`finegrain fgvc`: fine-tune a backbone on a fine-grained classification data set."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from finegrain.cli.data import CLASSIFICATION_KINDS, OWN_FOLDERS
from finegrain.cli.runs import choose_recipe, echo, quoted, results


def fgvc(
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe name (food101, cars196, flowers102, "
                                         "aircraft, pets, demo) or a .yaml path; with --resume the run's own "
                                         "recipe is the default"),
    kind: Optional[str] = typer.Option(None, "--kind", help=f"Data set kind (sets data.kind): folder for "
                                       f"{OWN_FOLDERS}; or a public data set as downloaded: "
                                       f"{', '.join(CLASSIFICATION_KINDS[1:])}"),
    data: Optional[Path] = typer.Option(None, "--data", help="Data set folder (sets data.root)"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Backbone weights to warm-start from "
                                           "(sets model.weights; our safetensors or a plain state dict)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: output.dir or runs/RECIPE)"),
    assignments: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe key: --set optim.lr=0.02"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the run directory from its resume state"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars"),
) -> None:
    """Fine-tune a backbone (paper Appendix B); top-1 / top-5 on the test split every epoch.

    Writes recipe.yaml, metrics.jsonl, curves.png, last/best.safetensors and the resume state
    into the run directory. `finegrain fgvc --recipe demo` runs on the shipped demo data;
    `--kind folder --data PHOTOS` trains any recipe on your own class folders (PHOTOS/<class>/*.jpg).
    """
    from finegrain.recipes import load_recipe
    from finegrain.train import report
    from finegrain.train.fgvc import run_fgvc

    overrides = list(assignments or [])
    if kind is not None:
        overrides.append(f"data.kind={quoted(kind)}")
    if data is not None:
        overrides.append(f"data.root={quoted(data)}")
    if weights is not None:
        overrides.append(f"model.weights={quoted(weights)}")
    chosen, run_dir = choose_recipe(recipe, out, resume, overrides,
                                    lambda name, sets: load_recipe(name, sets, group="fgvc"))
    summary = run_fgvc(chosen, run_dir, resume=resume, progress=not quiet,
                       echo=echo)
    best, last = summary["best"], summary["last"]
    table = Table(title=f"{chosen.name}: top-k accuracy (%), best chosen on {chosen.eval.select_on}")
    rows = {row["epoch"]: row for row in report.read_metrics(Path(run_dir))}
    columns = report.split_columns(rows.values(), (("top1", "top-1"), ("top5", "top-5")))
    for column in ("checkpoint", "epoch", *(label for _, label in columns)):
        table.add_column(column, justify="right" if column != "checkpoint" else "left")
    for name, epoch in (("best", best["epoch"]), ("last", last.get("epoch"))):
        row = rows.get(epoch, {})
        table.add_row(name, str(epoch), *(f"{100 * row[k]:.2f}" if k in row else "-" for k, _ in columns))
    results.print(table)
    results.print(f"best checkpoint: {Path(run_dir) / 'best.safetensors'}", highlight=False)
