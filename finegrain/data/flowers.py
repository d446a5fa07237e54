"""Oxford Flowers 102 (Nilsback & Zisserman 2008) with its official split."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finegrain.data.base import Split, register, require_file, samples_from
from finegrain.data.matfile import integers, load_mat
from finegrain.errors import FinegrainError

LAYOUT = "ROOT/imagelabels.mat, ROOT/setid.mat and ROOT/jpg/image_00001.jpg ... image_08189.jpg"
_ORIGINAL = "Use the imagelabels.mat and setid.mat of one download"


@register("flowers102", LAYOUT)
def load_flowers102(root: Path) -> dict[str, Split]:
    """setid.mat's trnid + valid / tstid: 2,040 / 6,149 images, 102 classes, label = imagelabels - 1.

    The data set has no class names: classes are "001" ... "102".
    """
    labels_path = require_file(root, "imagelabels.mat", "flowers102")
    setid_path = require_file(root, "setid.mat", "flowers102")
    labels = integers(load_mat(labels_path, ("labels",))["labels"], labels_path, "labels")
    outside = np.flatnonzero((labels < 1) | (labels > len(labels)))
    if labels.size == 0 or outside.size:
        problem = (f"label {labels[outside[0]]} of image {outside[0] + 1} is outside 1..{len(labels)} (a class "
                   f"needs at least one image)" if outside.size else "labels is empty")
        raise FinegrainError(f"{labels_path}: {problem}. {_ORIGINAL}.")
    setid = load_mat(setid_path, ("trnid", "valid", "tstid"))
    ids = {key: integers(setid[key], setid_path, key) for key in ("trnid", "valid", "tstid")}
    seen: dict[int, str] = {}
    for key, values in ids.items():
        for image_id in values.tolist():
            if not 1 <= image_id <= len(labels):
                raise FinegrainError(f"{setid_path}: {key} names image {image_id}, outside 1..{len(labels)}, the "
                                     f"images of {labels_path.name}. {_ORIGINAL}.")
            if image_id in seen:
                raise FinegrainError(f"{setid_path}: image {image_id} is listed twice (in {seen[image_id]} and "
                                     f"{key}). {_ORIGINAL}.")
            seen[image_id] = key
    classes = [f"{i:03d}" for i in range(1, int(labels.max()) + 1)]

    def split(*keys: str) -> Split:
        chosen = sorted(image_id for key in keys for image_id in ids[key].tolist())
        entries = ((root / "jpg" / f"image_{i:05d}.jpg", classes[labels[i - 1] - 1], f"{setid_path}, image {i}")
                   for i in chosen)
        return Split(samples_from(entries, classes, setid_path), classes)

    return {"train": split("trnid", "valid"), "test": split("tstid")}
