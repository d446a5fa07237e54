"""Mixup (Zhang et al. 2018) as the paper uses it: one lambda per sample from Beta(alpha, alpha).

Type 1 mixes two independently loaded batches (the paper's better variant, Table 4): the loader
sends each step's B samples followed by B partners from an independent epoch order
(finegrain.data.samplers.EpochBatches with `paired`). Type 2 mixes a batch with a shuffled copy
of itself. The images are mixed here; the labels become soft targets in the loss
(`mixed_one_hot`), and teacher probabilities are mixed there with the same lambdas.

Every draw (lambdas, type 2's partners) is a pure function of (seed, step, rank), so a resumed
run repeats them whatever step it resumes at.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from finegrain.errors import FinegrainError

_MIXUP_STREAM = 0x4D495850  # tags Mixup's draws apart from the other seeded streams


def sample_lambdas(count: int, alpha: float, rng: np.random.Generator) -> Tensor:
    """[count] float32 lambdas from Beta(alpha, alpha) (torch's Beta sampler takes no generator)."""
    if alpha <= 0:
        raise FinegrainError(f"Mixup alpha must be > 0, got {alpha}. Use e.g. 0.2, or turn Mixup off.")
    return torch.from_numpy(rng.beta(alpha, alpha, size=count).astype(np.float32))


def mix_tensors(a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
    """lam * a + (1 - lam) * b with lam [B] broadcast over the trailing dimensions of a, b [B, ...]."""
    weight = lam.to(device=a.device, dtype=a.dtype if a.is_floating_point() else torch.float32)
    weight = weight.view(-1, *([1] * (a.dim() - 1)))
    return weight * a + (1 - weight) * b


def mixed_one_hot(labels: Tensor, num_classes: int, partner_labels: Tensor | None = None,
                  lam: Tensor | None = None) -> Tensor:
    """lam * onehot(labels) + (1 - lam) * onehot(partner_labels): Mixup's soft targets [B, C]."""
    targets = F.one_hot(labels, num_classes).float()
    if partner_labels is None or lam is None:
        return targets
    return mix_tensors(targets, F.one_hot(partner_labels, num_classes).float(), lam)


@dataclass
class TrainBatch:
    """One training step's input. With Mixup, images are already mixed:
    lam * images[first] + (1 - lam) * images[partner]."""

    images: Tensor  # [B, 3, H, W] on the device
    labels: Tensor  # [B] int64
    indices: Tensor  # [B] dataset indices (teacher logits are looked up by them)
    partner_labels: Tensor | None = None  # [B]
    partner_indices: Tensor | None = None  # [B]
    lam: Tensor | None = None  # [B] weight of the first sample, from Beta(alpha, alpha)


class Mixup:
    """The recipe's Mixup for one process: `kind` 1, 2 or None (off)."""

    def __init__(self, kind: int | None, alpha: float, seed: int, rank: int = 0) -> None:
        self.kind, self.alpha, self.seed, self.rank = kind, alpha, seed, rank

    @property
    def paired(self) -> bool:
        """Whether each loaded batch must carry its partners (type 1)."""
        return self.kind == 1

    def draws(self, step: int) -> np.random.Generator:
        """The RNG of global step `step` on this process."""
        return np.random.default_rng([self.seed, _MIXUP_STREAM, step, self.rank])

    def __call__(self, images: Tensor, labels: Tensor, indices: Tensor, step: int) -> TrainBatch:
        """The training batch of global step `step` from its loaded images, labels and indices."""
        if self.kind is None:
            return TrainBatch(images, labels, indices)
        rng = self.draws(step)
        if self.kind == 1:  # the loader sent B samples, then their B partners
            half = len(labels) // 2
            images, partner_images = images[:half], images[half:]
            labels, partner_labels = labels[:half], labels[half:]
            indices, partner_indices = indices[:half], indices[half:]
        else:
            order = torch.from_numpy(rng.permutation(len(labels))).to(labels.device)
            partner_images, partner_labels, partner_indices = images[order], labels[order], indices[order]
        lam = sample_lambdas(len(labels), self.alpha, rng).to(labels.device)
        return TrainBatch(mix_tensors(images, partner_images, lam), labels, indices, partner_labels, partner_indices, lam)
