"""DataLoaders for training and evaluation whose every random draw is a pure function of
(seed, epoch, step, position in the batch), so a resumed run sees exactly the images an
uninterrupted run would have seen, whatever the number of workers or where the run stopped.

The batch order comes from the batch sampler (finegrain.data.samplers). Augmentation draws from
torch's RNG (finegrain.data.transforms seeds albumentations from it; torchvision's AutoAugment
uses it directly); `SeededSamples` seeds it per sample from the sample's place in the run, in
whichever process decodes the sample, instead of letting it run on from a worker's start seed.
"""
from __future__ import annotations

import signal
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finegrain.data.samplers import RankBatches
from finegrain.distributed import DistInfo

# Tags a sample's augmentation seed (see `augmentation_seed`) apart from the other seeded draws.
_AUGMENTATION_STREAM = 0x41554721


def augmentation_seed(seed: int, epoch: int, step: int, position: int) -> int:
    """The seed of one sample's augmentation: position `position` of global batch `step` of `epoch`."""
    return int(np.random.SeedSequence([seed, _AUGMENTATION_STREAM, epoch, step, position]).generate_state(1, np.uint64)[0])


class PlacedBatches(Sampler[list[tuple[int, int, int, int]]]):
    """Each index of the sampler's current epoch with its place (index, epoch, step, position),
    numbered in the global batch before any per-process split."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        epoch = self.batches.epoch
        for step, batch in enumerate(self.batches, start=self.batches.skip):
            yield [(index, epoch, step, position) for position, index in enumerate(batch)]


class SeededSamples(Dataset):
    """`dataset[index]` decoded with torch's RNG seeded from the sample's place in the run
    (the caller's RNG state is restored afterwards)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, place: tuple[int, int, int, int]) -> Any:
        index, epoch, step, position = place
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(augmentation_seed(self.seed, epoch, step, position))
            return self.dataset[index]


def ignore_interrupts(worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process, which stops at a step boundary and then shuts
    them down (a worker that took the signal itself would exit and fail the epoch)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_loader(dataset: Dataset, batches: Any, workers: int, pin_memory: bool,
                 dist_info: DistInfo | None = None) -> DataLoader:
    """A DataLoader over the batch sampler's current epoch (build a fresh one after each
    `set_epoch`); under torchrun, this process's share of each global batch.

    Its generator, seeded from (seed, epoch, rank), fixes the workers' base seeds, so building it
    never draws from the global RNG.
    """
    placed: Sampler = PlacedBatches(batches)
    rank = 0
    if dist_info is not None and dist_info.enabled:
        placed, rank = RankBatches(placed, dist_info, batches.paired), dist_info.rank
    generator = torch.Generator().manual_seed(batches.seed * 100_003 + batches.epoch + 7919 * rank)
    return DataLoader(SeededSamples(dataset, batches.seed), batch_sampler=placed, num_workers=workers,
                      pin_memory=pin_memory, generator=generator, persistent_workers=False,
                      worker_init_fn=ignore_interrupts if workers else None)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """In-order evaluation batches (the last one may be short); a fixed generator, so creating
    it never consumes the global RNG."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0),
                      worker_init_fn=ignore_interrupts if workers else None)
