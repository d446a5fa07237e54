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


def decode_rgb(path: str, draft: tuple[int, int] | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB array of an image file (a writable copy: torch.from_numpy needs one).

    Any mode PIL reads: grey, palette, alpha (dropped), CMYK, YCbCr, LAB; 16-bit and 32-bit grey
    and float images are scaled to 8 bits from their true range (PIL's own convert clips them, so
    a 16-bit PNG would turn white). Images over PIL's pixel limit are refused before decoding.
    `draft` decodes JPEGs at reduced scale, for a quick check that the whole file decodes.
    """
    with _open_bounded(path) as image:
        if draft is not None:
            image.draft("RGB", draft)
        if image.mode in _SIXTEEN_BIT or image.mode == "I":
            grey = _integer_grey(image, path)
        elif image.mode == "F":
            grey = _float_grey(image, path)
        else:
            return np.array(image.convert("RGB"))
    return np.repeat(grey[:, :, None], 3, axis=2)


_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _open_bounded(path: str) -> Image.Image:
    """Image.open, refusing an image of more pixels than PIL's decompression-bomb limit before decoding it.

    The limit is PIL's `Image.MAX_IMAGE_PIXELS` (about 89 million), read at each call so that a
    user who trusts their giant images can raise it there.
    """
    limit = Image.MAX_IMAGE_PIXELS
    fix = ("Downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file (a small file can "
           "decode to gigabytes)")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise FinegrainError(f"{path} is too large to decode safely ({error}). {fix}.") from None
    width, height = image.size
    if limit is not None and width * height > limit:
        image.close()
        raise FinegrainError(f"{path} is too large to decode safely: {width}x{height} = {width * height:,} pixels, "
                             f"more than the limit of {limit:,}. {fix}.")
    if width < 1 or height < 1:
        image.close()
        raise FinegrainError(f"{path} is {width}x{height} pixels: an image needs at least one. Remove the file.")
    return image


def _integer_grey(image: Image.Image, path: str) -> np.ndarray:
    """16- or 32-bit integer grey scaled to 0..255.

    PIL's 32-bit mode I mostly holds 16-bit samples (16-bit PNG, PGM and TIFF decode to it), so
    values up to 65535 are scaled as 16-bit, wider ones by the 32-bit range; negative values have
    no brightness and are refused.
    """
    values = np.asarray(image)
    tags = getattr(image, "tag_v2", None)  # a TIFF: BitsPerSample (258), SampleFormat (339, 2 = signed)
    if image.mode == "I" and tags is not None and _first(tags.get(258)) == 32 and _first(tags.get(339, 1)) != 2:
        values = values.view(np.uint32)  # PIL holds unsigned 32-bit samples wrapped into int32
    low, high = int(values.min()), int(values.max())
    if low < 0:
        raise FinegrainError(f"{path} has negative pixel values (down to {low}), which have no brightness. "
                             f"Save it as an unsigned 8- or 16-bit image.")
    full = 65535 if high <= 65535 else int(np.iinfo(values.dtype).max)
    return np.rint(values.astype(np.float32) * np.float32(255 / full)).astype(np.uint8)


def _float_grey(image: Image.Image, path: str) -> np.ndarray:
    """Floating-point grey: 0..1 (the usual float convention) scaled to 0..255, or 0..255 as it is."""
    values = np.asarray(image, dtype=np.float32)
    if not np.isfinite(values).all():
        raise FinegrainError(f"{path} holds NaN or infinite pixel values. Save it again as an 8- or 16-bit image.")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        raise FinegrainError(f"{path}: floating-point pixel values {low:g}..{high:g} are outside both 0..1 and "
                             f"0..255, so their brightness is unknown. Save it as an 8- or 16-bit image.")
    return np.rint(values * (255.0 if high <= 1 else 1.0)).astype(np.uint8)


def _first(value: object) -> object:
    """A TIFF tag's first value (per-sample tags are tuples)."""
    return value[0] if isinstance(value, tuple) and value else value


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
    """Decode as training would, but JPEGs at reduced scale (draft mode): truncation is still caught, 8x faster."""
    try:
        decode_rgb(path, draft=(64, 64))
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
