"""Stanford Cars (Krause et al. 2013), 196 classes: the FGVC split and the zero-shot retrieval split.

Both read the all-in-one annotation file `cars_annos.mat` (MATLAB, read with scipy.io), whose
rows give `relative_im_path`, `class` (1-196) and the official `test` flag.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finegrain.data.base import Split, register, require_file, samples_from, zero_shot
from finegrain.data.lists import check_unique, relative_path
from finegrain.data.matfile import integers, load_mat, strings
from finegrain.errors import FinegrainError

LAYOUT = "ROOT/cars_annos.mat and ROOT/car_ims/*.jpg (paths as the .mat's relative_im_path gives them)"
_FIELDS = ("relative_im_path", "class", "test")
_ORIGINAL = "Use the cars_annos.mat of the full (car_ims) download"


def _read_annotations(root: Path, kind: str) -> tuple[Path, list[tuple[Path, int, str]], np.ndarray, list[str]]:
    """(mat path, [(image path, class id 1..196, where)], test flags, class names), all checked."""
    path = require_file(root, "cars_annos.mat", kind)
    content = load_mat(path, ("annotations", "class_names"))
    annotations = content["annotations"]
    if not isinstance(annotations, np.ndarray) or annotations.dtype.names is None \
            or not set(_FIELDS) <= set(annotations.dtype.names) or annotations.ndim > 1:
        raise FinegrainError(f"{path} is not Stanford Cars' cars_annos.mat: annotations is not a struct vector with "
                             f"the fields {', '.join(_FIELDS)}. {_ORIGINAL}.")
    annotations = np.atleast_1d(annotations)
    relative = strings(annotations["relative_im_path"], path, "annotations.relative_im_path")
    class_ids = integers(annotations["class"], path, "annotations.class")
    flags = integers(annotations["test"], path, "annotations.test")
    classes = strings(content["class_names"], path, "class_names")
    where = [f"{path}, annotation {i + 1}" for i in range(len(annotations))]
    check_unique(((name, f"{path}, class_names entry {i + 1}") for i, name in enumerate(classes)), "class name")
    check_unique(zip(relative, where), "image")
    for values, field, low, high in ((class_ids, "class", 1, len(classes)), (flags, "test", 0, 1)):
        bad = np.flatnonzero((values < low) | (values > high))
        if bad.size:
            raise FinegrainError(f"{where[bad[0]]}: {field} is {values[bad[0]]}, outside {low}..{high}. {_ORIGINAL}.")
    entries = [(root / relative_path(rel, place), int(class_id), place)
               for rel, class_id, place in zip(relative, class_ids, where)]
    return path, entries, flags.astype(bool), classes


@register("cars196", LAYOUT)
def load_cars196(root: Path) -> dict[str, Split]:
    """The official split by cars_annos.mat's test flag: 8,144 / 8,041 images, 196 classes, label = class - 1."""
    path, entries, flags, classes = _read_annotations(root, "cars196")
    named = [(image, classes[class_id - 1], where) for image, class_id, where in entries]
    return {"train": Split(samples_from((e for e, test in zip(named, flags) if not test), classes, path), classes),
            "test": Split(samples_from((e for e, test in zip(named, flags) if test), classes, path), classes)}


@register("cars196_retrieval", LAYOUT)
def load_cars196_retrieval(root: Path) -> dict[str, Split]:
    """Zero-shot retrieval split by class, ignoring the test flag: classes 1-98 train (8,054 images),
    99-196 test (8,131 images); each split labelled 0..97 over its own classes."""
    path, entries, _, classes = _read_annotations(root, "cars196_retrieval")
    return zero_shot(entries, {i + 1: name for i, name in enumerate(classes)}, path)
