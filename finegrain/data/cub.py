"""CUB-200-2011 (Wah et al. 2011), zero-shot retrieval split by class."""
from __future__ import annotations

from pathlib import Path

from finegrain.data.base import Split, register, require_file, zero_shot
from finegrain.data.lists import Line, check_unique, key_and_rest, positive_int, read_lines, relative_path

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
    images = _by_id(images_path, "'image_id path'", "image_id")
    labels = _by_id(labels_path, "'image_id class_id'", "image_id")
    classes = _by_id(classes_path, "'class_id name'", "class_id")
    check_unique(((path, line.where) for path, line in images.values()), "image")
    check_unique(((name, line.where) for name, line in classes.values()), "class name")
    entries = []
    for image_id, (path, line) in images.items():
        image = root / "images" / relative_path(path, line.where)
        if image_id not in labels:
            raise line.error(f"image {image_id} has no line in {labels_path.name}",
                             "Use images.txt and image_class_labels.txt of one download")
        class_text, label_line = labels[image_id]
        class_id = positive_int(class_text, label_line, "class_id")
        if class_id not in classes:
            raise label_line.error(f"class {class_id} is not in {classes_path.name}",
                                   "Use image_class_labels.txt and classes.txt of one download")
        entries.append((image, class_id, line.where))
    return zero_shot(entries, {class_id: name for class_id, (name, _) in classes.items()}, images_path)


def _by_id(path: Path, layout: str, id_name: str) -> dict[int, tuple[str, Line]]:
    """{id: (value, line)} of an 'id value' file (values may contain spaces); ids must be unique."""
    rows: dict[int, tuple[str, Line]] = {}
    for line in read_lines(path):
        key, value = key_and_rest(line, layout)
        number = positive_int(key, line, id_name)
        if number in rows:
            raise line.error(f"{id_name} {number} is listed again (first at line {rows[number][1].number})")
        rows[number] = (value, line)
    return rows
