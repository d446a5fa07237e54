"""Label losses of the paper's classification recipes: TF's label smoothing and cross-entropy on
soft (Mixup-mixed, smoothed or teacher) targets. The classification criterion that combines them
with knowledge distillation is finegrain.train.fgvc.ClassificationLoss; the KD term is
finegrain.train.distill.

Shapes: logits [B, C]; targets [B, C].
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def smooth_targets(targets: Tensor, smoothing: float) -> Tensor:
    """TF's label smoothing: targets * (1 - eps) + eps / C (applied after Mixup, as in the release)."""
    if smoothing == 0.0:
        return targets
    return targets * (1.0 - smoothing) + smoothing / targets.shape[-1]


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of -sum_c targets_c * log_softmax(logits)_c, computed in fp32."""
    return -(targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()
