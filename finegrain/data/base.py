"""Samples, splits and the registry of data-set readers behind `load_splits(kind, root)`.

Every reader turns a data set in its native, as-downloaded layout into two `Split`s, "train"
and "test", with the official split. Bad layouts fail early with one message that names the
missing path and the layout that was expected, so a wrong `--data` costs seconds, not a run.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from finegrain.errors import FinegrainError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


@dataclass(frozen=True)
class Sample:
    """One image file and its class index (into the owning `Split.classes`)."""

    path: str
    label: int


@dataclass(frozen=True)
class Split:
    """Samples plus the class names their labels index. Zero-shot splits each have their own classes."""

    samples: list[Sample]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [sample.label for sample in self.samples]


Loader = Callable[..., dict[str, Split]]
_LOADERS: dict[str, Loader] = {}
_LAYOUTS: dict[str, str] = {}


def register(kind: str, layout: str) -> Callable[[Loader], Loader]:
    """Add a reader `fn(root: Path, **opts)` under `kind`; `layout` is quoted in error messages."""

    def add(loader: Loader) -> Loader:
        _LOADERS[kind] = loader
        _LAYOUTS[kind] = layout
        return loader

    return add


def kinds() -> list[str]:
    """The data-set kinds `load_splits` reads."""
    return sorted(_LOADERS)


def layout_of(kind: str) -> str:
    """What folder layout `kind` expects, in words (for help texts and errors)."""
    return _LAYOUTS[_check_kind(kind)]


def load_splits(kind: str, root: str | Path, **opts: object) -> dict[str, Split]:
    """Read data set `kind` at `root`: {"train": Split, "test": Split} with the official split.

    Options depend on the kind (e.g. `test_fraction`, `seed` for `folder`); an unknown option
    is an error rather than silently ignored.
    """
    loader = _LOADERS[_check_kind(kind)]
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FinegrainError(
            f"Data folder {root} does not exist or is not a folder. Point --data at the {kind} "
            f"data set, laid out as: {_LAYOUTS[kind]}.")
    accepted = [name for name in inspect.signature(loader).parameters if name != "root"]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise FinegrainError(
            f"Unknown option(s) {', '.join(unknown)} for data kind {kind!r}. "
            f"Use {', '.join(accepted) if accepted else 'no options'}.")
    splits = loader(root, **opts)
    for name, split in splits.items():
        if not split.samples:
            raise FinegrainError(
                f"The {name} split of {root} holds no images. Check the folder; {kind} expects: {_LAYOUTS[kind]}.")
    return splits


def _check_kind(kind: str) -> str:
    if kind not in _LOADERS:
        raise FinegrainError(f"Unknown data set kind {kind!r}. Use one of: {', '.join(kinds())}.")
    return kind


# Who points a public data set's kind at their own class folders should learn the way to read them.
_OWN_FOLDERS_HINT = ("If {root} holds your own images in class folders (ROOT/<class>/*.jpg, or ROOT/train/<class>/ "
                    "and ROOT/test/<class>/), read it as data kind folder: --kind folder, or --set data.kind=folder")


def require_file(root: Path, relative: str, kind: str) -> Path:
    """`root/relative`, or an error naming it, the expected layout and a sub-folder that has it."""
    path = root / relative
    if path.is_file():
        return path
    children = sorted(child for child in root.iterdir() if child.is_dir()) if root.is_dir() else []
    nested = [child for child in children if (child / relative).is_file()]
    fix = (f"{nested[0] / relative} exists: pass --data {nested[0]}" if nested
           else f"Point --data at the folder that holds {relative}. {_OWN_FOLDERS_HINT.format(root=root)}")
    raise FinegrainError(f"Missing {path}. The {kind} data set must be laid out as: {layout_of(kind)}. {fix}.")


# (image file, class name, where it is listed: "FILE, line N") as the readers parse them.
Entry = tuple[Path, str, str]


def require_images_exist(samples: Iterable[Sample], listed_in: Path) -> None:
    """One error for all images a split file names that are not on disk (shows the first few)."""
    missing = [sample.path for sample in samples if not Path(sample.path).is_file()]
    if missing:
        shown = ", ".join(missing[:3])
        raise FinegrainError(
            f"{len(missing)} image(s) listed in {listed_in} are missing, e.g. {shown}. "
            f"Extract the data set's images next to its split files (see datasets/README.md).")


def samples_from(entries: Iterable[Entry], classes: list[str], listed_in: Path) -> list[Sample]:
    """Samples for parsed entries, labelled by position in `classes`, files checked to exist."""
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for path, name, where in entries:
        if name not in index:
            shown = ", ".join(repr(known) for known in classes[:3])
            raise FinegrainError(f"{where}: class {name!r} is not among the {len(classes)} known classes "
                                 f"({shown}{', ...' if len(classes) > 3 else ''}). Use the split and class files "
                                 f"of one download of the data set.")
        samples.append(Sample(str(path), index[name]))
    require_images_exist(samples, listed_in)
    return samples


def zero_shot(entries: list[tuple[Path, int, str]], class_names: dict[int, str], listed_in: Path) -> dict[str, Split]:
    """Split (path, class id, where) entries by class: the first half of the sorted ids train, the rest test.

    Each split gets its own class list and labels 0..k-1, so a loss over the training classes
    never sees a test class (the zero-shot protocol of CUB-200 and CARS196 retrieval).
    """
    ids = sorted(class_names)
    if len(ids) < 2:
        raise FinegrainError(f"{listed_in} defines {len(ids)} class(es); a zero-shot split needs at least 2. "
                             f"Use the complete data set.")
    half = (len(ids) + 1) // 2
    return {name: _split_by_ids(entries, class_names, part, listed_in)
            for name, part in (("train", ids[:half]), ("test", ids[half:]))}


def _split_by_ids(entries: list[tuple[Path, int, str]], class_names: dict[int, str], ids: list[int],
                  listed_in: Path) -> Split:
    classes = [class_names[i] for i in ids]
    wanted = set(ids)
    chosen = ((path, class_names[class_id], where) for path, class_id, where in entries if class_id in wanted)
    return Split(samples_from(chosen, classes, listed_in), classes)
