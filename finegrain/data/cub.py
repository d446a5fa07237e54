"""CUB-200-2011 (Wah et al. 2011), zero-shot retrieval split by class."""
from __future__ import annotations

from pathlib import Path

from finegrain.data.base import Split, parse_int, read_lines, register, require_file, zero_shot
from finegrain.errors import FinegrainError

LAYOUT = ("ROOT/images.txt ('image_id path'), ROOT/image_class_labels.txt ('image_id class_id'), "
          "ROOT/classes.txt ('class_id name'), ROOT/images/<path> (ROOT = the extracted CUB_200_2011/ folder)")


@register("cub200", LAYOUT)
def load_cub200(root: Path) -> dict[str, Split]:
    """Classes 1-100 train (5,864 images) / 101-200 test (5,924 images), each split labelled 0..99.

    The split is by class (the first half of classes.txt), not train_test_split.txt.
    """
    images_path = require_file(root, "images.txt", "cub200")
    labels_path = require_file(root, "image_class_labels.txt", "cub200")
    classes_path = require_file(root, "classes.txt", "cub200")
    paths = dict(_pairs(images_path))
    labels = {image_id: parse_int(value, labels_path, value) for image_id, value in _pairs(labels_path)}
    names = {parse_int(class_id, classes_path, class_id): name for class_id, name in _pairs(classes_path)}
    unlabelled = sorted(set(paths) - set(labels))
    unknown = sorted(set(labels.values()) - set(names))
    if unlabelled or unknown:
        problem = (f"image {unlabelled[0]} has no class" if unlabelled
                   else f"class id {unknown[0]} is not in classes.txt")
        raise FinegrainError(f"{root}: images.txt, image_class_labels.txt and classes.txt do not match ({problem}). "
                             f"Use the files of one download.")
    entries = [(root / "images" / path, labels[image_id]) for image_id, path in paths.items()]
    return zero_shot(entries, names, images_path)


def _pairs(path: Path) -> list[tuple[str, str]]:
    """'id value' lines; values may contain spaces."""
    pairs = []
    for line in read_lines(path):
        key, _, value = line.partition(" ")
        if not value.strip():
            raise FinegrainError(f"Cannot read {path}: line {line!r} has no second field. Use the unmodified file.")
        pairs.append((key, value.strip()))
    return pairs
