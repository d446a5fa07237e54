"""Embeddings in and out: `finegrain embed` and `finegrain index build --embeddings`.

`embed_images` writes what `index build` would index, without the index: the same checksum
pass (duplicates by content skipped), the same resumable embedding shards (eval/embed.py,
torchrun-aware), then a folder other tools read with numpy and a CSV reader:

    OUT/embeddings-000000.npy ...  [rows, dim] float32, L2-normalised, in id order
    OUT/items.csv                  id,path,label,bytes,sha256 (one row per embedding)
    OUT/embeddings.json            format, model record, count, dim, each file's SHA-256 and size,
                                   build facts and the images that could not be read

`build_index_from_embeddings` makes an index folder (same checksummed manifest as `index build`)
from such a folder, or from any .npy (a file, or a folder of them in name order) with an
optional CSV of ids (column `id`, optional `label` and `path`): embeddings made elsewhere come
with no model, so their index is searched by vector (`index.search.search_by_vector`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from finegrain import __version__
from finegrain.errors import FinegrainError
from finegrain.eval.embed import DEFAULT_SHARD_SIZE
from finegrain.fileio import atomic_path, sha256_file
from finegrain.index.build import BuildReport, _index_section, check_build_options, embed_collection, model_record
from finegrain.index.embedding_files import (EMBEDDINGS_MANIFEST, FORMAT, FORMAT_VERSION, ITEM_COLUMNS, ITEMS_CSV,
                                             read_csv, read_embed_manifest, read_npy, unit_rows, whole_number)
from finegrain.index.manifest import MAX_FILE_BYTES
from finegrain.index.select import parse_memory
from finegrain.index.store import Item, write_index_folder


@dataclass
class EmbedReport:
    """What `embed_images` wrote: the manifest and counts a user wants to see."""

    manifest: dict[str, Any]
    failed: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    shards_reused: int = 0


def embed_images(images: str | Path, out: str | Path, *, weights: str | Path, batch_size: int = 64,
                 device: str | None = None, workers: int = 0, shard_size: int = DEFAULT_SHARD_SIZE,
                 progress: bool = True, on_shard: Callable[[int, bool], None] | None = None) -> EmbedReport:
    """Embed every image under `images` with the model in `weights` into the folder `out` (see above).

    The work shards live beside `out` until the folder is written (atomically), so a killed run
    resumes from its last finished shard.
    """
    out, root = Path(out), Path(images)
    if out.exists() and not (out / EMBEDDINGS_MANIFEST).is_file():
        raise FinegrainError(f"{out} exists and is not a `finegrain embed` folder. Choose a new --out folder.")
    start = time.perf_counter()
    pass_ = embed_collection(weights, root, out, batch_size=batch_size, device=device, workers=workers,
                             shard_size=shard_size, progress=progress, on_shard=on_shard)
    model, fingerprint, vectors, kept = pass_.model, pass_.fingerprint, pass_.vectors, pass_.kept
    failed, duplicates, reused, work_dir = pass_.failed, pass_.duplicates, pass_.reused, pass_.work_dir
    if not pass_.is_main:  # rank 0 alone writes the folder
        return EmbedReport({}, failed, duplicates, reused)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        shards = []
        for number, first in enumerate(range(0, len(vectors), shard_size)):
            name = f"embeddings-{number:06d}.npy"
            np.save(tmp / name, np.ascontiguousarray(vectors[first:first + shard_size], dtype=np.float32),
                    allow_pickle=False)
            shards.append({"file": name, "rows": min(shard_size, len(vectors) - first), **_file_entry(tmp / name)})
        (tmp / ITEMS_CSV).write_text(_items_csv(kept), encoding="utf-8")
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "model": model_record(model, weights, fingerprint), "count": len(kept),
                    "dim": int(vectors.shape[1]), "shards": shards, "items": _file_entry(tmp / ITEMS_CSV),
                    "build": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "finegrain_version": __version__, "sources": [str(root.resolve())],
                              "duplicates": len(duplicates), "seconds": round(time.perf_counter() - start, 2)},
                    "failed": [list(entry) for entry in failed]}
        (tmp / EMBEDDINGS_MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    shutil.rmtree(work_dir, ignore_errors=True)
    return EmbedReport(manifest, failed, duplicates, reused)


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _items_csv(items: list[Item]) -> str:
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(ITEM_COLUMNS)
    writer.writerows((item.id, item.path, "" if item.label is None else item.label, item.bytes, item.sha256)
                     for item in items)
    return text.getvalue()


@dataclass
class EmbeddingSource:
    """Embeddings ready to index: unit rows, one item each, and the model that made them (None if unknown)."""

    vectors: np.ndarray
    items: list[Item]
    model: dict[str, Any] | None
    failed: list[tuple[str, str]]
    sources: list[str]
    duplicates: int = 0  # images skipped by `finegrain embed` as already seen (same content)


def read_embed_folder(folder: Path) -> EmbeddingSource:
    """A `finegrain embed` folder, every file checked against its manifest before it is read."""
    manifest = read_embed_manifest(folder)
    count, dim = manifest["count"], manifest["dim"]
    vectors = np.empty((count, dim), dtype=np.float32)
    first = 0
    for entry in manifest["shards"]:
        array = read_npy(folder / entry["file"])
        if array.shape != (entry["rows"], dim) or array.dtype != np.float32:
            raise FinegrainError(f"{folder / entry['file']} holds {array.dtype} {array.shape}, {EMBEDDINGS_MANIFEST} "
                                 f"says float32 ({entry['rows']}, {dim}). Run `finegrain embed` again.")
        vectors[first:first + len(array)] = unit_rows(array, str(folder / entry["file"]), normalise=False)
        first += len(array)
    rows = read_csv(folder / ITEMS_CSV, ITEM_COLUMNS)
    if len(rows) != count:
        raise FinegrainError(f"{folder / ITEMS_CSV} lists {len(rows)} items, {EMBEDDINGS_MANIFEST} says {count}. "
                             "Run `finegrain embed` again.")
    items = []
    for number, row in enumerate(rows):
        where = f"{folder / ITEMS_CSV}, item {number}"
        if whole_number(row["id"], where, "id", MAX_FILE_BYTES) != number:
            raise FinegrainError(f"{where}: ids must run 0, 1, 2, ... in order. Run `finegrain embed` again.")
        items.append(Item(number, row["path"], row["label"] or None,
                          whole_number(row["bytes"], where, "bytes", MAX_FILE_BYTES), _sha256_text(row["sha256"], where)))
    _check_unique((item.sha256 for item in items), folder / ITEMS_CSV, "image content (sha256)")
    failed = manifest.get("failed", [])
    if not (isinstance(failed, list) and all(isinstance(e, list) and len(e) == 2 and all(isinstance(p, str) for p in e)
                                             for e in failed)):
        raise FinegrainError(f"{folder / EMBEDDINGS_MANIFEST}: failed is not a list of [path, reason] pairs.")
    duplicates = manifest.get("build", {}).get("duplicates", 0) if isinstance(manifest.get("build"), dict) else 0
    if isinstance(duplicates, bool) or not isinstance(duplicates, int) or not 0 <= duplicates <= MAX_FILE_BYTES:
        raise FinegrainError(f"{folder / EMBEDDINGS_MANIFEST}: build.duplicates is not a count. Run `finegrain embed` "
                             "again.")
    return EmbeddingSource(vectors, items, manifest["model"], [tuple(e) for e in failed], [str(folder.resolve())],
                           duplicates)


def read_external(source: Path, metadata: Path | None = None) -> EmbeddingSource:
    """Any .npy (or a folder of .npy files, in name order) and an optional CSV of ids (`id`, optional
    `label`, `path`), one row per embedding; without it the ids are the row numbers."""
    files = sorted(source.glob("*.npy")) if source.is_dir() else [source]
    if not files:
        raise FinegrainError(f"{source} holds no .npy files. Pass a .npy file, a folder of them, or a `finegrain embed` "
                             "folder.")
    arrays = [read_npy(path) for path in files]
    widths = {array.shape[1] for array in arrays}
    if len(widths) > 1:
        raise FinegrainError(f"The .npy files under {source} have different widths ({sorted(widths)}). Pass embeddings "
                             "of one model.")
    vectors = np.concatenate([unit_rows(array, str(path), normalise=True) for array, path in zip(arrays, files)])
    if metadata is None:
        ids, labels, paths = [str(i) for i in range(len(vectors))], [None] * len(vectors), None
    else:
        rows = read_csv(metadata, ("id",), ("label", "path"))
        if len(rows) != len(vectors):
            raise FinegrainError(f"{metadata} lists {len(rows)} rows for {len(vectors)} embeddings. Give one row per "
                                 "embedding, in the same order.")
        ids = [row["id"] for row in rows]
        labels = [row.get("label") or None for row in rows]
        paths = [row.get("path") or row["id"] for row in rows]
        _check_unique(ids, metadata, "id")
    items = [Item(i, paths[i] if paths else ids[i], labels[i], 0, hashlib.sha256(ids[i].encode()).hexdigest())
             for i in range(len(vectors))]
    return EmbeddingSource(vectors, items, None, [], [str(source.resolve())])


def build_index_from_embeddings(source: str | Path, out: str | Path, *, metadata: str | Path | None = None,
                                index_key: str | None = None, max_memory: str | int = "4G",
                                recall_target: float = 0.95, recall_k: int = 10,
                                progress: bool = True) -> BuildReport:
    """An index folder at `out` from a `finegrain embed` folder or from .npy embeddings (see above)."""
    source, out = Path(source), Path(out)
    check_build_options(out, recall_target, recall_k)
    budget = parse_memory(max_memory)
    start = time.perf_counter()
    if (source / EMBEDDINGS_MANIFEST).is_file():
        if metadata is not None:
            raise FinegrainError(f"{source} is a `finegrain embed` folder with its own items.csv; drop --metadata.")
        embedded = read_embed_folder(source)
    else:
        embedded = read_external(source, Path(metadata) if metadata is not None else None)
    index, section = _index_section(embedded.vectors, index_key, budget, recall_target, recall_k, progress)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = {"model": embedded.model, "index": section,
                "build": {"created": now, "updated": now, "finegrain_version": __version__,
                          "sources": embedded.sources, "failed": len(embedded.failed), "duplicates": embedded.duplicates,
                          "seconds": round(time.perf_counter() - start, 2)}}
    written = write_index_folder(out, index=index, embeddings=embedded.vectors, items=embedded.items,
                                 failed=embedded.failed, manifest=manifest)
    return BuildReport(written, len(embedded.items), embedded.failed)


def _sha256_text(text: str, where: str) -> str:
    if len(text) != 64 or any(char not in "0123456789abcdef" for char in text):
        raise FinegrainError(f"{where}: sha256 must be 64 lower-case hex digits, got {text[:70]!r}. Run `finegrain "
                             "embed` again.")
    return text


def _check_unique(keys: Iterable[str], path: Path, what: str) -> None:
    seen: set[str] = set()
    for number, key in enumerate(keys):
        if key in seen:
            raise FinegrainError(f"{path}, row {number}: {what} {key[:80]!r} is listed twice. Each must be unique.")
        seen.add(key)
