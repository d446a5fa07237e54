"""The validation part of a training split: what model selection looks at instead of the test split.

Where a data set ships a validation split (Flowers-102's setid.mat `valid`, FGVC-Aircraft's
images_variant_val.txt), that is the part; otherwise each class gives a seeded `fraction` of its
images (stratified: every class is in both parts), and for zero-shot retrieval, where the test
classes are unseen, a seeded fraction of the training classes (validation is then zero-shot too).

The part is a pure function of (seed, the sample list): images are ranked by their path within
their class and drawn with a generator keyed by (seed, class), never by the run's training seed,
its process count or the order the files were listed in. So a resumed run, a run on 8 GPUs and
a run on the CPU hold out the same images, and the training seeds of one recipe share one part.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.data.base import Sample, Split
from finegrain.data.lists import key_and_rest, read_lines
from finegrain.data.matfile import integers, load_mat
from finegrain.errors import FinegrainError

_STREAM = 0x56414C49  # "VALI": keeps these draws apart from every other use of the same seed
_CLASSES = 2**32 - 1  # the key of the draw of classes (a class label never reaches it)


@dataclass(frozen=True)
class ValidationPart:
    """The training split minus its validation part, the part, and how it was drawn (in words)."""

    train: Split
    val: Split
    source: str

    def record(self, root: Path) -> dict[str, Any]:
        """What the run directory keeps (validation.json): how, how many, and which images,
        as paths relative to the data folder (a moved data folder still compares equal)."""
        return {"source": self.source, "train_images": len(self.train), "val_images": len(self.val),
                "val_classes": len(self.val.classes),
                "val": sorted(_relative(sample.path, root) for sample in self.val.samples)}


def official_validation_names(kind: str, root: Path) -> tuple[set[str], str] | None:
    """(file names of the official validation images, where they are listed) for the data sets
    that ship a validation split inside their training split; None for the others."""
    if kind == "flowers102":
        setid = root / "setid.mat"
        ids = integers(load_mat(setid, ("valid",))["valid"], setid, "valid")
        return {f"image_{int(i):05d}.jpg" for i in ids.tolist()}, f"{setid.name} valid"
    if kind == "aircraft":
        data = root if (root / "images_variant_val.txt").is_file() else root / "data"
        listed = data / "images_variant_val.txt"
        if not listed.is_file():
            raise FinegrainError(f"Missing {listed}: FGVC-Aircraft's official validation list, which "
                                 "eval.select_on=val holds out. Use the complete fgvc-aircraft-2013b download, or "
                                 "--set eval.select_on=test for the paper's protocol.")
        names = {f"{key_and_rest(line, 'image_id variant name')[0]}.jpg" for line in read_lines(listed)}
        return names, listed.name
    return None


def hold_out(kind: str, root: Path, train: Split, fraction: float, seed: int, by_class: bool) -> ValidationPart:
    """`train` split into (train, validation): the official part where `kind` has one, else
    whole classes (`by_class`, zero-shot) or a stratified fraction of each class's images."""
    official = official_validation_names(kind, root)
    if official is not None:
        names, listed = official
        val = [sample for sample in train.samples if Path(sample.path).name in names]
        if not val:
            raise FinegrainError(f"None of the training images is in {listed} under {root}. Use the split files "
                                 "of one download of the data set.")
        kept = [sample for sample in train.samples if Path(sample.path).name not in names]
        return ValidationPart(Split(kept, train.classes), Split(val, train.classes), f"official ({listed})")
    if by_class:
        return _hold_out_classes(train, fraction, seed)
    return _hold_out_images(train, fraction, seed)


def _draw(count: int, seed: int, key: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAM, key])).permutation(count)


def _hold_out_images(train: Split, fraction: float, seed: int) -> ValidationPart:
    """Per class: round(fraction x its images), at least one, never all of them."""
    by_label: dict[int, list[Sample]] = {}
    for sample in train.samples:
        by_label.setdefault(sample.label, []).append(sample)
    held: set[Sample] = set()
    for label, samples in by_label.items():
        ranked = sorted(samples, key=lambda sample: sample.path)
        if len(ranked) >= 2:
            cut = min(max(round(len(ranked) * fraction), 1), len(ranked) - 1)
            held.update(ranked[i] for i in _draw(len(ranked), seed, label)[:cut])
    if not held:
        raise FinegrainError(f"No class of the training split has 2 images, so none can lend one to validation. "
                             "Add images, or --set eval.select_on=test.")
    kept = [sample for sample in train.samples if sample not in held]
    val = [sample for sample in train.samples if sample in held]
    return ValidationPart(Split(kept, train.classes), Split(val, train.classes),
                          f"stratified {fraction:g} of each class's images, seed {seed}")


def _hold_out_classes(train: Split, fraction: float, seed: int) -> ValidationPart:
    """round(fraction x the classes), at least 2 (retrieval among one class measures nothing),
    leaving at least 2 to train a metric on; each part gets its own labels 0..k-1."""
    count = len(train.classes)
    if count < 4:
        raise FinegrainError(f"The training split has {count} classes; a zero-shot validation part needs 2 of "
                             "them and leaves 2 to train. Add classes, or --set eval.select_on=test.")
    cut = min(max(round(count * fraction), 2), count - 2)
    ranked = sorted(range(count), key=lambda label: train.classes[label])
    held = {ranked[i] for i in _draw(count, seed, _CLASSES)[:cut]}

    def part(labels: list[int]) -> Split:
        new = {label: index for index, label in enumerate(labels)}
        return Split([Sample(s.path, new[s.label]) for s in train.samples if s.label in new],
                     [train.classes[label] for label in labels])

    return ValidationPart(part([l for l in range(count) if l not in held]), part(sorted(held)),
                          f"{cut} of the {count} training classes (zero-shot), seed {seed}")


def _relative(path: str, root: Path) -> str:
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive (Windows): the path itself
        return Path(path).as_posix()
