"""Knowledge distillation from offline teacher logits (the paper's KD, Section 3.2): the logits
file (its one writer and its reader), matching it to a training split, the KD loss and the
recipe check. Computing the logits with a teacher network is finegrain.train.teacher_logits.

File format (safetensors): tensor "logits" [N, C] float32; metadata "finegrain.paths" (JSON list
of the N image paths, in row order, relative to the data root so that a data set that moves keeps
its logits), "finegrain.num_classes", "finegrain.teacher" (a fingerprint of the teacher, e.g. its
weights' sha256) and, from `finegrain teacher-logits`, the class names, the teacher's
preprocessing and architecture. Training refuses a file whose paths, count, class count or class
names do not match the training split, naming what differs.

Loss shapes: logits and teacher logits [B, C]; lam [B] float (weight of the first sample of each
Mixup pair); probabilities [B, C].
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

from finegrain.data import Sample, Split
from finegrain.errors import FinegrainError
from finegrain.models.checkpoint import write_safetensors
from finegrain.models.metadata import (TEACHER_PATHS, CheckpointInfo, check_classes, parse_metadata, read_header,
                                       to_metadata)
from finegrain.recipes import Recipe
from finegrain.train.losses import soft_cross_entropy
from finegrain.train.mixup import mix_tensors

# ---------------------------------------------------------------------------- the logits file


def save_teacher_logits(path: str | Path, paths: Sequence[str], logits: torch.Tensor, info: CheckpointInfo) -> Path:
    """Write logits [N, C] for the images `paths` (same order), atomically: the one writer of
    the format. `info` carries the teacher's fingerprint, classes and preprocessing."""
    if logits.ndim != 2 or logits.shape[0] != len(paths):
        raise FinegrainError(f"Teacher logits must be [N, C] with N = {len(paths)} paths, got {tuple(logits.shape)}. "
                             "Compute one row per image.")
    info = dataclasses.replace(info, num_classes=logits.shape[1],
                               extra={**info.extra, TEACHER_PATHS: json.dumps(list(paths))})
    return write_safetensors({"logits": logits.detach().float().cpu().contiguous()}, path, to_metadata(info))


def load_teacher_logits(path: str | Path, paths: Sequence[str], num_classes: int) -> torch.Tensor:
    """Rows of the teacher-logit file for `paths`, in that order: [len(paths), num_classes]."""
    path = Path(path)
    if not path.is_file():
        raise FinegrainError(f"Teacher logits file {path} does not exist. Write it with `finegrain teacher-logits` "
                             "or set regularization.kd.logits=null.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            logits = handle.get_tensor("logits")
        file_paths = json.loads(metadata[TEACHER_PATHS])
    except Exception as error:  # damaged file, missing tensor or metadata
        raise FinegrainError(f"{path} is not a finegrain teacher-logits file ({error}). "
                             "Re-create it with `finegrain teacher-logits`.") from None
    if logits.shape[1] != num_classes:
        raise FinegrainError(f"Teacher logits {path} have {logits.shape[1]} classes, the training data has "
                             f"{num_classes}. Compute the logits with a teacher fine-tuned on these classes.")
    if len(file_paths) != len(paths):
        raise FinegrainError(f"Teacher logits {path} hold {len(file_paths)} images, the training split has "
                             f"{len(paths)}. Recompute them on this data set.")
    row_of = {p: i for i, p in enumerate(file_paths)}
    missing = [p for p in paths if p not in row_of]
    if missing:
        raise FinegrainError(f"Teacher logits {path} lack {len(missing)} training image(s), e.g. {missing[0]}. "
                             "Recompute them on this data set (same --data folder).")
    return logits[torch.tensor([row_of[p] for p in paths])].float()


def split_keys(samples: Sequence[Sample], root: str | Path) -> list[str]:
    """The logits keys of `samples`: their paths relative to the data root, '/'-separated."""
    return [Path(os.path.relpath(sample.path, root)).as_posix() for sample in samples]


def teacher_logits_for_split(path: str | Path, split: Split, root: str | Path) -> tuple[Tensor, dict[str, str]]:
    """The rows of a teacher-logits file for `split` (dataset order) and the file's metadata.

    Refuses, naming what differs, a file whose class count, image count, image paths or (when
    recorded) class names do not match the split.
    """
    logits = load_teacher_logits(path, split_keys(split.samples, root), len(split.classes))
    header = read_header(path)
    recorded = parse_metadata(header.metadata, path).classes
    check_classes(CheckpointInfo(classes=recorded), split.classes, f"The teacher of {path}", "the training data",
                  "Write the logits with a teacher fine-tuned on this data set")
    return logits, header.metadata


# ---------------------------------------------------------------------------- the loss


def teacher_probabilities(teacher_logits: Tensor, temperature: float, partner_logits: Tensor | None = None,
                          lam: Tensor | None = None) -> Tensor:
    """softmax(teacher / T), mixed with the partner's by the same Mixup lambda as the images."""
    probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    if partner_logits is None or lam is None:
        return probs
    return mix_tensors(probs, F.softmax(partner_logits.float() / temperature, dim=-1), lam)


def distillation_loss(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """T^2 * CE(student / T, teacher probabilities): the T^2 keeps gradient scale independent of T."""
    return temperature ** 2 * soft_cross_entropy(student_logits.float() / temperature, teacher_probs)


# ---------------------------------------------------------------------------- the recipe


def check_kd_settings(recipe: Recipe) -> None:
    """A recipe that distils (kd_required) must name its logits file: training without the
    teacher would silently miss the paper's accuracy."""
    if getattr(recipe, "kd_required", False) and not recipe.regularization.kd.logits:
        raise FinegrainError(
            f"Recipe {recipe.name} distils from a teacher (the paper's KD), but regularization.kd.logits is not set. "
            "Write the logits with `finegrain teacher-logits --weights TEACHER --data DIR --out FILE` and pass "
            "--teacher-logits FILE (regularization.kd.logits), or --set kd_required=false to train without KD.")
