"""Training batches whose order and augmentation depend only on (seed, epoch), so that a
resumed run sees exactly the batches an uninterrupted run would have seen.

Mixup type 1 mixes two independently loaded mini-batches: finegrain.data's PairedBatchSampler
yields 2B indices per step (B from the epoch's order, B from an independent one), the same
workers decode both halves and the trainer splits them. Augmentations draw from torch's RNG,
which DataLoader seeds per worker from the loader's generator, seeded here from (seed, epoch).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from finegrain.data.samplers import EpochSampler, PairedBatchSampler
from finegrain.distributed import DistInfo, rank_slice
from finegrain.errors import FinegrainError


class EpochBatches(Sampler[list[int]]):
    """Full batches (the last partial one dropped) of a seeded per-epoch order;
    `set_epoch(e, skip=k)` replays epoch e from batch k. `paired`: 2B indices per batch."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, paired: bool = False) -> None:
        if batch_size > num_samples:
            raise FinegrainError(f"The batch size {batch_size} exceeds the {num_samples} training images. "
                                 "Lower train.batch_size (e.g. --set train.batch_size=32).")
        self.num_samples, self.batch_size, self.seed, self.paired = num_samples, batch_size, seed, paired
        self.epoch, self.skip = 0, 0
        self._order = EpochSampler(num_samples, seed)
        self._batches: Sampler[list[int]] = (PairedBatchSampler(num_samples, batch_size, seed) if paired
                                             else BatchSampler(self._order, batch_size, drop_last=True))

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        if self.paired:
            self._batches.set_epoch(epoch, skip)  # type: ignore[attr-defined]
        else:
            self._order.set_epoch(epoch, skip * self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "skip": self.skip}


class RankBatches(Sampler[list[int]]):
    """This process's share of every global batch under torchrun: the global order depends only
    on (seed, epoch), so every world size sees the same global batches (and can resume another's
    run). Paired batches (Mixup type 1) are split half by half."""

    def __init__(self, batches: Sampler[list[int]], dist_info: DistInfo) -> None:
        self.batches, self.dist = batches, dist_info

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self.dist.rank, self.dist.world_size
        for batch in self.batches:
            if getattr(self.batches, "paired", False):
                half = len(batch) // 2
                yield rank_slice(batch[:half], rank, world) + rank_slice(batch[half:], rank, world)
            else:
                yield rank_slice(batch, rank, world)


def epoch_loader(dataset: Dataset, batches: Sampler[list[int]], workers: int, pin_memory: bool,
                 rank: int = 0) -> DataLoader:
    """A DataLoader over the sampler's current epoch (build a fresh one after each `set_epoch`).

    Its generator, seeded from (seed, epoch), fixes the workers' seeds, so a resumed epoch
    repeats its augmentations; with no workers they come from the main RNG, which the resume
    state restores.
    """
    source = getattr(batches, "batches", batches)  # RankBatches wraps the seeded sampler
    generator = torch.Generator().manual_seed(source.seed * 100_003 + source.epoch + 7919 * rank)
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
                      generator=generator, persistent_workers=False)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """In-order evaluation batches (the last one may be short); a fixed generator, so creating
    it never consumes the global RNG that training's resume state restores."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0))
