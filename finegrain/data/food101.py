"""Food-101 (Bossard et al. 2014) with its official split."""
from __future__ import annotations

from pathlib import Path

from finegrain.data.base import Split, read_lines, register, require_file, samples_from

LAYOUT = ("ROOT/meta/train.txt and ROOT/meta/test.txt (lines 'class/image_id'), ROOT/meta/classes.txt, "
          "ROOT/images/<class>/<image_id>.jpg (ROOT = the extracted food-101/ folder)")


@register("food101", LAYOUT)
def load_food101(root: Path) -> dict[str, Split]:
    """meta/train.txt / meta/test.txt: 75,750 / 25,250 images (750 / 250 per class), 101 classes.

    Labels follow meta/classes.txt (alphabetical), or the sorted class names when it is absent.
    """
    lists = {name: require_file(root, f"meta/{name}.txt", "food101") for name in ("train", "test")}
    lines = {name: read_lines(path) for name, path in lists.items()}
    classes_file = root / "meta" / "classes.txt"
    classes = (read_lines(classes_file) if classes_file.is_file()
               else sorted({line.split("/")[0] for entries in lines.values() for line in entries}))
    splits = {}
    for name, path in lists.items():
        entries = ((root / "images" / f"{line}.jpg", line.split("/")[0]) for line in lines[name])
        splits[name] = Split(samples_from(entries, classes, path), classes)
    return splits
