"""Data sets in their native layouts, decoding, the paper's transforms, samplers and loaders.

`transforms`, `samplers` and `loaders` load on first use (albumentations and
pytorch-metric-learning take seconds to import; `finegrain data info` needs neither).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from finegrain.data import aircraft, cars, csv_layout, cub, flowers, food101, inshop, pets, sop  # noqa: F401 - register readers
from finegrain.data.base import IMAGE_EXTENSIONS, Sample, Split, kinds, layout_of, load_splits
from finegrain.data.folder import DEMO_ROOT, demo_root, resolve_data_root
from finegrain.data.images import BadImageWarning, ImageDataset, check_images, decode_rgb

_LAZY_SUBMODULES = ("transforms", "samplers", "loaders")

__all__ = [
    "BadImageWarning", "DEMO_ROOT", "IMAGE_EXTENSIONS", "ImageDataset", "Sample", "Split", "check_images",
    "decode_rgb", "demo_root", "kinds", "layout_of", "load_splits", "resolve_data_root", *_LAZY_SUBMODULES,
]


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
