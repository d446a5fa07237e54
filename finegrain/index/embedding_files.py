"""Readers of embeddings that come from outside: `.npy` arrays, the ids/metadata CSV beside them,
and the folder `finegrain embed` writes. Each is bounded and checked before it allocates.

A `.npy` is never unpickled: its header is parsed and checked (little-endian float, two
dimensions, C order, and a size that adds up to the file's) before numpy maps it. CSV files are
read up to a size bound, must be UTF-8, and every field is checked where it is parsed, so an
error names the file and line.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.data.lists import csv_rows, read_bounded
from finegrain.errors import FinegrainError
from finegrain.fileio import sha256_file
from finegrain.index.manifest import MAX_DIM, MAX_TEXT, _check_model

EMBEDDINGS_MANIFEST, ITEMS_CSV = "embeddings.json", "items.csv"
FORMAT, FORMAT_VERSION = "finegrain-embeddings", 1
ITEM_COLUMNS = ("id", "path", "label", "bytes", "sha256")
MAX_CSV_BYTES = 1 << 30
MAX_ROWS = 1 << 31
MAX_NPY_BYTES = 1 << 44
MAX_JSON_BYTES = 16 << 20
_NPY_DTYPES = (np.dtype("<f2"), np.dtype("<f4"), np.dtype("<f8"))
_CHUNK_BYTES = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHARD_NAME = re.compile(r"embeddings-[0-9]{6}\.npy")


def read_npy(path: Path) -> np.ndarray:
    """A read-only memory map of a 2-D float .npy, its header checked before numpy reads a value."""
    if not path.is_file():
        raise FinegrainError(f"Embeddings file {path} does not exist. Pass a .npy file or a folder of .npy files.")
    size = path.stat().st_size
    if size > MAX_NPY_BYTES:
        raise FinegrainError(f"{path} has {size} bytes, more than the {MAX_NPY_BYTES >> 40} TiB an index can hold.")
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            reader = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = reader(handle, max_header_size=1 << 16)
        except Exception as error:  # noqa: BLE001 - numpy's header parser raises many kinds on bad input
            raise FinegrainError(f"{path} is not a readable .npy file ({type(error).__name__}: {str(error)[:120]}). "
                                 "Save embeddings with numpy.save.") from None
        offset = handle.tell()
    if dtype not in _NPY_DTYPES or fortran_order or len(shape) != 2:
        raise FinegrainError(f"{path} holds {dtype} {shape}{' in Fortran order' if fortran_order else ''}; expected a "
                             "C-order [N, D] array of little-endian floats (float16/32/64). Save it with "
                             "numpy.save(path, np.ascontiguousarray(x, dtype=np.float32)).")
    rows, dim = shape
    if not (1 <= rows <= MAX_ROWS and 1 <= dim <= MAX_DIM):
        raise FinegrainError(f"{path} holds {rows} x {dim} embeddings; expected 1..{MAX_ROWS} rows of 1..{MAX_DIM} "
                             "values.")
    if offset + rows * dim * dtype.itemsize != size:
        raise FinegrainError(f"{path}: its header ({rows} x {dim} {dtype}) and its {size} bytes do not add up; the file "
                             "is truncated or damaged. Save it again.")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def unit_rows(array: np.ndarray, where: str, *, normalise: bool) -> np.ndarray:
    """float32 copy of `array` ([N, D]); every row finite and non-zero, L2-normalised if `normalise`,
    else already of unit norm (as `finegrain embed` writes them: kept bit for bit)."""
    out = np.empty(array.shape, dtype=np.float32)
    rows = max(1, _CHUNK_BYTES // (8 * array.shape[1]))
    for start in range(0, len(array), rows):
        block = np.asarray(array[start:start + rows], dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        bad = ~np.isfinite(norms) | (norms == 0) if normalise else ~(np.abs(norms - 1.0) < 1e-3)
        if bad.any():
            row = start + int(np.argmax(bad))
            problem = "holds NaN, inf or only zeros" if normalise else "is not a finite unit vector"
            raise FinegrainError(f"{where}: row {row} {problem}. Check how the embeddings were made.")
        out[start:start + rows] = block / norms[:, None] if normalise else array[start:start + rows]
    return out


def read_csv(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of a header-first UTF-8 CSV, each a {column: text} of the known columns, fields checked for size."""
    reader = csv_rows(path, MAX_CSV_BYTES, "metadata file")
    try:
        header = next(reader, None)
        if header is None or not set(required) <= set(header) or len(set(header)) != len(header):
            raise FinegrainError(f"{path}: the first line must name the columns, with {', '.join(required)} among them "
                                 f"(optional: {', '.join(optional) or 'none'}), each once; found {header!r:.200}.")
        columns = [name for name in header if name in required + optional]
        positions = [header.index(name) for name in columns]
        rows = []
        for row in reader:
            if len(row) != len(header):
                raise FinegrainError(f"{path}, line {reader.line_num}: {len(row)} fields, the header has {len(header)}. "
                                     "Quote fields that contain commas.")
            values = {name: row[position] for name, position in zip(columns, positions)}
            for name, value in values.items():
                if len(value) > MAX_TEXT or "\x00" in value:
                    raise FinegrainError(f"{path}, line {reader.line_num}: column {name} is longer than {MAX_TEXT} "
                                         "characters or holds a NUL. Shorten it.")
            rows.append(values)
            if len(rows) > MAX_ROWS:
                raise FinegrainError(f"{path} has more than {MAX_ROWS} rows.")
    except csv.Error as error:
        raise FinegrainError(f"{path}, line {reader.line_num}: not valid CSV ({error}).") from None
    return rows


