"""Decoding images in DataLoader workers, tolerating the odd corrupt file of a large data set."""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from finegrain.data.base import Sample
from finegrain.errors import FinegrainError

# A bad file is judged against at least this many samples seen (or the whole set when smaller), so
# one corrupt image early in an epoch does not abort a run that max_bad_fraction would allow.
_MIN_JUDGED = 100


class BadImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


def decode_rgb(path: str) -> np.ndarray:
    """HxWx3 uint8 RGB array of an image file (any mode PIL reads: grey, CMYK, palette, alpha)."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy needs one


class ImageDataset(Dataset):
    """Items `(transform(rgb_uint8_hwc), label, index)`; with no transform, a uint8 CHW tensor.

    An undecodable image is warned about once (with its path), counted, and replaced by the next
    decodable sample so batches stay full; `index` is the sample actually returned, so per-sample
    data (teacher logits) stays aligned. More than `max_bad_fraction` bad among the samples seen
    raises FinegrainError. Counts live in shared memory, so `bad_count` includes what DataLoader
    workers found.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[np.ndarray], Any] | None = None,
                 max_bad_fraction: float = 0.01) -> None:
        if not samples:
            raise FinegrainError("ImageDataset got no samples. Check the data set with `finegrain data info`.")
        if not 0.0 <= max_bad_fraction < 1.0:
            raise FinegrainError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}. Use e.g. 0.01.")
        self.samples = list(samples)
        self.transform = transform
        self.max_bad_fraction = max_bad_fraction
        self._bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
        self._seen = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def bad_count(self) -> int:
        return int(self._bad.sum())

    @property
    def bad_paths(self) -> list[str]:
        return [self.samples[i].path for i in torch.nonzero(self._bad).flatten().tolist()]

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        for offset in range(len(self.samples)):
            current = (index + offset) % len(self.samples)
            if self._bad[current]:
                continue
            image = self._decode(current)
            if image is not None:
                sample = self.samples[current]
                if self.transform is None:
                    return torch.from_numpy(image).permute(2, 0, 1), sample.label, current
                return self.transform(image), sample.label, current
        raise FinegrainError(f"None of the {len(self.samples)} images can be decoded, e.g. {self.samples[index].path}. "
                             f"Check the data set folder.")

    def _decode(self, index: int) -> np.ndarray | None:
        """The image as RGB uint8, or None after recording it as bad (and failing if too many are)."""
        self._seen[index] = True
        path = self.samples[index].path
        try:
            return decode_rgb(path)
        except Exception as error:  # noqa: BLE001 - any decoder failure on untrusted files means "bad image"
            self._bad[index] = True
            warnings.warn(f"Skipping {path}: it cannot be decoded as an image ({error}).", BadImageWarning,
                          stacklevel=3)
        bad, seen = int(self._bad.sum()), int(self._seen.sum())
        if bad > self.max_bad_fraction * max(seen, min(len(self.samples), _MIN_JUDGED)):
            raise FinegrainError(
                f"{bad} of {seen} images read so far cannot be decoded (more than {self.max_bad_fraction:.1%}), "
                f"e.g. {path}. List them with `finegrain data info --check-images` and fix or remove them.")
        return None


def _is_decodable(path: str) -> bool:
    """Decode fully but at reduced scale (JPEG draft mode): truncation is still caught, 8x faster."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means "bad image"
        return False


def check_images(samples: Sequence[Sample], workers: int = 8, progress: bool = True) -> list[str]:
    """Paths of the images that cannot be decoded, sorted (threads: PIL decodes without the GIL)."""
    paths = [sample.path for sample in samples]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(_is_decodable, paths), total=len(paths), desc="checking images",
                            unit="img", disable=not progress, leave=False))
    return sorted(path for path, ok in zip(paths, results) if not ok)
