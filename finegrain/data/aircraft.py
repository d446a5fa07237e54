"""FGVC-Aircraft 2013b (Maji et al. 2013) at the variant level (100 classes)."""
from __future__ import annotations

from pathlib import Path

from finegrain.data.base import Entry, Split, register, require_file, samples_from
from finegrain.data.lists import Line, check_unique, class_list, key_and_rest, read_lines, relative_path

LAYOUT = ("ROOT/data/images_variant_trainval.txt and ROOT/data/images_variant_test.txt (lines "
          "'image_id variant name'), ROOT/data/variants.txt, ROOT/data/images/<image_id>.jpg "
          "(ROOT = the extracted fgvc-aircraft-2013b/ folder, or its data/ folder)")


@register("aircraft", LAYOUT)
def load_aircraft(root: Path) -> dict[str, Split]:
    """images_variant_trainval.txt / images_variant_test.txt: 6,667 / 3,333 images, 100 variants.

    Labels follow data/variants.txt (or sorted names when absent). The 20-pixel copyright
    banner at the bottom of each image is not cropped off.
    """
    data = root if (root / "images_variant_trainval.txt").is_file() else root / "data"
    lists = {"train": require_file(data, "images_variant_trainval.txt", "aircraft"),
             "test": require_file(data, "images_variant_test.txt", "aircraft")}
    entries = {split: [_entry(data, line) for line in read_lines(path)] for split, path in lists.items()}
    check_unique(((image.stem, where) for split in entries.values() for image, _, where in split), "image id")
    classes = class_list(data / "variants.txt", (variant for split in entries.values() for _, variant, _ in split),
                         "variant")
    return {split: Split(samples_from(entries[split], classes, path), classes) for split, path in lists.items()}


def _entry(data: Path, line: Line) -> Entry:
    """'1025794 Cessna 172' -> (DATA/images/1025794.jpg, 'Cessna 172', where): names contain spaces."""
    image, variant = key_and_rest(line, "'image_id variant name'")
    relative_path(image, line.where, single_name=True)
    return data / "images" / f"{image}.jpg", variant, line.where
