"""Stanford Online Products (Oh Song et al. 2016): zero-shot retrieval over 22,634 products."""
from __future__ import annotations

from pathlib import Path

from finegrain.data.base import Split, register, require_file, samples_from
from finegrain.data.lists import Line, check_unique, fields, positive_int, read_lines, relative_path
from finegrain.errors import FinegrainError

LAYOUT = ("ROOT/Ebay_train.txt and ROOT/Ebay_test.txt (header 'image_id class_id super_class_id path', then "
          "one line per image), images at ROOT/<path> (ROOT = the extracted Stanford_Online_Products/ folder)")
_COLUMNS = "'image_id class_id super_class_id path'"


@register("sop", LAYOUT)
def load_sop(root: Path) -> dict[str, Split]:
    """Ebay_train.txt / Ebay_test.txt: 59,551 images of 11,318 products / 60,502 images of 11,316.

    Each split is labelled 0..k-1 over its own products (sorted class_id); classes are the ids.
    """
    lists = {split: require_file(root, f"Ebay_{split}.txt", "sop") for split in ("train", "test")}
    rows = {split: [_row(root, line) for line in read_lines(path) if not line.text.startswith("image_id ")]
            for split, path in lists.items()}
    check_unique(((str(image), where) for split in rows.values() for image, _, where in split), "image")
    shared: dict[int, str] = {}
    for _, class_id, where in rows["train"]:
        shared.setdefault(class_id, where)
    leaked = next(((class_id, where) for _, class_id, where in rows["test"] if class_id in shared), None)
    if leaked:
        raise FinegrainError(f"{leaked[1]}: product {leaked[0]} is also in the train split ({shared[leaked[0]]}); "
                             f"retrieval is evaluated on unseen products. Use the unmodified Ebay_*.txt files.")
    splits = {}
    for split, path in lists.items():
        classes = [str(class_id) for class_id in sorted({class_id for _, class_id, _ in rows[split]})]
        entries = ((image, str(class_id), where) for image, class_id, where in rows[split])
        splits[split] = Split(samples_from(entries, classes, path), classes)
    return splits


def _row(root: Path, line: Line) -> tuple[Path, int, str]:
    """(ROOT/path, class_id, where) of one 'image_id class_id super_class_id path' line."""
    image_id, class_id, super_class_id, path = fields(line, 4, _COLUMNS)
    positive_int(image_id, line, "image_id")
    positive_int(super_class_id, line, "super_class_id")
    return root / relative_path(path, line.where), positive_int(class_id, line, "class_id"), line.where
