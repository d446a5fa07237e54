"""Readers of an index folder's data files, each checked against the manifest before it is parsed.

The files have passed their SHA-256 check, but whoever wrote the manifest chose those sums: each
reader checks the format itself (the .npy header, the SQLite schema, the JSON shape, the faiss
header) and sizes against the manifest's count and dimension, and bounds what faiss may allocate,
so a crafted file ends in a FinegrainError instead of a traceback or an exhausted memory.
"""
from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path
from typing import NoReturn

import faiss
import numpy as np

from finegrain.errors import FinegrainError
from finegrain.index.manifest import FLAT_HEADER_BYTES, MAX_TEXT, TUNABLE, rebuild_hint, tunable_parameter

ITEMS_TABLE = ("CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT NOT NULL, label TEXT, "
               "bytes INTEGER NOT NULL, sha256 TEXT NOT NULL UNIQUE)")
_ITEMS_SCHEMA = [("table", "items", "items", ITEMS_TABLE), ("index", "sqlite_autoindex_items_1", "items", None)]
_BAD_ITEM_ROWS = ("SELECT COUNT(DISTINCT id), MIN(id), MAX(id), TOTAL(typeof(path) != 'text' OR length(path) > :text "
                  "OR (label IS NOT NULL AND (typeof(label) != 'text' OR length(label) > :text)) "
                  "OR typeof(bytes) != 'integer' OR bytes < 0 OR typeof(sha256) != 'text' OR length(sha256) != 64 "
                  "OR sha256 GLOB '*[^0-9a-f]*') FROM items")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_FAISS_HEADER = struct.Struct("<4siqqqBi")  # fourcc, d, ntotal, 2 reserved, is_trained, metric
_FINITE_CHUNK = 1 << 16


def _fail(path: Path, problem: str) -> NoReturn:
    raise FinegrainError(f"{path}: {problem}. The index is damaged or was changed. {rebuild_hint(path.parent)}")


