"""FGVC-Aircraft 2013b (Maji et al. 2013) at the variant level (100 classes)."""
from __future__ import annotations

from pathlib import Path

from finegrain.data.base import Split, read_lines, register, require_file, samples_from
from finegrain.errors import FinegrainError

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
    rows = {split: [_parse(line, path) for line in read_lines(path)] for split, path in lists.items()}
    variants_file = data / "variants.txt"
    classes = (read_lines(variants_file) if variants_file.is_file()
               else sorted({variant for entries in rows.values() for _, variant in entries}))
    splits = {}
    for split, path in lists.items():
        entries = ((data / "images" / f"{image}.jpg", variant) for image, variant in rows[split])
        splits[split] = Split(samples_from(entries, classes, path), classes)
    return splits


def _parse(line: str, path: Path) -> tuple[str, str]:
    """'1025794 Cessna 172' -> ('1025794', 'Cessna 172'): variant names contain spaces."""
    image, _, variant = line.partition(" ")
    if not variant.strip():
        raise FinegrainError(f"Cannot read {path}: line {line!r} lacks a variant name. "
                             f"Use the unmodified split files of fgvc-aircraft-2013b.")
    return image, variant.strip()
