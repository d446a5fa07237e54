"""`finegrain backbone train`: pretrain a backbone with the paper's recipes (Tables 7 and 9);
`finegrain teacher-logits`: write the offline KD teacher logits those recipes distil from."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from finegrain.cli.runs import choose_recipe, echo, quoted, results


app = typer.Typer(help="Pretrain a backbone (ImageNet or a domain corpus) for later fine-tuning.",
                  no_args_is_help=True)


@app.callback()
def backbone() -> None:
    """Pretrain a backbone with the paper's recipes (recipes/backbone: Tables 7 and 9, and demo)."""


@app.command("train")
def train(
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe name (assemble_resnet50, e0_r50, "
                                         "mobilenet_v1_m0, demo, ...) or a .yaml path; with --resume the run's own "
                                         "recipe is the default"),
    data: Optional[Path] = typer.Option(None, "--data", help="Data folder: train/<class>/* and val/<class>/* "
                                        "(or test/), or one folder of class folders (sets data.root)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: output.dir or runs/RECIPE)"),
    teacher_logits: Optional[Path] = typer.Option(None, "--teacher-logits", help="Offline KD logits from "
                                                  "`finegrain teacher-logits` (sets regularization.kd.logits)"),
    assignments: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe key: "
                                                    "--set train.batch_size=256"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the run directory from its resume state"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars"),
) -> None:
    """Pretrain a backbone from random initialisation; top-1 / top-5 on val/ every epoch.

    Writes recipe.yaml, metrics.jsonl, curves.png, last/best.safetensors and the resume state
    into the run directory; best.safetensors is the --weights of `finegrain fgvc` and
    `finegrain retrieval`. `finegrain backbone train --recipe demo` runs on the shipped demo data.
    """
    from finegrain.recipes import BackboneRecipe, load_recipe
    from finegrain.train import report
    from finegrain.train.backbone import run_backbone

    overrides = list(assignments or [])
    if data is not None:
        overrides.append(f"data.root={quoted(data)}")
    if teacher_logits is not None:
        overrides.append(f"regularization.kd.logits={quoted(teacher_logits)}")
    chosen, run_dir = choose_recipe(recipe, out, resume, overrides, lambda name, sets: load_recipe(
        name, sets, group="backbone", schema=BackboneRecipe))
    summary = run_backbone(chosen, run_dir, resume=resume, progress=not quiet, echo=echo)
    table = Table(title=f"{chosen.name}: top-k accuracy (%), best chosen on {chosen.eval.select_on}")
    rows = {row["epoch"]: row for row in report.read_metrics(Path(run_dir))}
    columns = report.split_columns(rows.values(), (("top1", "top-1"), ("top5", "top-5")))
    for column in ("checkpoint", "epoch", *(label for _, label in columns)):
        table.add_column(column, justify="right" if column != "checkpoint" else "left")
    for name, epoch in (("best", summary["best"]["epoch"]), ("last", summary["last"].get("epoch"))):
        row = rows.get(epoch, {})
        table.add_row(name, str(epoch), *(f"{100 * row[k]:.2f}" if k in row else "-" for k, _ in columns))
    results.print(table)
    results.print(f"backbone checkpoint: {Path(run_dir) / 'best.safetensors'} (fine-tune it with "
                  f"`finegrain fgvc --weights ...`)", highlight=False)


def teacher_logits(
    weights: Path = typer.Option(..., "--weights", help="The teacher: a finegrain checkpoint, or a plain state dict "
                                 "with --arch"),
    data: Path = typer.Option(..., "--data", help="The data set whose TRAINING images the student will train on"),
    out: Path = typer.Option(..., "--out", help="Logits file to write (.safetensors)"),
    kind: str = typer.Option("folder", "--kind", help="Data set kind (folder, food101, cars196, ...)"),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of a plain state dict, e.g. "
                                       "timm/efficientnet_lite0 (our checkpoints record theirs)"),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass"),
    workers: int = typer.Option(2, "--workers", help="Image decoding processes"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar"),
) -> None:
    """Run a teacher once over the un-augmented training images and store its logits (offline KD).

    Keys are image paths relative to --data; the file records the teacher's sha256, class names
    and preprocessing. Train with it: --set regularization.kd.logits=FILE (or --teacher-logits).
    """
    from finegrain.train.teacher_logits import write_teacher_logits

    summary = write_teacher_logits(weights, data, out, kind=kind, arch=arch, batch_size=batch_size, workers=workers,
                                   progress=not quiet, echo=echo)
    results.print(f"{summary['out']}: logits of {summary['images']} images x {summary['classes']} classes, teacher "
                  f"{summary['teacher'][:19]}..., teacher top-1 on these images {100 * summary['teacher_top1']:.2f}%",
                  highlight=False)
