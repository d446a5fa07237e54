"""Samplers whose order depends only on (seed, epoch), so a resumed run sees the same batches."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from finegrain.data.base import Split
from finegrain.errors import FinegrainError


def epoch_permutation(n: int, seed: int, epoch: int, stream: int = 0) -> np.ndarray:
    """A permutation of range(n) fixed by (seed, stream, epoch); `stream` separates independent orders."""
    if seed < 0 or epoch < 0:
        raise FinegrainError(f"Seeds and epochs must be >= 0 (got seed {seed}, epoch {epoch}). "
                             f"Use a non-negative seed.")
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


class EpochSampler(Sampler[int]):
    """Shuffles range(n) anew each epoch; `set_epoch(e, start)` replays epoch e from position `start`.

    Unlike RandomSampler, the order is not drawn from a global RNG, so resuming needs only the
    epoch and the number of samples already consumed.
    """

    def __init__(self, n: int, seed: int, stream: int = 0) -> None:
        self.n, self.seed, self.stream = n, seed, stream
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.n:
            raise FinegrainError(f"Cannot resume at sample {start} of an epoch of {self.n}. Use 0..{self.n}.")
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_permutation(self.n, self.seed, self.epoch, self.stream)[self.start:].tolist())

    def __len__(self) -> int:
        return self.n - self.start

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "stream": self.stream, "epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.stream = int(state["seed"]), int(state["stream"])
        self.set_epoch(int(state["epoch"]), int(state["start"]))


class PairedBatchSampler(Sampler[list[int]]):
    """Each item: batch_size indices of one epoch order followed by batch_size of an independent one."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if batch_size > n:
            raise FinegrainError(f"Batch size {batch_size} exceeds the {n} training images. Lower the batch size.")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.n // self.batch_size:
            raise FinegrainError(f"Cannot resume at batch {start_batch}: an epoch has {self.n // self.batch_size}. "
                                 f"Use 0..{self.n // self.batch_size}.")
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[int]]:
        first, second = (epoch_permutation(self.n, self.seed, self.epoch, stream) for stream in (0, 1))
        for batch in range(self.start_batch, self.n // self.batch_size):
            rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            yield first[rows].tolist() + second[rows].tolist()

    def __len__(self) -> int:
        return self.n // self.batch_size - self.start_batch


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
