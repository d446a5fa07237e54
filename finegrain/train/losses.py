"""Classification losses of the paper's recipes: label smoothing on soft (Mixup) targets and
knowledge distillation from offline teacher logits.

Shapes: logits and teacher logits [B, C]; labels [B] int64; lam [B] float (weight of the first
sample of each Mixup pair, 1 where there is no partner); targets and probabilities [B, C].
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from finegrain.train.mixup import mix_tensors, mixed_one_hot


def smooth_targets(targets: Tensor, smoothing: float) -> Tensor:
    """TF's label smoothing: targets * (1 - eps) + eps / C (applied after Mixup, as in the release)."""
    if smoothing == 0.0:
        return targets
    return targets * (1.0 - smoothing) + smoothing / targets.shape[-1]


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of -sum_c targets_c * log_softmax(logits)_c, computed in fp32."""
    return -(targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


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


class ClassificationLoss(nn.Module):
    """CE(smoothed, Mixup-mixed labels) [+ T^2 * CE(student / T, mixed teacher probabilities)]."""

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

