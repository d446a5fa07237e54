"""Stanford Online Products (Oh Song et al. 2016): zero-shot retrieval over 22,634 products."""
from __future__ import annotations

from pathlib import Path

from finegrain.data.base import Split, parse_int, read_lines, register, require_file, samples_from
from finegrain.errors import FinegrainError

LAYOUT = ("ROOT/Ebay_train.txt and ROOT/Ebay_test.txt (header 'image_id class_id super_class_id path', then "
          "one line per image), images at ROOT/<path> (ROOT = the extracted Stanford_Online_Products/ folder)")


@register("sop", LAYOUT)
def load_sop(root: Path) -> dict[str, Split]:
    """Ebay_train.txt / Ebay_test.txt: 59,551 images of 11,318 products / 60,502 images of 11,316.

    Each split is labelled 0..k-1 over its own products (sorted class_id); classes are the ids.
    """
    splits = {}
    for split in ("train", "test"):
        path = require_file(root, f"Ebay_{split}.txt", "sop")
        rows = []
        for line in read_lines(path):
            fields = line.split()
            if fields[0] == "image_id":
                continue
            if len(fields) != 4:
                raise FinegrainError(f"Cannot read {path}: line {line!r} does not have 4 fields. "
                                     f"Use the unmodified Ebay_{split}.txt.")
            rows.append((root / fields[3], parse_int(fields[1], path, line)))
        classes = [str(class_id) for class_id in sorted({class_id for _, class_id in rows})]
        entries = ((image, str(class_id)) for image, class_id in rows)
        splits[split] = Split(samples_from(entries, classes, path), classes)
    return splits
