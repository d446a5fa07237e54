"""Oxford Flowers 102 (Nilsback & Zisserman 2008) with its official split."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finegrain.data.base import Split, load_mat, register, require_file, samples_from
from finegrain.errors import FinegrainError

LAYOUT = "ROOT/imagelabels.mat, ROOT/setid.mat and ROOT/jpg/image_00001.jpg ... image_08189.jpg"


@register("flowers102", LAYOUT)
def load_flowers102(root: Path) -> dict[str, Split]:
    """setid.mat's trnid + valid / tstid: 2,040 / 6,149 images, 102 classes, label = imagelabels - 1.

    The data set has no class names: classes are "001" ... "102".
    """
    labels_path = require_file(root, "imagelabels.mat", "flowers102")
    setid_path = require_file(root, "setid.mat", "flowers102")
    labels = np.atleast_1d(load_mat(labels_path, ("labels",))["labels"]).astype(int)
    setid = load_mat(setid_path, ("trnid", "valid", "tstid"))
    classes = [f"{i:03d}" for i in range(1, int(labels.max()) + 1)]

    def split(*keys: str) -> Split:
        ids = np.concatenate([np.atleast_1d(setid[key]).astype(int) for key in keys])
        if ids.min() < 1 or ids.max() > len(labels):
            raise FinegrainError(f"{setid_path} names images outside 1..{len(labels)}, the range of {labels_path}. "
                                 f"Use the two .mat files of the same download.")
        entries = ((root / "jpg" / f"image_{i:05d}.jpg", classes[labels[i - 1] - 1]) for i in sorted(ids))
        return Split(samples_from(entries, classes, setid_path), classes)

    return {"train": split("trnid", "valid"), "test": split("tstid")}
