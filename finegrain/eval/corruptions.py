"""ImageNet-C corruptions of evaluation images, deterministic and cached on disk.

The corruptions come from `imagecorruptions` (the maintained `imagecorruptions-imaug` release,
which runs on numpy 2 / scikit-image >= 0.19 where the 2020 `imagecorruptions` 1.1.2 no longer
imports). As in the authors' mCE set generator, an image is first brought to the model's input
size (resize the short side to `Preprocessing.resize`, centre-crop `Preprocessing.crop`) and the
uint8 crop is corrupted, so every model is judged at the resolution it is evaluated at.

Determinism: most corruptions draw from numpy's *global* RNG, so each call seeds it from
sha256(crop digest, corruption, severity, seed), which does not depend on the order images are
processed in or on the worker that processes them, and restores the caller's RNG state after.
The two corruptions that take their own seed (impulse_noise, glass_blur) get the same value.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from finegrain.data.images import decode_rgb
from finegrain.errors import FinegrainError
from finegrain.fileio import atomic_path
from finegrain.preprocessing import Preprocessing

with warnings.catch_warnings():  # the library imports deprecated scipy/skimage names
    warnings.simplefilter("ignore")
    from imagecorruptions import corrupt, get_corruption_names
    from imagecorruptions import corruption_dict as _CORRUPTION_FUNCTIONS

# The 15 corruptions of mCE (noise, blur, weather, digital) and the 4 held-out ones.
CORRUPTIONS: tuple[str, ...] = tuple(get_corruption_names("common"))
VALIDATION_CORRUPTIONS: tuple[str, ...] = tuple(get_corruption_names("validation"))
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # imagecorruptions refuses images with a side under 32 pixels
_TAKES_SEED = frozenset(
    name for name, fn in _CORRUPTION_FUNCTIONS.items() if "seed" in inspect.signature(fn).parameters
)


def parse_names(names: str | list[str] | tuple[str, ...] | None, default: tuple[str, ...],
                valid: tuple[str, ...], what: str) -> list[str]:
    """Validate names (a comma-separated string or a list, duplicates dropped); None: `default`."""
    if names is None:
        return list(default)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise FinegrainError(
            f"Unknown {what}(s) {', '.join(map(repr, unknown)) or '(none given)'}. Choose from: {', '.join(valid)}."
        )
    return list(dict.fromkeys(names))


def parse_corruptions(names: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Validate corruption names; None means the 15 of mCE."""
    return parse_names(names, CORRUPTIONS, CORRUPTIONS + VALIDATION_CORRUPTIONS, "corruption")


def parse_severities(severities: str | list[int] | tuple[int, ...] | None) -> list[int]:
    """Validate severities (a comma-separated string or a list of ints in 1..5); None means all."""
    if severities is None:
        return list(SEVERITIES)
    if isinstance(severities, str):
        try:
            severities = [int(s) for s in severities.split(",") if s.strip()]
        except ValueError:
            raise FinegrainError(f"Severities {severities!r} are not integers. Pass e.g. 1,3,5.") from None
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise FinegrainError(f"Severity {bad or '(none given)'} is out of range. Use integers from 1 to 5.")
    return sorted(set(severities))


@functools.lru_cache(maxsize=8)
def _eval_geometry(preprocessing: Preprocessing) -> Any:
    """The resize + centre crop of `finegrain.data.transforms.eval_transform`, so clean top-1 here
    equals the one the classification evaluation reports."""
    from finegrain.data.transforms import eval_transform

    return eval_transform(preprocessing).geometry


def load_eval_resized(path: str | os.PathLike, preprocessing: Preprocessing) -> np.ndarray:
    """uint8 RGB image with its short side resized to `preprocessing.resize` (before the crop)."""
    return _eval_geometry(preprocessing).transforms[0](image=decode_rgb(str(path)))["image"]


