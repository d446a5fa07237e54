"""Batch samplers whose batches depend only on (seed, epoch), so a resumed run sees the same
batches: the training batches, their per-process share under torchrun, and m-per-class batches
for pair-based retrieval losses.

A training batch sampler has the interface the trainer drives: `steps_per_epoch`,
`set_epoch(epoch, skip)` (replay epoch `epoch` from batch `skip`), `seed`, `epoch`, `skip`,
`paired` and `state_dict()`.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from finegrain.data.base import Split
from finegrain.distributed import DistInfo, rank_slice
from finegrain.errors import FinegrainError


def epoch_permutation(n: int, seed: int, epoch: int, stream: int = 0) -> np.ndarray:
    """A permutation of range(n) fixed by (seed, stream, epoch); `stream` separates independent orders."""
    if seed < 0 or epoch < 0:
        raise FinegrainError(f"Seeds and epochs must be >= 0 (got seed {seed}, epoch {epoch}). "
                             f"Use a non-negative seed.")
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


class EpochBatches(Sampler[list[int]]):
    """Full batches (the last partial one dropped) of a seeded per-epoch order.

    `paired` (Mixup type 1): each batch holds batch_size indices of the epoch's order followed
    by batch_size of an independent second order, the partners, so one worker pool decodes both.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, paired: bool = False) -> None:
        if batch_size > num_samples:
            raise FinegrainError(f"The batch size {batch_size} exceeds the {num_samples} training images. "
                                 "Lower train.batch_size (e.g. --set train.batch_size=32).")
        self.num_samples, self.batch_size, self.seed, self.paired = num_samples, batch_size, seed, paired
        self.epoch, self.skip = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= self.steps_per_epoch:
            raise FinegrainError(f"Cannot resume at batch {skip}: an epoch has {self.steps_per_epoch}. "
                                 f"Use 0..{self.steps_per_epoch}.")
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.steps_per_epoch - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        orders = [epoch_permutation(self.num_samples, self.seed, self.epoch, stream)
                  for stream in range(2 if self.paired else 1)]
        for batch in range(self.skip, self.steps_per_epoch):
            rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            yield [index for order in orders for index in order[rows].tolist()]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "skip": self.skip}


class RankBatches(Sampler[list[Any]]):
    """This process's share of every global batch under torchrun: the global batches depend only
    on (seed, epoch), so every world size sees the same ones (and can resume another's run).
    Paired batches (Mixup type 1) are split half by half."""

    def __init__(self, batches: Sampler[Sequence[Any]], dist_info: DistInfo, paired: bool) -> None:
        self.batches, self.dist, self.paired = batches, dist_info, paired

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[Any]]:
        rank, world = self.dist.rank, self.dist.world_size
        for batch in self.batches:
            batch = list(batch)
            if self.paired:
                half = len(batch) // 2
                yield rank_slice(batch[:half], rank, world) + rank_slice(batch[half:], rank, world)
            else:
                yield rank_slice(batch, rank, world)


class MPerClassBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` indices holding `m` images of each of batch_size / m classes, for
    pair-based retrieval losses. The draw is pytorch-metric-learning's MPerClassSampler, fed a
    numpy RNG fixed by (seed, epoch) instead of its global one. `length` indices per epoch
    (default: the split's size) are cut into whole batches.
    """

    def __init__(self, split: Split, m: int, batch_size: int, seed: int, length: int | None = None) -> None:
        num_classes = len(set(split.labels))
        if m < 1 or batch_size % m:
            raise FinegrainError(f"m={m} images per class must divide the batch size {batch_size}. Pick m accordingly.")
        if m * num_classes < batch_size:
            raise FinegrainError(f"A batch of {batch_size} with {m} per class needs {batch_size // m} classes; "
                                 f"the split has {num_classes}. Lower the batch size or m.")
        self.labels = np.asarray(split.labels)
        self.m, self.batch_size, self.seed = m, batch_size, seed
        self.length = max(length if length is not None else len(split), batch_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        # Imported here: pml pulls in scikit-learn, which classification runs never need.
        from pytorch_metric_learning.samplers import MPerClassSampler
        from pytorch_metric_learning.utils import common_functions

        sampler = MPerClassSampler(self.labels, self.m, batch_size=self.batch_size, length_before_new_iter=self.length)
        previous = common_functions.NUMPY_RANDOM
        seed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)
        common_functions.NUMPY_RANDOM = np.random.RandomState(seed)  # pml draws from this module global
        try:
            indices = [int(i) for i in sampler]
        finally:
            common_functions.NUMPY_RANDOM = previous
        for begin in range(0, len(indices) - self.batch_size + 1, self.batch_size):
            yield indices[begin:begin + self.batch_size]

    def __len__(self) -> int:
        return self.length // self.batch_size
