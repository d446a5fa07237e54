"""`finegrain retrieval`: fine-tune an embedder for zero-shot image retrieval, or evaluate one."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from finegrain.cli.runs import choose_recipe, echo, quoted, results
from finegrain.errors import FinegrainError



def _load(name: str, overrides: list[str], loss: Optional[str]) -> Any:
    """The recipe with its overrides; a --loss other than the recipe's drops the recipe's loss
    arguments (they belong to the other loss) before the user's --set apply."""
    from finegrain.recipes import RetrievalRecipe, load_recipe

    recipe = load_recipe(name, overrides, group="retrieval", schema=RetrievalRecipe)
    if loss is None or loss == recipe.retrieval.loss.name:
        return recipe
    return load_recipe(name, [f"retrieval.loss.name={quoted(loss)}", "retrieval.loss.args={}", *overrides],
                       group="retrieval", schema=RetrievalRecipe)


def _metrics_table(title: str, columns: dict[str, dict[str, float]]) -> Table:
    """One row per metric (Recall@K..., MAP@R), one column per run state, in percent."""
    table = Table(title=title or None)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    keys = list(dict.fromkeys(k for values in columns.values() for k in values  # "recall@1", "val_map@r"
                              if k.rpartition("_")[2].startswith("recall@") or k.rpartition("_")[2] == "map@r"))
    for key in keys:
        split, _, metric = key.rpartition("_")
        label = "MAP@R" if metric == "map@r" else f"Recall@{metric.split('@')[1]}"
        table.add_row(f"{split} {label}".strip(),
                      *(f"{100 * values[key]:.2f}" if key in values else "-" for values in columns.values()))
    return table


def _eval_only(recipe_name: Optional[str], weights: Optional[Path], data: Optional[Path], overrides: list[str],
               rerank: Optional[str] = None, singletons: str = "exclude") -> None:
    from finegrain.eval.rerank import Rerank
    from finegrain.train.retrieval import evaluate_saved_embedder

    if weights is None:
        raise FinegrainError("--eval-only needs the checkpoint to evaluate. Pass --weights RUN/best.safetensors.")
    recipe, report = evaluate_saved_embedder(weights, recipe_name, data, overrides,
                                             rerank=Rerank(rerank) if rerank else None, singletons=singletons)
    protocol = (f"{report.n_singletons_as_misses} with nothing of their class to find counted as misses "
                "(the release's protocol)" if singletons == "miss" else
                f"{report.n_excluded_singletons} with nothing of their class to find left out (--singletons miss "
                "counts them as misses, as the release did)")
    results.print(f"{weights}: {report.n_queries} queries on the test classes of {recipe.data.kind}; {protocol}",
                  highlight=False)
    title = "zero-shot retrieval" + (f", re-ranked by {rerank}" if rerank else "")
    results.print(_metrics_table(title, {"%": report.to_metrics()}))


def retrieval(
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe name (sop, cub200, cars196, demo) or a "
                                         ".yaml path; with --resume the run's own recipe is the default"),
    loss: Optional[str] = typer.Option(None, "--loss", help="arcface, softmax, or any pytorch-metric-learning loss "
                                       "class name (its arguments via --set retrieval.loss.args={...})"),
    data: Optional[Path] = typer.Option(None, "--data", help="Data set folder (sets data.root)"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Backbone weights to warm-start from; with "
                                           "--eval-only, the embedder checkpoint to evaluate"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: output.dir or runs/RECIPE)"),
    assignments: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe key: --set optim.lr=0.02"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its resume state"),
    eval_only: bool = typer.Option(False, "--eval-only", help="Only evaluate --weights: Recall@K and MAP@R"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars"),
    rerank: Optional[str] = typer.Option(None, "--rerank", help="With --eval-only: re-rank each query's neighbours "
                                         "by aqe, dba or kreciprocal before scoring"),
    singletons: str = typer.Option("exclude", "--singletons", help="With --eval-only: queries with nothing of their "
                                   "class to find are left out (exclude) or counted as misses (miss: the "
                                   "authors' release, to compare with its numbers)"),
) -> None:
    """Fine-tune a GeM embedder with a metric loss; Recall@K / MAP@R on unseen classes every epoch."""
    from finegrain.train import report
    from finegrain.train.retrieval import run_retrieval

    overrides = list(assignments or [])
    if rerank and not eval_only:
        raise FinegrainError("--rerank re-ranks an evaluation. Add --eval-only (training always scores plain search).")
    if singletons != "exclude" and not eval_only:
        raise FinegrainError("--singletons chooses how --eval-only counts queries. Add --eval-only.")
    if eval_only:
        if resume:
            raise FinegrainError("--eval-only and --resume do not go together. Drop one of them.")
        _eval_only(recipe, weights, data, overrides, rerank, singletons)
        return
    if data is not None:
        overrides.append(f"data.root={quoted(data)}")
    if weights is not None:
        overrides.append(f"model.weights={quoted(weights)}")
    chosen, run_dir = choose_recipe(recipe, out, resume, overrides, lambda name, sets: _load(name, sets, loss))
    summary = run_retrieval(chosen, run_dir, resume=resume, progress=not quiet,
                            echo=echo)
    rows = {row["epoch"]: row for row in report.read_metrics(Path(run_dir))}
    best_epoch = summary["best"]["epoch"]
    columns = {"epoch 0 (not fine-tuned)": rows.get(0, {}), f"best (epoch {best_epoch})": rows.get(best_epoch, {})}
    results.print(f"{chosen.name}: zero-shot retrieval on unseen classes (%), best chosen on "
                  f"{chosen.eval.select_on}", highlight=False)
    results.print(_metrics_table("", columns))
    results.print(f"best checkpoint: {Path(run_dir) / 'best.safetensors'}", highlight=False)
