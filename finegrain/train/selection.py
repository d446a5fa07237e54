"""Honest model selection: which split picks best.safetensors, and the test split's one evaluation.

With `eval.select_on: val` (the default for the demos and users' folders), a validation part is
held out of the training data (finegrain.data.validation), every epoch is evaluated on it and
best.safetensors is the epoch it ranks first; the test split is evaluated once, at the end, for
the best and the last weights (and the EMA's), so the figures a run reports were never used to
choose it. `select_on: test` is the authors' protocol, kept by the paper's recipes so their
numbers compare with the paper's: best is then chosen on the test split, and its figure is
optimistic.

metrics.jsonl names the split of every figure: `val_top1`, `test_top1`, `val_recall@1`,
`test_map@r`; the EMA's figures are `val_ema_top1`, `test_ema_top1` and so on.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finegrain.data.base import Split
from finegrain.data.validation import hold_out
from finegrain.errors import FinegrainError
from finegrain.fileio import atomic_path
from finegrain.models.checkpoint import read_weights
from finegrain.recipes import Recipe

if TYPE_CHECKING:
    from finegrain.train.trainer import Trainer

VALIDATION_FILE = "validation.json"
EMA = "ema"


def metric_key(split: str, metric: str, ema: bool = False) -> str:
    """The metrics.jsonl key of `metric` on `split`: "val_top1", "test_ema_recall@1"."""
    return f"{split}_{EMA + '_' if ema else ''}{metric}"


def prefixed(metrics: dict[str, float], split: str, ema: bool = False) -> dict[str, float]:
    return {metric_key(split, name, ema): value for name, value in metrics.items()}


def ema_checkpoint_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """The EMA's figures of a row, named as a checkpoint of its own records them ("val_top1")."""
    marker = f"_{EMA}_"
    return {key.replace(marker, "_", 1): value for key, value in row.items() if marker in key}


def evaluate_epoch(trainer: Trainer, every_split: bool = False) -> dict[str, float]:
    """The selection split's figures of the weights (and of the EMA), named by split; with
    `every_split`, the test split's too (where a run selecting on val starts from)."""
    splits = [(trainer.select_on, trainer.eval_set)]
    if every_split and trainer.select_on == "val":
        splits.append(("test", trainer.test_set))
    metrics: dict[str, float] = {}
    for split, dataset in splits:
        metrics.update(prefixed(trainer.evaluate_on(dataset), split))
        if trainer.ema is not None:
            metrics.update(prefixed(trainer.evaluate_on(dataset, trainer.ema.module), split, ema=True))
    return metrics


def validation_split(recipe: Recipe, root: Path, train: Split,
                     by_class: bool = False) -> tuple[Split, Split | None, dict[str, Any] | None]:
    """(what trains, the validation part, its record for `keep_record`); under select_on test,
    (train, None, None)."""
    if recipe.eval.select_on == "test":
        return train, None, None
    part = hold_out(recipe.data.kind, root, train, recipe.eval.val_fraction, recipe.eval.val_seed, by_class)
    return part.train, part.val, part.record(root)


def keep_record(run_dir: str | Path, record: dict[str, Any] | None, resume: bool) -> None:
    """Write the validation part into the run directory (once every input has been checked, so a
    refused run writes nothing); a resumed run whose data now gives another part is refused."""
    if record is None:
        return
    path = Path(run_dir) / VALIDATION_FILE
    if resume and path.is_file():
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            kept = None  # damaged: it cannot vouch for the part either
        if kept != record:
            raise FinegrainError(f"The data now gives another validation part than {path} records (images were "
                                 "added, removed or renamed, or the file is damaged). Resume on the data the run "
                                 "started with, or start a new run with another --out.")
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")


def kept_rows(everything: Split, kept: Split) -> list[int]:
    """The positions in `everything` of the samples `kept` holds (rows of a per-image table)."""
    wanted = set(kept.samples)
    return [i for i, sample in enumerate(everything.samples) if sample in wanted]


def evaluate_test_once(trainer: Trainer) -> dict[str, dict[str, float]]:
    """At the end of a select_on=val run: the test split's figures of the best and the last
    weights (and the EMA's), added to the rows of their epochs. A run that already has them
    (resumed after it ended) is not evaluated again."""
    metric, rows = trainer.task.best_metric, trainer.rows
    last, best_epoch = rows[-1], trainer.best["epoch"]
    best = next(row for row in rows if row["epoch"] == best_epoch)
    key = metric_key("test", metric)
    if key not in last or key not in best:
        last.update(prefixed(trainer.evaluate_on(trainer.test_set), "test"))
        if trainer.ema is not None:
            last.update(prefixed(trainer.evaluate_on(trainer.test_set, trainer.ema.module), "test", ema=True))
        if best is not last:
            model = copy.deepcopy(trainer.model)
            state, _ = read_weights(trainer.run_dir / "best.safetensors")
            model.load_state_dict(state)
            best.update(prefixed(trainer.evaluate_on(trainer.test_set, model), "test"))
        trainer.write_rows()
    figures = {name: {k: v for k, v in row.items() if k.startswith("test_")}
               for name, row in (("best", best), ("last", last))}
    trainer.echo(f"test split, evaluated once: best (epoch {best_epoch}) {key} {best[key]:.4g}, "
                 f"last (epoch {last['epoch']}) {key} {last[key]:.4g}")
    return figures
