"""Oxford-IIIT Pets (Parkhi et al. 2012), 37 breeds, with its official trainval / test split."""
from __future__ import annotations

from pathlib import Path

from finegrain.data.base import Split, parse_int, read_lines, register, require_file, samples_from
from finegrain.errors import FinegrainError

LAYOUT = ("ROOT/annotations/trainval.txt and ROOT/annotations/test.txt (lines 'Image_name CLASS-ID SPECIES "
          "BREED-ID', class ids 1-37), ROOT/images/<Image_name>.jpg")


@register("pets", LAYOUT)
def load_pets(root: Path) -> dict[str, Split]:
    """annotations/trainval.txt / test.txt: 3,680 / 3,669 images, 37 classes, label = CLASS-ID - 1.

    Class names are the image-name prefixes ("american_bulldog_100" -> "american_bulldog").
    """
    lists = {"train": require_file(root, "annotations/trainval.txt", "pets"),
             "test": require_file(root, "annotations/test.txt", "pets")}
    rows: dict[str, list[tuple[str, int]]] = {}
    names: dict[int, str] = {}
    for split, path in lists.items():
        rows[split] = []
        for line in read_lines(path):
            fields = line.split()
            if len(fields) < 2:
                raise FinegrainError(f"Cannot read {path}: line {line!r} lacks a class id. "
                                     f"Use the unmodified annotations from the data set.")
            class_id = parse_int(fields[1], path, line)
            rows[split].append((fields[0], class_id))
            names.setdefault(class_id, fields[0].rsplit("_", 1)[0])
    if sorted(names) != list(range(1, len(names) + 1)):
        raise FinegrainError(f"The class ids in {lists['train'].parent} are not 1..{len(names)}. "
                             f"Use the unmodified annotations from the data set.")
    classes = [names[i] for i in range(1, len(names) + 1)]
    splits = {}
    for split, path in lists.items():
        entries = ((root / "images" / f"{image}.jpg", names[class_id]) for image, class_id in rows[split])
        splits[split] = Split(samples_from(entries, classes, path), classes)
    return splits
