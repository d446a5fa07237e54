"""FGVC fine-tuning (paper Appendix B): a recipe plus data and backbone weights in, a run out.

`run_fgvc` is what `finegrain fgvc` calls; it builds the data, the model (warm-started from the
backbone), the classification task, and hands them to the core trainer.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from finegrain.data import Split, resolve_data_root
from finegrain.errors import FinegrainError
from finegrain.eval.classification import predict_logits, topk_accuracy
from finegrain.models import CheckpointInfo, DataRecord, create_model
from finegrain.models.metadata import to_metadata
from finegrain.preprocessing import Preprocessing
from finegrain.recipes import Recipe
from finegrain.train.resume import RESUME_FILE, seed_everything
from finegrain.train.selection import keep_record, kept_rows, validation_split
from finegrain.train.distill import distillation_loss, teacher_logits_for_split, teacher_probabilities
from finegrain.train.losses import smooth_targets, soft_cross_entropy
from finegrain.train.mixup import mixed_one_hot
from finegrain.train.trainer import Task, TrainBatch, Trainer
from finegrain.train.warm_start import warm_start

class ClassificationLoss(nn.Module):
    """CE(smoothed, Mixup-mixed labels) [+ T^2 * CE(student / T, mixed teacher probabilities)].

    Shapes: logits and teacher logits [B, C]; labels [B] int64; lam [B] float (weight of the first
    sample of each Mixup pair, 1 where there is no partner).
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.temperature = temperature

    def forward(self, logits: Tensor, labels: Tensor, partner_labels: Tensor | None = None,
                lam: Tensor | None = None, teacher_logits: Tensor | None = None,
                partner_teacher_logits: Tensor | None = None) -> Tensor:
        targets = smooth_targets(mixed_one_hot(labels, self.num_classes, partner_labels, lam), self.label_smoothing)
        loss = soft_cross_entropy(logits, targets)
        if teacher_logits is not None:
            probs = teacher_probabilities(teacher_logits, self.temperature, partner_teacher_logits, lam)
            loss = loss + distillation_loss(logits, probs, self.temperature)
        return loss


class ClassificationTask(Task):
    """Cross-entropy on (smoothed, mixed) labels [+ KD]; evaluated by top-1 / top-5 accuracy."""

    best_metric = "top1"

    def __init__(self, classes: list[str], label_smoothing: float = 0.0, temperature: float = 1.0,
                 teacher_logits: Tensor | None = None, data: DataRecord | None = None) -> None:
        self.classes = classes
        self.data = data  # recorded in the checkpoints, so `finegrain robustness` finds the data again
        self.criterion = ClassificationLoss(len(classes), label_smoothing, temperature)
        self.teacher_logits = teacher_logits  # [N_train, C] on the CPU, rows in dataset order

    def loss(self, model: nn.Module, batch: TrainBatch) -> Tensor:
        logits = model(batch.images)
        teacher = partner = None
        if self.teacher_logits is not None:
            # The table stays on the CPU (ImageNet's is 5 GB); only this batch's rows travel.
            teacher = self.teacher_logits[batch.indices.cpu()].to(batch.indices.device)
            if batch.partner_indices is not None:
                partner = self.teacher_logits[batch.partner_indices.cpu()].to(batch.indices.device)
        return self.criterion(logits, batch.labels, batch.partner_labels, batch.lam, teacher, partner)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device,
                 dtype: torch.dtype | None, channels_last: bool) -> dict[str, float]:
        logits, labels = predict_logits(model, loader, device, dtype, channels_last)
        return topk_accuracy(logits, labels, ks=(1, 5))

    def checkpoint_metadata(self) -> dict[str, str]:
        return to_metadata(CheckpointInfo(classes=tuple(self.classes), data=self.data, task="fgvc"))


def recipe_data_record(recipe: Recipe) -> DataRecord:
    """Where a run trains, as its checkpoints record it (an absolute folder: read from anywhere)."""
    root = resolve_data_root(recipe.data.root).resolve()
    return DataRecord(recipe.data.kind, str(root), dict(recipe.data.options))


def recipe_preprocessing(recipe: Recipe, base: Preprocessing) -> Preprocessing:
    """The backbone's normalisation with the recipe's image sizes where it sets them."""
    data = recipe.data
    sizes = {"train_size": data.train_size, "resize": data.eval_resize, "crop": data.eval_crop}
    return dataclasses.replace(base, **{k: v for k, v in sizes.items() if v is not None})


