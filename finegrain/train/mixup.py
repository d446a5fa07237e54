"""Mixup (Zhang et al. 2018) as the paper uses it: one lambda per sample from Beta(alpha, alpha).

Type 1 mixes two independently loaded batches (the paper's better variant, Table 4): the loader
sends each step's B samples followed by B partners from an independent epoch order
(finegrain.data.samplers.EpochBatches with `paired`). Type 2 is the release's "shuffled clone"
(utils/data_util.py `mixup`, keep_batch_size=True): the batch's first half is mixed with its
second half, pair by pair, and again with the second half reversed, so B images give B mixed
ones, each first-half image twice. The images are mixed here; the labels become soft targets in
the loss (`mixed_one_hot`), and teacher probabilities are mixed there with the same lambdas (the
release mixes the one-hot labels instead of the teacher's in type 2's second half, a slip we do
not copy; docs/fidelity.md).

Every draw (the lambdas) is a pure function of (seed, step, rank), so a resumed run repeats them
whatever step it resumes at.
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


def release_type2_pairs(size: int) -> tuple[Tensor, Tensor]:
    """(first, partner) sample positions of type 2 for a batch of `size`: with h = size // 2,
    first = [0..h-1, 0..h-1], partner = [h..2h-1, 2h-1..h]. An odd batch's last sample (the release
    needs even per-GPU batches) is paired with itself, so it trains unmixed."""
    half = size // 2
    head = torch.arange(half)
    tail = torch.arange(half, 2 * half)
    odd = torch.arange(2 * half, size)
    return torch.cat([head, head, odd]), torch.cat([tail, tail.flip(0), odd])


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
            first, partner = (order.to(labels.device) for order in release_type2_pairs(len(labels)))
            partner_images, partner_labels, partner_indices = images[partner], labels[partner], indices[partner]
            images, labels, indices = images[first], labels[first], indices[first]
        lam = sample_lambdas(len(labels), self.alpha, rng).to(labels.device)
        return TrainBatch(mix_tensors(images, partner_images, lam), labels, indices, partner_labels, partner_indices, lam)
