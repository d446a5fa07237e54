"""The index folder: verified before faiss reads a byte, written whole or not at all.

faiss's reader trusts its input (a crafted file can crash or worse), so manifest.json lists the
SHA-256 and size of every file and nothing is handed to faiss, numpy or SQLite until all match;
the manifest itself is checksummed and checked field by field (finegrain.index.manifest), and
each file's format is checked against it as it is read (finegrain.index.files).
The embeddings are kept beside the index, so it can be rebuilt or re-tuned without re-embedding.

    INDEX_DIR/manifest.json    format, model (arch, weights path + SHA-256, preprocessing),
                               index (key, search parameters, measured recall, latency), build
                               facts, and {name: {sha256, bytes}} of the files below
    INDEX_DIR/manifest.sha256  SHA-256 of manifest.json (`sha256sum -c manifest.sha256`)
    INDEX_DIR/index.faiss      the faiss index; vector id i is row i of embeddings.npy
    INDEX_DIR/embeddings.npy   [count, dim] float32, L2-normalised
    INDEX_DIR/items.sqlite     table items(id, path, label, bytes, sha256): inspect with sqlite3
    INDEX_DIR/failed.json      [[path, reason], ...] of images that could not be decoded
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import faiss
import numpy as np

from finegrain.errors import FinegrainError
from finegrain.fileio import atomic_path, recover_swap, sha256_file
from finegrain.index.files import ITEMS_TABLE, load_embeddings, open_items, read_faiss, read_failed
from finegrain.index.manifest import (EMBEDDINGS_FILE, FAILED_FILE, FORMAT, FORMAT_VERSION, INDEX_FILE,
                                      ITEMS_FILE, MANIFEST, MANIFEST_CHECKSUM, REQUIRED_FILES, manifest_bytes,
                                      parse_parameters, read_manifest, rebuild_hint)
from finegrain.index.select import apply_parameters


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
        db.execute(ITEMS_TABLE)
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)",
                       ((i.id, i.path, i.label, i.bytes, i.sha256) for i in items))
    db.close()


def write_index_folder(out: str | Path, *, index: faiss.Index, embeddings: np.ndarray, items: list[Item],
                       failed: list[tuple[str, str]], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write a complete index folder at `out`, replacing an older one only once the new one is whole."""
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
        text, checksum = manifest_bytes(full)
        (tmp / MANIFEST).write_bytes(text)
        (tmp / MANIFEST_CHECKSUM).write_bytes(checksum)
    return full


def verify_files(root: str | Path) -> dict[str, Any]:
    """The checked manifest, once every file has its size and SHA-256 (nothing is parsed before)."""
    root = Path(root)
    recover_swap(root)  # a replacement interrupted between its two renames puts the old index back
    manifest = read_manifest(root)
    for name, expected in manifest["files"].items():
        path = root / name
        if path.is_symlink() or not path.is_file():
            raise FinegrainError(f"Index file {path} is missing or not a plain file. "
                                 f"The index is incomplete. {rebuild_hint(root)}")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise FinegrainError(f"Index file {path} has {size} bytes, the manifest says {expected['bytes']}: "
                                 f"it is truncated or was changed. Refusing to load it. {rebuild_hint(root)}")
    for name, expected in manifest["files"].items():
        if sha256_file(root / name) != expected["sha256"]:
            raise FinegrainError(f"Index file {root / name} fails its SHA-256 check: it is corrupt or was changed "
                                 f"after the build. Refusing to load it. {rebuild_hint(root)}")
    return manifest


class IndexFolder:
    """A verified, loaded index folder: faiss index (memory-mapped), embeddings (mmap), items."""

    def __init__(self, root: str | Path, *, mmap: bool = True, gpu: bool | None = None) -> None:
        self.root = Path(root)
        self.manifest = verify_files(self.root)
        self._db = open_items(self.root / ITEMS_FILE, self.count)
        try:
            self._load(mmap, gpu)
        except BaseException:
            self._db.close()
            raise

    def _load(self, mmap: bool, gpu: bool | None) -> None:
        """Read each verified file with its own format checks (see finegrain.index.files)."""
        count, dim, section = self.count, self.dim, self.manifest["index"]
        self.embeddings = load_embeddings(self.root / EMBEDDINGS_FILE, count, dim, mmap)
        self.failed = read_failed(self.root / FAILED_FILE)
        parameters = parse_parameters(section["parameters"], section["key"], self.root / MANIFEST)
        self.index = read_faiss(self.root / INDEX_FILE, count, dim, section["key"], parameters, mmap)
        apply_parameters(self.index, section["parameters"])  # the GPU copy inherits nprobe
        if gpu is not False and faiss.get_num_gpus() > 0:
            self.index = _to_gpu(self.index)

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
            found.update({row[0]: Item(*row) for row in self._query(query, part)})
        missing = next((i for i in ids if i not in found), None)
        if missing is not None:  # a damaged b-tree can hide a row that a full scan counted
            raise FinegrainError(f"{self.root / ITEMS_FILE} has no item for vector {missing}. "
                                 f"{rebuild_hint(self.root)}")
        return [found[i] for i in ids]

    def all_items(self) -> list[Item]:
        return [Item(*row) for row in self._query("SELECT id, path, label, bytes, sha256 FROM items ORDER BY id")]

    def item_with_checksum(self, sha256: str) -> Item | None:
        """The indexed image with this content, if any (the column is UNIQUE, so this is a lookup)."""
        rows = self._query("SELECT id, path, label, bytes, sha256 FROM items WHERE sha256 = ?", [sha256])
        return Item(*rows[0]) if rows else None

    def checksums(self) -> set[str]:
        return {row[0] for row in self._query("SELECT sha256 FROM items")}

    def labels(self) -> set[str]:
        """The classes present in the collection."""
        return {row[0] for row in self._query("SELECT DISTINCT label FROM items WHERE label IS NOT NULL")}

    def _query(self, sql: str, parameters: Iterable[Any] = ()) -> list[tuple]:
        """Rows of a query; a value the load-time checks did not decode may still not be UTF-8."""
        try:
            return self._db.execute(sql, list(parameters)).fetchall()
        except (sqlite3.Error, UnicodeDecodeError) as error:
            raise FinegrainError(f"{self.root / ITEMS_FILE}: SQLite cannot read it ({str(error)[:200]}). "
                                 f"{rebuild_hint(self.root)}") from None

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
