"""Class-per-folder data sets (ImageNet-style train/ and test/ folders, or one folder to split),
and the shipped demo data set."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finegrain.data.base import IMAGE_EXTENSIONS, Sample, Split, register
from finegrain.errors import FinegrainError

FOLDER_LAYOUT = ("ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg (or ROOT/val/), "
                 "or ROOT/<class>/*.jpg split per class by test_fraction")
ZEROSHOT_LAYOUT = ("ROOT/<class>/*.jpg, or ROOT/train/<class>/ and ROOT/test/<class>/ whose images are "
                   "pooled per class; the classes are split, not the images")
_TEST_NAMES = ("test", "val")


# The shipped demo data (16 Fruits-360 classes, train/ and test/ class folders): package data, so
# a wheel installed anywhere carries it.
DEMO_ROOT: Path = Path(__file__).resolve().parent / "demo"


def demo_root() -> Path:
    """The shipped demo data set, or a clear error when the installation lost it."""
    if not ((DEMO_ROOT / "train").is_dir() and (DEMO_ROOT / "test").is_dir()):
        raise FinegrainError(f"The demo data set is not installed: {DEMO_ROOT} holds no train/ and test/ "
                             "folders. Reinstall finegrain.")
    return DEMO_ROOT


DEMO_DATA = "demo"  # a recipe's `data.root: demo` means the data set shipped with finegrain


def resolve_data_root(root: str | None) -> Path:
    """The recipe's data folder; `demo` is the shipped demo data, null asks for --data."""
    if root is None:
        raise FinegrainError("No data folder given. Pass --data DIR (or set data.root in the recipe).")
    if root == DEMO_DATA:
        return DEMO_ROOT
    return Path(root).expanduser()


def class_names(folder: Path, kind: str) -> list[str]:
    """Sorted names of the visible sub-folders of `folder`: one class each."""
    names = sorted(child.name for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))
    if not names:
        raise FinegrainError(f"{folder} holds no class folders. A {kind} data set is laid out as: "
                             f"{FOLDER_LAYOUT if kind == 'folder' else ZEROSHOT_LAYOUT}.")
    return names


def image_files(folder: Path) -> list[Path]:
    """Image files under a class folder (recursively, sorted), or an error if it holds none."""
    files = sorted(path for path in folder.rglob("*")
                   if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith("."))
    if not files:
        raise FinegrainError(f"Class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}). "
                             f"Add its images or remove the empty folder.")
    return files


def _train_test_folders(root: Path) -> tuple[Path, Path] | None:
    """(train, test) when `root` has a train/ and a test/ (or val/) folder; None for a single folder."""
    train = root / "train"
    test = next((root / name for name in _TEST_NAMES if (root / name).is_dir()), None)
    if train.is_dir() and test is not None:
        return train, test
    if train.is_dir() or test is not None:
        found, lacking = ("train/", "test/ (or val/)") if train.is_dir() else (f"{test.name}/", "train/")
        raise FinegrainError(f"{root} has a {found} folder but no {lacking}. Add it, or put the class folders "
                             f"directly in {root} to split them by test_fraction.")
    return None


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise FinegrainError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}. "
                             f"Use e.g. test_fraction=0.2.")


def _held_out(count: int, fraction: float) -> int:
    """round(count * fraction), keeping at least one item on each side whenever count >= 2."""
    return min(max(round(count * fraction), 1), count - 1)