def whole_number(text: str, where: str, what: str, high: int) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 19) or int(text) > high:
        raise FinegrainError(f"{where}: {what} must be a whole number in [0, {high}], got {text[:40]!r}.")
    return int(text)


def read_embed_manifest(folder: Path) -> dict[str, Any]:
    """embeddings.json of a `finegrain embed` folder, every field checked, every listed file's size and SHA-256 too."""
    path = folder / EMBEDDINGS_MANIFEST
    try:
        manifest = json.loads(read_bounded(path, MAX_JSON_BYTES, "embeddings manifest").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise FinegrainError(f"{path} is not valid JSON ({str(error)[:100]}). Run `finegrain embed` again.") from None
    fail = lambda problem: FinegrainError(f"{path}: {problem}. The folder is damaged or was changed; run "
                                          "`finegrain embed` again.")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise fail(f"it is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise fail(f"format_version is {manifest.get('format_version')!r:.40}, this finegrain reads {FORMAT_VERSION}")
    try:
        _check_model(manifest.get("model"), path)
    except (FinegrainError, AttributeError, TypeError) as error:
        raise fail(f"its model record is incomplete ({str(error)[:160]})") from None
    count, dim, shards = manifest.get("count"), manifest.get("dim"), manifest.get("shards")
    if not (isinstance(count, int) and 1 <= count <= MAX_ROWS and isinstance(dim, int) and 1 <= dim <= MAX_DIM):
        raise fail(f"count {count!r:.40} and dim {dim!r:.40} must be whole numbers >= 1")
    if not isinstance(shards, list) or not shards or len(shards) > 1 << 20:
        raise fail("shards must be a non-empty list")
    listed = [(ITEMS_CSV, manifest.get("items"))] + [(entry.get("file") if isinstance(entry, dict) else None, entry)
                                                      for entry in shards]
    for name, entry in listed:
        if not isinstance(entry, dict) or not isinstance(name, str) or not (name == ITEMS_CSV or
                                                                             _SHARD_NAME.fullmatch(name)):
            raise fail(f"file entry {name!r:.60} is not one this folder holds")
        if not (isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])
                and isinstance(entry.get("bytes"), int)):
            raise fail(f"file entry {name} lacks its sha256 and bytes")
        file = folder / name
        if file.is_symlink() or not file.is_file() or file.stat().st_size != entry["bytes"] \
                or sha256_file(file) != entry["sha256"]:
            raise fail(f"{name} is missing or fails its size or SHA-256 check")
    if sum(entry.get("rows", -1) if isinstance(entry.get("rows"), int) else -1 for entry in shards) != count:
        raise fail(f"the shards' rows do not add up to count {count}")
    return manifest
