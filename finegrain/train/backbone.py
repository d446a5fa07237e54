"""Backbone pretraining (paper Section 3, Tables 7 and 9): a recipe plus an ImageNet-style data
set in, a run directory out, whose checkpoints are the `--weights` of `finegrain fgvc` and
`finegrain retrieval`.

Pretraining is FGVC's classification task started from random initialisation with the backbone
recipe (lr 0.4 at batch 1024, weight decay 1e-4, LS + Mixup + DropBlock + offline KD +
AutoAugment), so it reuses finegrain.train.fgvc's task, transforms and sizes and the core
trainer's run directory and exact resume. Only the model (no warm start needed), the KD file
(keyed by path relative to the data root) and the provenance metadata differ.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from finegrain.models import CheckpointInfo, DataRecord, create_model
from finegrain.models.metadata import TEACHER, to_metadata
from finegrain.recipes import Recipe
from finegrain.train.distill import check_kd_settings, teacher_logits_for_split
from finegrain.train.fgvc import (ClassificationTask, classification_datasets, classification_splits,
                                  recipe_data_record, recipe_preprocessing)
from finegrain.train.resume import seed_everything
from finegrain.train.selection import keep_record, kept_rows, validation_split
from finegrain.train.trainer import Trainer
from finegrain.train.warm_start import warm_start


class BackboneTask(ClassificationTask):
    """FGVC's classification task; checkpoints also say they are pretraining runs and which
    teacher (if any) distilled into them."""

    def __init__(self, classes: list[str], label_smoothing: float, temperature: float,
                 teacher_logits: torch.Tensor | None, teacher: str | None, data: DataRecord | None = None) -> None:
        super().__init__(classes, label_smoothing, temperature, teacher_logits, data)
        self.teacher = teacher

    def checkpoint_metadata(self) -> dict[str, str]:
        return {**super().checkpoint_metadata(), **to_metadata(CheckpointInfo(task="backbone", kd_teacher=self.teacher))}


def build_backbone_model(recipe: Recipe, num_classes: int, echo: Callable[[str], None],
                         resuming: bool = False) -> nn.Module:
    """The recipe's network from random initialisation (zero-gamma where the family has it), or
    warm-started from model.weights (e.g. continuing on a domain corpus after ImageNet)."""
    model = warm_start(lambda name, overrides: create_model(name, num_classes=num_classes, **overrides), recipe,
                       echo, resuming, without_weights=None)
    model.preprocessing = recipe_preprocessing(recipe, model.preprocessing)
    return model


def run_backbone(recipe: Recipe, run_dir: str | Path, resume: bool = False, device: torch.device | None = None,
                 progress: bool = True, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Pretrain per `recipe` on data.root (train/ + val/ or test/ class folders, or one folder of
    class folders split by data.options.test_fraction) into `run_dir`; returns the trainer's
    summary (best and last rows)."""
    echo = echo or (lambda message: print(message, file=sys.stderr))
    check_kd_settings(recipe)
    root, everything, held_out = classification_splits(recipe, run_dir, resume)
    train, val, record = validation_split(recipe, root, everything)
    regularization = recipe.regularization
    teacher_logits = teacher = None
    if regularization.kd.logits:  # the file covers the whole training split, the validation part too
        teacher_logits, metadata = teacher_logits_for_split(regularization.kd.logits, everything, root)
        teacher_logits, teacher = teacher_logits[kept_rows(everything, train)], metadata.get(TEACHER)
    seed_everything(recipe.train.seed)  # the random initialisation
    model = build_backbone_model(recipe, len(train.classes), echo, resuming=resume)
    task = BackboneTask(train.classes, regularization.label_smoothing, regularization.kd.temperature,
                        teacher_logits, teacher, recipe_data_record(recipe))
    pre = model.preprocessing
    datasets = classification_datasets(recipe, pre, train, held_out, val)
    echo(f"{recipe.name}: pretraining {recipe.model.name} on {len(train)} images / {len(train.classes)} classes "
         f"(evaluated on {len(held_out)}), train {pre.train_size} px, eval {pre.resize}->{pre.crop}, "
         f"lr {recipe.effective_lr():.4g} at batch {recipe.train.batch_size}"
         f"{', KD from ' + str(regularization.kd.logits) if teacher_logits is not None else ''}, run dir {run_dir}")
    trainer = Trainer(recipe, model, task, run_dir=run_dir, device=device, progress=progress, echo=echo, **datasets)
    keep_record(run_dir, record, resume)  # once every input has been checked
    return trainer.fit(resume=resume)
