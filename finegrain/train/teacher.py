"""Offline teacher logits for knowledge distillation: computed once, stored keyed by image path.

File format (safetensors): tensor "logits" [N, C] float32; metadata "finegrain.paths" (JSON list
of the N image paths, in row order), "finegrain.num_classes" and "finegrain.teacher" (a
fingerprint of the teacher, e.g. its weights' sha256). Training refuses a file whose paths,
count or class count do not match the training split, naming what differs.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from finegrain.errors import FinegrainError
from finegrain.models.checkpoint import write_safetensors
from finegrain.models.metadata import TEACHER, TEACHER_PATHS, CheckpointInfo, to_metadata


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
