"""Mixup (Zhang et al. 2018) as the paper uses it: one lambda per sample from Beta(alpha, alpha).

Type 1 mixes two independently loaded batches (the paper's better variant, Table 4); type 2 mixes
a batch with a shuffled copy of itself. Both return soft targets [B, C] so that label smoothing
or distillation is applied by the loss; teacher probabilities are mixed with the same lambdas
via `mix_tensors`.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from finegrain.data.samplers import PairedBatchSampler
from finegrain.errors import FinegrainError


def sample_lambdas(batch_size: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """[B] float32 lambdas from Beta(alpha, alpha), drawn reproducibly from `generator`.

    torch's Beta sampler takes no generator, so numpy's draws them from a seed taken from it.
    """
    if alpha <= 0:
        raise FinegrainError(f"Mixup alpha must be > 0, got {alpha}. Use e.g. 0.2, or turn Mixup off.")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=batch_size).astype(np.float32))


def mix_tensors(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lam * a + (1 - lam) * b with lam [B] broadcast over the trailing dimensions of a, b [B, ...]."""
    weight = lam.to(device=a.device, dtype=a.dtype if a.is_floating_point() else torch.float32)
    weight = weight.view(-1, *([1] * (a.dim() - 1)))
    return weight * a + (1 - weight) * b


def soft_targets(y: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """[B] class indices -> one-hot [B, C] floats; [B, C] probabilities pass through."""
    if y.dim() == 2:
        return y.float()
    if num_classes is None:
        raise FinegrainError("Mixup of integer labels needs num_classes. Pass the number of classes.")
    return F.one_hot(y.long(), num_classes).float()


def mix_batches(x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor, lam: torch.Tensor,
                num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup type 1: images [B, C, H, W] and targets ([B] labels or [B, K] probabilities) of two
    batches -> mixed images and mixed soft targets [B, K]."""
    if x1.shape != x2.shape or len(lam) != len(x1):
        raise FinegrainError(f"Mixup needs two batches of one shape and one lambda per sample, got {tuple(x1.shape)}, "
                             f"{tuple(x2.shape)} and {len(lam)} lambdas. Drop the last partial batch.")
    return mix_tensors(x1, x2, lam), mix_tensors(soft_targets(y1, num_classes), soft_targets(y2, num_classes), lam)


def mix_with_shuffle(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, generator: torch.Generator,
                     num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup type 2: the batch mixed with itself in the order of `shuffle_order(len(x), generator)`."""
    order = shuffle_order(len(x), generator).to(x.device)
    return mix_batches(x, y, x[order], y[order], lam, num_classes)


def shuffle_order(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The partner order of type 2; draw it yourself to mix teacher probabilities the same way."""
    return torch.randperm(batch_size, generator=generator)


class TwoBatchLoader:
    """Pairs of independently shuffled batches for Mixup type 1, from one DataLoader over one data set.

    Each DataLoader batch holds both halves (one worker pool, one prefetch queue), split on the way
    out. The order depends only on (seed, epoch): `set_epoch(e, start_batch)` and the state dict
    make a resumed run see the same pairs.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, **loader_kwargs: Any) -> None:
        self.batch_size = batch_size
        self.sampler = PairedBatchSampler(len(dataset), batch_size, seed)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, **loader_kwargs)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[list[Any], list[Any]]]:
        for batch in self.loader:
            yield [part[:self.batch_size] for part in batch], [part[self.batch_size:] for part in batch]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.sampler.seed, "epoch": self.sampler.epoch, "start_batch": self.sampler.start_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]), int(state["start_batch"]))
