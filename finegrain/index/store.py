"""The index folder: verified before faiss reads a byte, written whole or not at all.

faiss's reader trusts its input (a crafted file can crash or worse), so manifest.json lists the
SHA-256 and size of every file and nothing is handed to faiss, numpy or SQLite until all match.
The embeddings are kept beside the index, so it can be rebuilt or re-tuned without re-embedding.

    INDEX_DIR/manifest.json    format, model (arch, weights path + SHA-256, preprocessing),
                               index (key, search parameters, measured recall, latency), build
                               facts, and {name: {sha256, bytes}} of the files below
    INDEX_DIR/index.faiss      the faiss index; vector id i is row i of embeddings.npy
    INDEX_DIR/embeddings.npy   [count, dim] float32, L2-normalised
    INDEX_DIR/items.sqlite     table items(id, path, label, bytes, sha256): inspect with sqlite3
    INDEX_DIR/failed.json      [[path, reason], ...] of images that could not be decoded
"""
from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import faiss
import numpy as np

from finegrain.errors import FinegrainError
from finegrain.fileio import atomic_path, sha256_file
from finegrain.index.select import apply_parameters

FORMAT = "finegrain-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE, EMBEDDINGS_FILE, ITEMS_FILE, FAILED_FILE = "index.faiss", "embeddings.npy", "items.sqlite", "failed.json"
REQUIRED_FILES = (INDEX_FILE, EMBEDDINGS_FILE, ITEMS_FILE, FAILED_FILE)
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
_PARAMETERS = re.compile(r"([A-Za-z_]+=\d+(,[A-Za-z_]+=\d+)*)?")
_MANIFEST_FIELDS = (("count", int), ("dim", int), ("model", dict), ("index", dict), ("build", dict), ("files", dict))


@dataclass(frozen=True)
class Item:
    """One indexed image: its vector id, where it was, its class (parent folder), bytes, checksum."""

    id: int
    path: str
    label: str | None
    bytes: int
    sha256: str


def _write_items(path: Path, items: Iterable[Item]) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT NOT NULL, label TEXT, "
                   "bytes INTEGER NOT NULL, sha256 TEXT NOT NULL UNIQUE)")
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)",
                       ((i.id, i.path, i.label, i.bytes, i.sha256) for i in items))
    db.close()