def load_embeddings(path: Path, count: int, dim: int, mmap: bool) -> np.ndarray:
    """[count, dim] finite float32 from a .npy whose header was read and checked first (never pickled)."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(handle)
        except Exception as error:  # noqa: BLE001 - numpy's header parser raises many kinds on bad input
            _fail(path, f"it is not a readable .npy file ({type(error).__name__}: {str(error)[:120]})")
        offset = handle.tell()
    if dtype != np.dtype("<f4") or fortran_order or shape != (count, dim):
        _fail(path, f"it holds {dtype} {shape}{' (Fortran order)' if fortran_order else ''}, the manifest says "
                    f"float32 ({count}, {dim})")
    if offset + 4 * count * dim != path.stat().st_size:
        _fail(path, f"its header and {count} x {dim} float32 values do not add up to its {path.stat().st_size} bytes")
    embeddings = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    for start in range(0, count, _FINITE_CHUNK):
        if not np.isfinite(embeddings[start:start + _FINITE_CHUNK]).all():
            _fail(path, "it holds NaN or infinite values")
    return embeddings


def read_failed(path: Path) -> list[tuple[str, str]]:
    """failed.json: [[path, reason], ...] of the images a build could not decode."""
    try:
        entries = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        _fail(path, f"it is not valid JSON ({str(error)[:100]})")
    if not isinstance(entries, list) or not all(
            isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)
            for entry in entries):
        _fail(path, "it is not a list of [path, reason] pairs")
    return [(path_, reason) for path_, reason in entries]


def open_items(path: Path, count: int) -> sqlite3.Connection:
    """items.sqlite, read-only, with exactly the schema we write and `count` well-typed rows, ids 0..count-1."""
    with open(path, "rb") as handle:
        if handle.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
            _fail(path, "it is not an SQLite database")
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False)
    try:
        db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1 << 20)  # no row or value a crafted file inflates
        schema = db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()
        if schema != _ITEMS_SCHEMA:
            _fail(path, "its tables are not the items table finegrain writes")
        problems = db.execute("PRAGMA quick_check(3)").fetchall()  # b-tree order: lookups by id must work
        if problems != [("ok",)]:
            found = "; ".join(str(row[0]).replace("*** in database main ***", "").strip() for row in problems)
            _fail(path, f"it fails SQLite's integrity check ({' '.join(found.split())[:200]})")
        rows, low, high, bad = db.execute(_BAD_ITEM_ROWS, {"text": MAX_TEXT}).fetchone()
        if bad:
            _fail(path, f"{int(bad)} rows have a path, label, size or SHA-256 of the wrong type or form")
        if rows != count or (low, high) != (0, count - 1):
            _fail(path, f"it lists {rows} items (ids {low}..{high}), the manifest says {count} (ids 0..{count - 1})")
    except (sqlite3.Error, UnicodeDecodeError) as error:  # text that is not UTF-8 fails as Python decodes it
        db.close()
        _fail(path, f"SQLite cannot read it ({str(error)[:200]})")
    except BaseException:
        db.close()
        raise
    return db


def read_faiss(path: Path, count: int, dim: int, key: str, parameters: dict[str, int], mmap: bool) -> faiss.Index:
    """The faiss index, its header checked before faiss reads it and its allocations bounded by the file size."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(FLAT_HEADER_BYTES)
    if len(head) < _FAISS_HEADER.size:
        _fail(path, f"it has {size} bytes, too few for a faiss index")
    fourcc, d, ntotal, _, _, trained, metric = _FAISS_HEADER.unpack_from(head)
    if (d, ntotal) != (dim, count) or trained != 1 or metric != faiss.METRIC_INNER_PRODUCT:
        _fail(path, f"its header says {ntotal} vectors of dimension {d} (trained {trained}, metric {metric}), the "
                    f"manifest says {count} of dimension {dim} (trained, inner product)")
    if key == "Flat" and (fourcc != b"IxFI" or struct.unpack_from("<q", head, _FAISS_HEADER.size)[0] != count * dim):
        _fail(path, f"it is not an exact inner-product index of {count} x {dim} vectors, as the manifest says")
    index = _read_bounded(path, size, count, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    if index.ntotal != count or index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        _fail(path, f"it holds {index.ntotal} vectors of dimension {index.d}, the manifest says {count} of dimension "
                    f"{dim} (the files do not belong together)")
    _check_type(index, key, parameters, path)
    return index


def _read_bounded(path: Path, size: int, count: int, flags: int) -> faiss.Index:
    """faiss.read_index with every vector it reads limited to the file's size and its loops to the collection's."""
    saved = faiss.get_deserialization_vector_byte_limit(), faiss.get_deserialization_loop_limit()
    faiss.set_deserialization_vector_byte_limit(size + 1)
    faiss.set_deserialization_loop_limit(max(count, 1 << 20))
    try:
        return faiss.read_index(str(path), flags)
    except (RuntimeError, MemoryError) as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        _fail(path, f"faiss cannot read it ({lines[-1][:200]})")
    finally:
        faiss.set_deserialization_vector_byte_limit(saved[0])
        faiss.set_deserialization_loop_limit(saved[1])


def _kind(index: faiss.Index) -> str:
    """'IVF', 'HNSW', 'Flat' (through IDMap and pre-transform wrappers), or the faiss class name."""
    if faiss.try_extract_index_ivf(index) is not None:
        return "IVF"
    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return "HNSW"
    return "Flat" if isinstance(inner, faiss.IndexFlat) else type(inner).__name__


def _check_type(index: faiss.Index, key: str, parameters: dict[str, int], path: Path) -> None:
    """The index is of the kind the manifest's key names, so its search parameter means what it says."""
    found = _kind(index)
    expected = "Flat" if key == "Flat" else TUNABLE.get(tunable_parameter(key) or "")
    if expected is None:  # a key without a search parameter (PQ, LSH, ...) names none of the three
        mismatch = found in ("Flat", "IVF", "HNSW")
    else:
        mismatch = found != expected
    if mismatch:
        _fail(path, f"it is a {found} index, the manifest says {key!r}")
    nlist = faiss.extract_index_ivf(index).nlist if found == "IVF" else 0
    if parameters.get("nprobe", 1) > max(nlist, 1):
        _fail(path, f"the manifest's nprobe={parameters['nprobe']} exceeds the index's {nlist} lists")