def load_eval_crop(path: str | os.PathLike, preprocessing: Preprocessing) -> np.ndarray:
    """The uint8 RGB [crop, crop, 3] image the model sees: short side -> resize, centre crop."""
    return np.ascontiguousarray(_eval_geometry(preprocessing)(image=decode_rgb(str(path)))["image"])


def image_digest(image: np.ndarray) -> str:
    """Content hash of a uint8 image, shape included: the cache key for "this exact crop"."""
    digest = hashlib.sha256(repr((image.shape, str(image.dtype))).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def derived_seed(*parts: object) -> int:
    """A 32-bit seed that depends only on `parts`, never on call order or process."""
    text = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int,
                  digest: str | None = None) -> np.ndarray:
    """`image` (uint8 HxWx3) corrupted at `severity`, identical for identical inputs.

    Images with a side under 32 pixels are enlarged for the corruption and shrunk back, so a
    tiny input never crashes a run.
    """
    parse_corruptions([corruption])
    parse_severities([severity])
    digest = digest or image_digest(image)
    call_seed = derived_seed(digest, corruption, severity, seed)
    height, width = image.shape[:2]
    work = image
    if min(height, width) < MIN_SIDE:
        scale = MIN_SIDE / min(height, width)
        size = (max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale)))
        work = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    kwargs = {"seed": call_seed} if corruption in _TAKES_SEED else {}
    saved = np.random.get_state()
    try:
        np.random.seed(call_seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = corrupt(np.ascontiguousarray(work), severity=severity, corruption_name=corruption, **kwargs)
    finally:
        np.random.set_state(saved)
    out = np.asarray(out, dtype=np.uint8)
    if out.shape[:2] != (height, width):
        out = cv2.resize(out, (width, height), interpolation=cv2.INTER_AREA)
    return out


def corruption_library() -> str:
    """Name-version of the installed corruption code; part of the cache path, since another
    version may produce other pixels for the same seed."""
    for dist in ("imagecorruptions-imaug", "imagecorruptions"):
        try:
            return f"{dist}-{importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "imagecorruptions-unknown"


def default_cache_dir() -> Path:
    """$FINEGRAIN_CACHE/corruptions, else ~/.cache/finegrain/corruptions."""
    root = os.environ.get("FINEGRAIN_CACHE") or Path.home() / ".cache" / "finegrain"
    return Path(root).expanduser() / "corruptions"


@dataclass
class CorruptionCache:
    """Corrupted crops as lossless PNGs keyed by (crop hash, corruption, severity, seed, size).

    A second model evaluated at the same resolution reads the very same pixels instead of
    regenerating them. `root=None` disables the disk cache. `generated` / `reused` count calls
    in this process (DataLoader workers keep their own counts).
    """

    root: Path | None
    generated: int = 0
    reused: int = 0
    _library: str = field(default_factory=corruption_library, repr=False)

    def path_for(self, digest: str, corruption: str, severity: int, seed: int, shape: tuple[int, ...]) -> Path:
        assert self.root is not None
        name = f"{digest}-seed{seed}-{shape[0]}x{shape[1]}.png"
        return Path(self.root) / self._library / corruption / str(severity) / digest[:2] / name

    def get(self, image: np.ndarray, corruption: str, severity: int, seed: int) -> tuple[np.ndarray, bool]:
        """(corrupted image, whether it had to be generated)."""
        digest = image_digest(image)
        path = self.path_for(digest, corruption, severity, seed, image.shape) if self.root else None
        if path is not None and path.is_file():
            try:
                with Image.open(path) as cached:
                    out = np.asarray(cached.convert("RGB"), dtype=np.uint8)
                if out.shape == image.shape:
                    self.reused += 1
                    return out, False
            except OSError:
                pass  # a damaged cache entry is regenerated below
        out = corrupt_image(image, corruption, severity, seed, digest=digest)
        self.generated += 1
        if path is not None:
            with atomic_path(path) as tmp:
                Image.fromarray(out).save(tmp, format="PNG", compress_level=1)
        return out, True