def write_index_folder(out: str | Path, *, index: faiss.Index, embeddings: np.ndarray, items: list[Item],
                       failed: list[tuple[str, str]], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write a complete index folder at `out` in one rename (replacing an older one only on success)."""
    if not (len(items) == len(embeddings) == index.ntotal):
        raise FinegrainError(f"Refusing to write an index whose parts disagree: {len(items)} items, "
                             f"{len(embeddings)} embeddings, {index.ntotal} vectors. This is a bug; please report it.")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        faiss.write_index(index, str(tmp / INDEX_FILE))
        np.save(tmp / EMBEDDINGS_FILE, np.ascontiguousarray(embeddings, dtype=np.float32), allow_pickle=False)
        _write_items(tmp / ITEMS_FILE, items)
        (tmp / FAILED_FILE).write_text(json.dumps([list(entry) for entry in failed], indent=0))
        files = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                 for name in REQUIRED_FILES}
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                "count": len(items), "dim": int(embeddings.shape[1]), "metric": "inner_product", "files": files}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2))
    return full


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest alone (JSON, safe to parse), with its shape checked."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise FinegrainError(f"{root} is not a finegrain index (no {MANIFEST}). "
                             "Build one with `finegrain index build`.")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FinegrainError(f"{path} is not valid JSON ({error}). The index is damaged: rebuild it.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FinegrainError(f"{path} is not a finegrain index manifest. "
                             "Point --index at a folder made by `finegrain index build`.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FinegrainError(f"{root} has index format version {manifest.get('format_version')}, this finegrain reads "
                             f"{FORMAT_VERSION}. Rebuild the index with this version.")
    for key, kind in _MANIFEST_FIELDS:
        if not isinstance(manifest.get(key), kind):
            raise FinegrainError(f"{path} has no valid {key!r} entry. The index is damaged: rebuild it.")
    parameters = manifest["index"].get("parameters")
    if not isinstance(parameters, str) or not _PARAMETERS.fullmatch(parameters):
        raise FinegrainError(f"{path} has unreadable search parameters {manifest['index'].get('parameters')!r}. "
                             "The index is damaged: rebuild it.")
    return manifest


def verify_files(root: str | Path) -> dict[str, Any]:
    """Check every file against the manifest's size and SHA-256 before anything parses it."""
    root = Path(root)
    manifest = read_manifest(root)
    files = manifest["files"]
    if not set(REQUIRED_FILES) <= set(files) or not all(isinstance(entry, dict) for entry in files.values()):
        raise FinegrainError(f"{root / MANIFEST} does not list all of {', '.join(REQUIRED_FILES)}. Rebuild the index.")
    for name, expected in files.items():
        path = root / name
        if not _SAFE_NAME.fullmatch(name) or path.is_symlink() or not path.is_file():
            raise FinegrainError(f"Index file {path} is missing or not a plain file. "
                                 "The index is incomplete: rebuild it.")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise FinegrainError(f"Index file {path} has {size} bytes, the manifest says {expected.get('bytes')}: "
                                 "it is truncated or was changed. Refusing to load it; rebuild the index.")
        if sha256_file(path) != expected.get("sha256"):
            raise FinegrainError(f"Index file {path} fails its SHA-256 check: it is corrupt or was changed after the "
                                 f"build. Refusing to load it; rebuild the index (or restore the file).")
    return manifest


class IndexFolder:
    """A verified, loaded index folder: faiss index (memory-mapped), embeddings (mmap), items."""

    def __init__(self, root: str | Path, *, mmap: bool = True, gpu: bool | None = None) -> None:
        self.root = Path(root)
        self.manifest = verify_files(self.root)
        self._db = sqlite3.connect(f"{(self.root / ITEMS_FILE).resolve().as_uri()}?mode=ro&immutable=1", uri=True,
                                   check_same_thread=False)
        try:
            self._load(mmap, gpu)
        except BaseException:
            self._db.close()
            raise

    def _load(self, mmap: bool, gpu: bool | None) -> None:
        """Check that the verified files belong together (counts, dimensions), then read them."""
        count, dim = int(self.manifest["count"]), int(self.manifest["dim"])
        self.embeddings = np.load(self.root / EMBEDDINGS_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
        if self.embeddings.dtype != np.float32 or self.embeddings.shape != (count, dim):
            raise FinegrainError(f"{self.root / EMBEDDINGS_FILE} holds {self.embeddings.dtype} "
                                 f"{self.embeddings.shape}, the manifest says float32 ({count}, {dim}). "
                                 f"The files do not belong together: rebuild the index.")
        rows, low, high = self._db.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM items").fetchone()
        if rows != count or (count and (low, high) != (0, count - 1)):
            raise FinegrainError(f"{self.root / ITEMS_FILE} lists {rows} items (ids {low}..{high}), the manifest "
                                 f"says {count} (ids 0..{count - 1}). The files do not belong together: "
                                 "rebuild the index.")
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        self.index = faiss.read_index(str(self.root / INDEX_FILE), flags)
        if self.index.ntotal != count or self.index.d != dim:
            raise FinegrainError(f"{self.root / INDEX_FILE} holds {self.index.ntotal} vectors of dimension "
                                 f"{self.index.d}, the manifest and embeddings say {count} of dimension {dim}. "
                                 f"The files do not belong together: rebuild the index.")
        apply_parameters(self.index, self.manifest["index"]["parameters"])  # the GPU copy inherits nprobe
        if gpu is not False and faiss.get_num_gpus() > 0:
            self.index = _to_gpu(self.index)
        self.failed = [tuple(entry) for entry in json.loads((self.root / FAILED_FILE).read_text())]

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def items(self, ids: Iterable[int]) -> list[Item]:
        """Items for vector ids, in the order given."""
        ids = [int(i) for i in ids]
        found: dict[int, Item] = {}
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            part = ids[start:start + 900]
            query = f"SELECT id, path, label, bytes, sha256 FROM items WHERE id IN ({','.join('?' * len(part))})"
            found.update({row[0]: Item(*row) for row in self._db.execute(query, part)})
        return [found[i] for i in ids]

    def all_items(self) -> list[Item]:
        return [Item(*row) for row in self._db.execute("SELECT id, path, label, bytes, sha256 FROM items ORDER BY id")]

    def checksums(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT sha256 FROM items")}

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "IndexFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """Move to all GPUs where faiss supports the index type (Flat, IVF); HNSW stays on CPU."""
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):
        return index
