"""Stanford Cars (Krause et al. 2013), 196 classes: the FGVC split and the zero-shot retrieval split.

Both read the all-in-one annotation file `cars_annos.mat` (MATLAB, read with scipy.io), whose
rows give `relative_im_path`, `class` (1-196) and the official `test` flag.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finegrain.data.base import Split, load_mat, register, require_file, samples_from, zero_shot
from finegrain.errors import FinegrainError

LAYOUT = "ROOT/cars_annos.mat and ROOT/car_ims/*.jpg (paths as the .mat's relative_im_path gives them)"


def _read_annotations(root: Path, kind: str) -> tuple[Path, list[tuple[Path, int]], np.ndarray, list[str]]:
    """(mat path, [(image path, class id 1..196)], test flags, class names)."""
    path = require_file(root, "cars_annos.mat", kind)
    content = load_mat(path, ("annotations", "class_names"))
    annotations = content["annotations"]
    fields = ("relative_im_path", "class", "test")
    if annotations.dtype.names is None or not set(fields) <= set(annotations.dtype.names):
        raise FinegrainError(f"{path} is not Stanford Cars' cars_annos.mat: its annotations lack the fields "
                             f"{', '.join(fields)}. Use the file from the full (car_ims) download.")
    relative = np.atleast_1d(annotations["relative_im_path"])
    class_ids = np.atleast_1d(annotations["class"]).astype(int)
    flags = np.atleast_1d(annotations["test"]).astype(bool)
    entries = [(root / str(rel), int(class_id)) for rel, class_id in zip(relative, class_ids)]
    return path, entries, flags, [str(name) for name in np.atleast_1d(content["class_names"])]


@register("cars196", LAYOUT)
def load_cars196(root: Path) -> dict[str, Split]:
    """The official split by cars_annos.mat's test flag: 8,144 / 8,041 images, 196 classes, label = class - 1."""
    path, entries, flags, classes = _read_annotations(root, "cars196")
    _check_ids(entries, len(classes), path)
    named = [(image, classes[class_id - 1]) for image, class_id in entries]
    return {"train": Split(samples_from((e for e, test in zip(named, flags) if not test), classes, path), classes),
            "test": Split(samples_from((e for e, test in zip(named, flags) if test), classes, path), classes)}


@register("cars196_retrieval", LAYOUT)
def load_cars196_retrieval(root: Path) -> dict[str, Split]:
    """Zero-shot retrieval split by class, ignoring the test flag: classes 1-98 train (8,054 images),
    99-196 test (8,131 images); each split labelled 0..97 over its own classes."""
    path, entries, _, classes = _read_annotations(root, "cars196_retrieval")
    _check_ids(entries, len(classes), path)
    return zero_shot(entries, {i + 1: name for i, name in enumerate(classes)}, path)


def _check_ids(entries: list[tuple[Path, int]], num_classes: int, path: Path) -> None:
    bad = sorted({class_id for _, class_id in entries if not 1 <= class_id <= num_classes})
    if bad:
        raise FinegrainError(f"{path} has class ids outside 1..{num_classes} (e.g. {bad[0]}). "
                             f"Use the data set's original cars_annos.mat.")