def fgvc_train_transform(pre: Preprocessing, data: Any, autoaugment: str | None) -> Callable:
    """The paper's training preset (data.crop_min_area sets its smallest crop), or, with
    data.augment false, the eval transform (deterministic training, e.g. to compare runs)."""
    from finegrain.data import transforms

    if not data.augment:
        return transforms.eval_transform(pre)
    return transforms.train_transform(pre, autoaugment, data.crop_min_area)


def build_fgvc_model(recipe: Recipe, num_classes: int, echo: Callable[[str], None],
                     resuming: bool = False) -> nn.Module:
    """The recipe's backbone with a fresh `num_classes` head, warm-started from model.weights.

    A resumed run warm-starts too (its resume state then replaces the weights), so the
    preprocessing adopted from the backbone file is the same as in the interrupted run.
    """
    model = warm_start(lambda name, overrides: create_model(name, num_classes=num_classes, **overrides), recipe,
                       echo, resuming, "Fine-tuning needs pretrained weights (--weights FILE) to reach the paper's "
                       "accuracy.")
    model.preprocessing = recipe_preprocessing(recipe, model.preprocessing)
    return model


def classification_splits(recipe: Recipe, run_dir: str | Path, resume: bool) -> tuple[Path, Split, Split]:
    """(data root, train, test) of a classification run (fine-tuning or pretraining), refusing to
    overwrite a run directory and splits whose class lists differ."""
    from finegrain.data import load_splits

    if not resume and (Path(run_dir) / RESUME_FILE).is_file():
        raise FinegrainError(f"{run_dir} already holds a run. Continue it with --resume, or pick another --out "
                             f"(or delete {Path(run_dir) / RESUME_FILE} to start again there).")
    root = resolve_data_root(recipe.data.root)
    splits = load_splits(recipe.data.kind, root, **recipe.data.options)
    train, test = splits["train"], splits["test"]
    if train.classes != test.classes:
        raise FinegrainError(f"The train and test splits have different classes ({len(train.classes)} vs "
                             f"{len(test.classes)}). Classification needs one class list; check --data.")
    return root, train, test


def classification_datasets(recipe: Recipe, pre: Preprocessing, train: Split, test: Split,
                            val: Split | None = None) -> dict[str, Any]:
    """The Trainer's data: train set with the recipe's augmentation, the selection split (the
    validation part, else the test split) and, when selecting on val, the test split, both with
    the eval transform."""
    from finegrain.data import ImageDataset
    from finegrain.data.transforms import eval_transform

    test_set = ImageDataset(test.samples, eval_transform(pre))
    return {"train_set": ImageDataset(train.samples, fgvc_train_transform(pre, recipe.data,
                                                                          recipe.regularization.autoaugment)),
            "eval_set": test_set if val is None else ImageDataset(val.samples, eval_transform(pre)),
            "test_set": None if val is None else test_set}


def run_fgvc(recipe: Recipe, run_dir: str | Path, resume: bool = False, device: torch.device | None = None,
             progress: bool = True, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune per `recipe` into `run_dir`; returns the trainer's summary (best and last rows)."""
    echo = echo or (lambda message: print(message, file=sys.stderr))
    root, everything, test = classification_splits(recipe, run_dir, resume)
    train, val, record = validation_split(recipe, root, everything)
    seed_everything(recipe.train.seed)  # the new head's initialisation
    model = build_fgvc_model(recipe, len(train.classes), echo, resuming=resume)
    regularization = recipe.regularization
    teacher = None
    if regularization.kd.logits:  # the file covers the whole training split, the validation part too
        teacher = teacher_logits_for_split(regularization.kd.logits, everything, root)[0][kept_rows(everything, train)]
    task = ClassificationTask(train.classes, regularization.label_smoothing, regularization.kd.temperature, teacher,
                              recipe_data_record(recipe))
    pre = model.preprocessing
    held_out = f"{len(val)} validation (selects best) / " if val is not None else ""
    echo(f"{recipe.name}: {len(train)} train / {held_out}{len(test)} test images, {len(train.classes)} classes, "
         f"{recipe.model.name} at {pre.train_size} (eval {pre.resize}->{pre.crop}), run dir {run_dir}")
    trainer = Trainer(recipe, model, task, run_dir=run_dir, device=device, progress=progress, echo=echo,
                      **classification_datasets(recipe, pre, train, test, val))
    keep_record(run_dir, record, resume)  # once every input has been checked
    return trainer.fit(resume=resume)

