"""DeepFashion In-Shop Clothes Retrieval (Liu et al. 2016): queries searched in a separate gallery.

Eval/list_eval_partition.txt names every image, its item (the class) and its part: 25,882
training images of 3,997 items; 14,218 query and 12,612 gallery images of 3,985 other items.
"""
from __future__ import annotations

from pathlib import Path

from finegrain.data.base import Split, register, require_file, samples_from
from finegrain.data.lists import Line, check_unique, fields, read_lines, relative_path
from finegrain.errors import FinegrainError

LIST = "Eval/list_eval_partition.txt"
LAYOUT = (f"ROOT/{LIST} (a count line, the header 'image_name item_id evaluation_status', then one "
          "'img/... item_id train|query|gallery' line per image), images at ROOT/<image_name> (ROOT = the "
          "extracted 'In-shop Clothes Retrieval Benchmark' folder)")
_COLUMNS = "'image_name item_id evaluation_status'"
_PARTS = ("train", "query", "gallery")


@register("inshop", LAYOUT)
def load_inshop(root: Path) -> dict[str, Split]:
    """train (its own items), query and gallery (labelled over the test items they share), and test =
    query + gallery (what a per-epoch leave-one-out evaluation reads)."""
    path = require_file(root, LIST, "inshop")
    lines = read_lines(path)
    if len(lines) < 2 or not (lines[0].text.isascii() and lines[0].text.isdigit()):
        raise FinegrainError(f"{path} must start with the number of images, then the header {_COLUMNS}. "
                             "Use the unmodified file from the data set's download.")
    if lines[1].text.split() != _COLUMNS.strip("'").split():
        raise lines[1].error(f"expected the header {_COLUMNS}")
    rows = [_row(root, line) for line in lines[2:]]
    if int(lines[0].text) != len(rows):
        raise lines[0].error(f"the file announces {lines[0].text} images but lists {len(rows)}")
    check_unique(((str(image), where) for image, _, _, where in rows), "image")
    parts = {part: [(image, item, where) for image, item, status, where in rows if status == part] for part in _PARTS}
    train_items = {item: where for _, item, where in parts["train"]}
    leaked = next(((item, where) for part in ("query", "gallery") for _, item, where in parts[part]
                   if item in train_items), None)
    if leaked:
        raise FinegrainError(f"{leaked[1]}: item {leaked[0]} is also in the train part ({train_items[leaked[0]]}); "
                             "retrieval is evaluated on unseen items. Use the unmodified list_eval_partition.txt.")
    train_classes = sorted(train_items)
    test_classes = sorted({item for part in ("query", "gallery") for _, item, _ in parts[part]})
    splits = {"train": Split(samples_from(parts["train"], train_classes, path), train_classes)}
    for part in ("query", "gallery"):
        splits[part] = Split(samples_from(parts[part], test_classes, path), test_classes)
    splits["test"] = Split(splits["query"].samples + splits["gallery"].samples, test_classes)
    return splits


def _row(root: Path, line: Line) -> tuple[Path, str, str, str]:
    """(ROOT/image_name, item_id, part, where) of one line."""
    image, item, status = fields(line, 3, _COLUMNS)
    if status not in _PARTS:
        raise line.error(f"evaluation_status must be one of {', '.join(_PARTS)}, got {status!r}")
    return root / relative_path(image, line.where), item, status, line.where
