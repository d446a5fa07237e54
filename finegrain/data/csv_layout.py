"""Your own retrieval data as one CSV (OML's layout): path,label,split,is_query,is_gallery.

`split` is train or test; on test rows, is_query / is_gallery (1/0, true/false) say which images
query and which are searched. Every test image both query and gallery is the leave-one-out
protocol; no image both is a separate query set and gallery (In-Shop style); a mix of the two
is refused (a query found as its own neighbour would count as a hit).
"""
from __future__ import annotations

import csv
from pathlib import Path

from finegrain.data.base import Split, register, require_file, samples_from
from finegrain.data.lists import MAX_LIST_BYTES, MAX_LIST_LINES, check_unique, csv_rows, relative_path
from finegrain.errors import FinegrainError

COLUMNS = ("path", "label", "split", "is_query", "is_gallery")
DEFAULT_FILE = "dataset.csv"
LAYOUT = (f"ROOT/{DEFAULT_FILE} (or data.options.file) with the header {','.join(COLUMNS)}; paths relative to ROOT, "
          "split train|test, is_query/is_gallery 1|0 on test rows")
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}
_MAX_FIELD = 4096


@register("csv", LAYOUT)
def load_csv(root: Path, file: str = DEFAULT_FILE) -> dict[str, Split]:
    """train and test, plus query and gallery when the test rows are split into the two (see above);
    labels of each split index its own sorted class names."""
    path = require_file(root, relative_path(file, "data.options.file"), "csv")
    rows = _rows(path)
    check_unique(((row[0], where) for row, where in rows), "image")
    parts: dict[str, list[tuple[Path, str, str]]] = {"train": [], "test": [], "query": [], "gallery": []}
    for (image, label, split, is_query, is_gallery), where in rows:
        entry = (root / relative_path(image, where), label, where)
        if split == "train":
            parts["train"].append(entry)
            continue
        query, gallery = _flag(is_query, where, "is_query"), _flag(is_gallery, where, "is_gallery")
        if not (query or gallery):
            raise FinegrainError(f"{where}: a test image must be a query, in the gallery, or both. Set "
                                 "is_query or is_gallery to 1.")
        parts["test" if query and gallery else "query" if query else "gallery"].append(entry)
    separate = bool(parts["query"] or parts["gallery"])
    if separate and parts["test"]:
        raise FinegrainError(f"{path}: {len(parts['test'])} test images are both query and gallery, the others only "
                             "one of them. Use all-both (leave-one-out) or none-both (separate query set and gallery).")
    test_rows = parts["query"] + parts["gallery"] if separate else parts["test"]
    train_classes = sorted({label for _, label, _ in parts["train"]})
    test_classes = sorted({label for _, label, _ in test_rows})
    shared = sorted(set(train_classes) & set(test_classes))
    if shared:
        raise FinegrainError(f"{path}: label {shared[0]!r} is in both train and test rows; retrieval is evaluated "
                             "on unseen classes. Give the test rows their own labels.")
    splits = {"train": Split(samples_from(parts["train"], train_classes, path), train_classes),
              "test": Split(samples_from(test_rows, test_classes, path), test_classes)}
    if separate:
        for part in ("query", "gallery"):
            splits[part] = Split(samples_from(parts[part], test_classes, path), test_classes)
    return splits


def _rows(path: Path) -> list[tuple[list[str], str]]:
    """(the five fields, "FILE, line N") of each data row, after the header; bounded and checked."""
    reader = csv_rows(path, MAX_LIST_BYTES, "data set CSV")
    rows = []
    try:
        header = next(reader, None)
        if header is None or [name.strip() for name in header] != list(COLUMNS):
            raise FinegrainError(f"{path}: the first line must be the header {','.join(COLUMNS)}, found "
                                 f"{','.join(header or [])[:200]!r}.")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if not row:
                continue
            if len(row) != len(COLUMNS) or any(len(value) > _MAX_FIELD for value in row):
                raise FinegrainError(f"{where}: expected {len(COLUMNS)} fields ({','.join(COLUMNS)}) of at most "
                                     f"{_MAX_FIELD} characters, found {len(row)}. Quote fields holding commas.")
            row = [value.strip() for value in row]
            if not row[1]:
                raise FinegrainError(f"{where}: the label is empty. Give every image its class.")
            if row[2] not in ("train", "test"):
                raise FinegrainError(f"{where}: split must be train or test, got {row[2][:40]!r}.")
            rows.append((row, where))
            if len(rows) > MAX_LIST_LINES:
                raise FinegrainError(f"{path} has more than {MAX_LIST_LINES:,} rows.")
    except csv.Error as error:
        raise FinegrainError(f"{path}, line {reader.line_num}: not valid CSV ({error}).") from None
    return rows


def _flag(text: str, where: str, column: str) -> bool:
    if text.lower() not in _FLAGS:
        raise FinegrainError(f"{where}: {column} must be 1 or 0 (or true/false), got {text[:40]!r}.")
    return _FLAGS[text.lower()]
