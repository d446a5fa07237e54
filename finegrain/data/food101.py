"""Food-101 (Bossard et al. 2014) with its official split."""
from __future__ import annotations

from pathlib import Path

from finegrain.data.base import Entry, Split, register, require_file, samples_from
from finegrain.data.lists import Line, check_unique, class_list, read_lines, relative_path

LAYOUT = ("ROOT/meta/train.txt and ROOT/meta/test.txt (lines 'class/image_id'), ROOT/meta/classes.txt, "
          "ROOT/images/<class>/<image_id>.jpg (ROOT = the extracted food-101/ folder)")


@register("food101", LAYOUT)
def load_food101(root: Path) -> dict[str, Split]:
    """meta/train.txt / meta/test.txt: 75,750 / 25,250 images (750 / 250 per class), 101 classes.

    Labels follow meta/classes.txt (alphabetical), or the sorted class names when it is absent.
    """
    lists = {name: require_file(root, f"meta/{name}.txt", "food101") for name in ("train", "test")}
    entries = {name: [_entry(root, line) for line in read_lines(path)] for name, path in lists.items()}
    check_unique(((str(image), where) for split in entries.values() for image, _, where in split), "image")
    classes = class_list(root / "meta" / "classes.txt", (name for split in entries.values() for _, name, _ in split),
                         "class")
    return {name: Split(samples_from(entries[name], classes, path), classes) for name, path in lists.items()}


def _entry(root: Path, line: Line) -> Entry:
    """'apple_pie/1005649' -> (ROOT/images/apple_pie/1005649.jpg, 'apple_pie', where)."""
    name, _, image = line.text.partition("/")
    if line.text.count("/") != 1 or not name or not image or " " in line.text:
        raise line.error("expected one 'class/image_id' entry")
    relative_path(line.text, line.where)
    return root / "images" / f"{line.text}.jpg", name, line.where
