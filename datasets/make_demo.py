"""Rebuild finegrain/data/demo from a Fruits-360 folder (documents how the shipped demo was chosen).

Usage: python datasets/make_demo.py /path/to/fruits360 [--out finegrain/data/demo]

The source folder holds one sub-folder per class (the early Fruits-360 "Testing" split, see
finegrain/data/demo/ATTRIBUTION.md). For each of the 16 classes below, in sorted order, one
random.Random(SEED) draws 34 files from the sorted file list: the first 24 drawn go to
train/, the next 10 to test/. Files are copied byte for byte. Not run by the tests.
"""
from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

SEED = 20240
TRAIN_PER_CLASS = 24
TEST_PER_CLASS = 10
# Twelve look-alike apples and citrus fruits make the demo fine-grained; four more round fruits
# (grapefruit next to orange and lemon, peach next to nectarine) keep it hard.
CLASSES = sorted([
    "Apple Red 1", "Apple Red 2", "Apple Red 3", "Apple Red Yellow", "Braeburn",
    "Golden 1", "Golden 2", "Golden 3", "Granny Smith",
    "Grapefruit", "Lemon", "Orange", "Nectarine", "Peach", "Pomegranate", "Strawberry",
])


def select(source: Path) -> dict[str, dict[str, list[Path]]]:
    """Map split -> class -> chosen files; deterministic for a given source folder."""
    rng = random.Random(SEED)
    chosen: dict[str, dict[str, list[Path]]] = {"train": {}, "test": {}}
    for name in CLASSES:
        files = sorted((source / name).glob("*.jpg"))
        if len(files) < TRAIN_PER_CLASS + TEST_PER_CLASS:
            raise SystemExit(f"{source / name} has {len(files)} JPEG files; need {TRAIN_PER_CLASS + TEST_PER_CLASS}.")
        drawn = rng.sample(files, TRAIN_PER_CLASS + TEST_PER_CLASS)
        chosen["train"][name] = drawn[:TRAIN_PER_CLASS]
        chosen["test"][name] = drawn[TRAIN_PER_CLASS:]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="Fruits-360 folder with one sub-folder per class")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo")
    args = parser.parse_args()
    for split, by_class in select(args.source).items():
        for name, files in by_class.items():
            target = args.out / split / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for file in files:
                shutil.copyfile(file, target / file.name)
    print(f"wrote {len(CLASSES)} classes x ({TRAIN_PER_CLASS} train + {TEST_PER_CLASS} test) images to {args.out}")


if __name__ == "__main__":
    main()
