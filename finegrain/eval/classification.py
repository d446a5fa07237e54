"""Classification evaluation: logits over a loader, top-k accuracy as fractions in [0, 1]."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from finegrain.errors import FinegrainError
from finegrain.eval.inference import InferenceOptions, Predictor


def predict_logits(model: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None = None,
                   channels_last: bool = False, progress: bool = False) -> tuple[Tensor, Tensor]:
    """(logits [N, C] fp32 on the CPU, labels [N] int64) of `model` over `loader` (items
    `(images, labels, ...)`), in loader order, by the one predictor: the eager model in eval
    mode, `dtype` autocast, its train/eval mode restored after (this runs mid-training too)."""
    return Predictor(model, device, InferenceOptions(dtype=dtype, channels_last=channels_last)).predict(
        loader, progress=progress)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest logits, for each k.

    logits [N, C], labels [N]. Keys "top1", "top5", ...; a k above C counts every row as a hit
    (there are only C candidates). Ties follow torch.topk's order. Hits are counted as integers
    and divided in float64, so 144/160 is exactly 0.9 (a float32 mean gives 0.8999999761...).
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise FinegrainError(f"topk_accuracy needs logits [N, C] and labels [N], got {tuple(logits.shape)} "
                             f"and {tuple(labels.shape)}. Pass matching arrays.")
    if logits.shape[0] == 0:
        raise FinegrainError("topk_accuracy got no rows. Evaluate on a non-empty split.")
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices  # [N, max_k]
    hits = top.eq(labels.view(-1, 1).to(top.device))  # [N, max_k]
    rows = labels.shape[0]
    return {f"top{k}": int(hits[:, :min(k, max_k)].any(dim=1).sum()) / rows for k in ks}


def evaluate_classifier(weights: str | Path, data: str | Path, kind: str = "folder", split: str = "test",
                        batch_size: int = 64, workers: int = 2, device: torch.device | None = None,
                        progress: bool = True, allow_non_finite: bool = False) -> dict[str, float]:
    """Top-1 / top-5 of one of our classifier checkpoints on a data set split, at the eval
    preprocessing the checkpoint records. The checkpoint's class names (written by
    `finegrain fgvc`) must be the data set's, in the same order. Weights with NaN / inf are
    refused unless `allow_non_finite` (to inspect a run that diverged)."""
    from finegrain.data import ImageDataset, load_splits
    from finegrain.data.transforms import eval_transform
    from finegrain.models import check_classes, load_model
    from finegrain.runtime import default_device
    from finegrain.data.loaders import eval_loader

    device = device or default_device()
    model = load_model(weights, allow_non_finite=allow_non_finite).to(device)
    splits = load_splits(kind, data)
    if split not in splits:
        raise FinegrainError(f"The {kind} data set has no split {split!r}. Use one of: {', '.join(splits)}.")
    chosen = splits[split]
    check_classes(model.info, chosen.classes, str(weights), str(data),
                  "Evaluate it on the data set it was fine-tuned on, or fine-tune it on this one (`finegrain fgvc`)")
    loader = eval_loader(ImageDataset(chosen.samples, eval_transform(model.preprocessing)), batch_size, workers,
                         device.type == "cuda")
    logits, labels = predict_logits(model, loader, device, progress=progress)
    return {**topk_accuracy(logits, labels, ks=(1, 5)), "images": len(labels)}
