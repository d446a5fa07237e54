"""Oxford-IIIT Pets (Parkhi et al. 2012), 37 breeds, with its official trainval / test split."""
from __future__ import annotations

from pathlib import Path

from finegrain.data.base import Split, register, require_file, samples_from
from finegrain.data.lists import Line, check_unique, fields, positive_int, read_lines, relative_path
from finegrain.errors import FinegrainError

LAYOUT = ("ROOT/annotations/trainval.txt and ROOT/annotations/test.txt (lines 'Image_name CLASS-ID SPECIES "
          "BREED-ID', class ids 1-37), ROOT/images/<Image_name>.jpg")
_COLUMNS = "'Image_name CLASS-ID SPECIES BREED-ID'"


@register("pets", LAYOUT)
def load_pets(root: Path) -> dict[str, Split]:
    """annotations/trainval.txt / test.txt: 3,680 / 3,669 images, 37 classes, label = CLASS-ID - 1.

    Class names are the image-name prefixes ("american_bulldog_100" -> "american_bulldog").
    """
    lists = {"train": require_file(root, "annotations/trainval.txt", "pets"),
             "test": require_file(root, "annotations/test.txt", "pets")}
    rows = {split: [_row(line) for line in read_lines(path)] for split, path in lists.items()}
    every = [row for split in rows.values() for row in split]
    check_unique(((image, line.where) for image, _, line in every), "image")
    names: dict[int, tuple[str, Line]] = {}
    for image, class_id, line in every:
        name, first = names.setdefault(class_id, (image.rsplit("_", 1)[0], line))
        if name != image.rsplit("_", 1)[0]:
            raise line.error(f"class id {class_id} is the breed {name!r} at {first.where}, not "
                             f"{image.rsplit('_', 1)[0]!r}")
    missing = sorted(set(range(1, len(names) + 1)) - set(names))
    if missing:
        raise FinegrainError(f"The class ids in {lists['train'].parent} are not 1..{len(names)}: no image of class "
                             f"{missing[0]}, though a higher id is used. Use the unmodified annotations.")
    check_unique(((name, line.where) for name, line in names.values()), "breed")
    classes = [names[i][0] for i in range(1, len(names) + 1)]
    splits = {}
    for split, path in lists.items():
        entries = ((root / "images" / f"{image}.jpg", names[class_id][0], line.where)
                   for image, class_id, line in rows[split])
        splits[split] = Split(samples_from(entries, classes, path), classes)
    return splits


def _row(line: Line) -> tuple[str, int, Line]:
    """(Image_name, CLASS-ID, line); SPECIES must be 1 (cat) or 2 (dog) and BREED-ID a number."""
    image, class_id, species, breed = fields(line, 4, _COLUMNS)
    relative_path(image, line.where, single_name=True)
    if species not in ("1", "2"):
        raise line.error(f"SPECIES must be 1 (cat) or 2 (dog), got {species!r}")
    positive_int(breed, line, "BREED-ID")
    return image, positive_int(class_id, line, "CLASS-ID"), line