@register("folder", FOLDER_LAYOUT)
def load_folder(root: Path, test_fraction: float = 0.2, seed: int = 0) -> dict[str, Split]:
    """train/ and test/ (or val/) class folders; or one folder of class folders, each class split
    into test and train by a seeded random `test_fraction` of its images. Classes = sorted names."""
    folders = _train_test_folders(root)
    if folders is not None:
        train_dir, test_dir = folders
        classes = class_names(train_dir, "folder")
        extra = sorted(set(class_names(test_dir, "folder")) - set(classes))
        if extra:
            raise FinegrainError(f"{test_dir} has class folders missing from {train_dir}: {', '.join(extra[:5])}. "
                                 f"Every test class needs training images; rename or remove those folders.")
        train = [Sample(str(path), label) for label, name in enumerate(classes)
                 for path in image_files(train_dir / name)]
        test = [Sample(str(path), label) for label, name in enumerate(classes)
                if (test_dir / name).is_dir() for path in image_files(test_dir / name)]
        return {"train": Split(train, classes), "test": Split(test, classes)}
    _check_fraction(test_fraction)
    classes = class_names(root, "folder")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, name in enumerate(classes):
        files = image_files(root / name)
        order = rng.permutation(len(files))
        cut = _held_out(len(files), test_fraction)
        test += [Sample(str(files[i]), label) for i in sorted(order[:cut])]
        train += [Sample(str(files[i]), label) for i in sorted(order[cut:])]
    return {"train": Split(train, classes), "test": Split(test, classes)}


@register("folder_zeroshot", ZEROSHOT_LAYOUT)
def load_folder_zeroshot(root: Path, test_fraction: float | None = None, seed: int = 0,
                         test_classes: list[str] | None = None) -> dict[str, Split]:
    """Class folders split by class for retrieval: the first half of the sorted classes train
    (the larger half when odd), the rest test; or a seeded random `test_fraction` of the classes
    test; or the named `test_classes` (to pick a fine-grained test set, e.g. look-alike varieties).
    With train/ and test/ folders, each class's images from both are pooled first."""
    folders = _train_test_folders(root)
    parents = list(folders) if folders is not None else [root]
    names = sorted({name for parent in parents for name in class_names(parent, "folder_zeroshot")})
    if len(names) < 2:
        raise FinegrainError(f"{root} has {len(names)} class folder(s); a zero-shot split needs at least 2. "
                             f"Add class folders.")
    if test_classes is not None:
        test_names = _named_test_classes(root, names, test_classes, test_fraction)
    elif test_fraction is None:
        test_names = names[(len(names) + 1) // 2:]
    else:
        _check_fraction(test_fraction)
        order = np.random.default_rng(seed).permutation(len(names))
        test_names = sorted(names[i] for i in order[:_held_out(len(names), test_fraction)])
    train_names = [name for name in names if name not in set(test_names)]

    def split(classes: list[str]) -> Split:
        samples = [Sample(str(path), label) for label, name in enumerate(classes)
                   for parent in parents if (parent / name).is_dir() for path in image_files(parent / name)]
        return Split(samples, classes)

    return {"train": split(train_names), "test": split(test_names)}


def _named_test_classes(root: Path, names: list[str], test_classes: object, test_fraction: float | None) -> list[str]:
    """The `test_classes` option checked against the class folders of `root`: sorted, distinct,
    existing names that leave at least one class to train on."""
    if test_fraction is not None:
        raise FinegrainError("Give either test_classes or test_fraction for a folder_zeroshot split, not both. "
                             "Remove one of the two options.")
    if (not isinstance(test_classes, (list, tuple)) or not test_classes
            or not all(isinstance(name, str) for name in test_classes)):
        raise FinegrainError(f"test_classes must be a non-empty list of class folder names, got {test_classes!r}. "
                             f"Use e.g. test_classes: [{names[-1]!r}].")
    unknown = sorted(set(test_classes) - set(names))
    if unknown:
        raise FinegrainError(f"test_classes names {', '.join(map(repr, unknown[:5]))}, which {root} has no class "
                             f"folder for. Use names of its class folders, e.g. {', '.join(map(repr, names[:3]))}.")
    chosen = sorted(set(test_classes))
    if len(chosen) == len(names):
        raise FinegrainError(f"test_classes holds every class of {root}, leaving none to train on. "
                             "Keep at least one class out of test_classes.")
    return chosen
