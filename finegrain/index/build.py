"""`finegrain index build` and `add`: images -> checksums -> embeddings -> tuned faiss index.

Both end the same way: the faiss index is rebuilt from all kept embeddings (cheap next to
embedding) and re-tuned, so the recall written in the manifest is always measured on the index
as it is, never carried over from a smaller one.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from finegrain import __version__
from finegrain.data.base import IMAGE_EXTENSIONS
from finegrain.errors import FinegrainError
from finegrain import distributed
from finegrain.eval.embed import DEFAULT_SHARD_SIZE, embed_paths, embedding_mode
from finegrain.fileio import sha256_file
from finegrain.index.select import build_tuned_index, parse_memory
from finegrain.index.store import IndexFolder, Item, write_index_folder


@dataclass
class BuildReport:
    """What a build or add did: the manifest written plus counts a user wants to see."""

    manifest: dict[str, Any]
    added: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    shards_reused: int = 0


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted (hidden files and folders skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FinegrainError(f"Image folder {folder} does not exist. Pass a folder of images (sub-folders = classes).")
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    if not files:
        raise FinegrainError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}). "
                             "Point at a folder of images.")
    return files


def _label(path: Path, root: Path) -> str | None:
    """The class of an image is its parent folder's name; images directly in the root have none."""
    return path.parent.name if path.parent.resolve() != root.resolve() else None


def load_weights(weights: str | Path) -> tuple[nn.Module, str]:
    """The model saved by `finegrain.save_model` and the SHA-256 fingerprint of its file."""
    from finegrain.models import load_model

    return load_model(weights), sha256_file(weights)


def model_record(model: nn.Module, weights: str | Path, fingerprint: str) -> dict[str, Any]:
    return {"arch": getattr(model, "arch", type(model).__name__), "weights": str(Path(weights).resolve()),
            "weights_sha256": fingerprint, "embedding": embedding_mode(model),
            "preprocessing": json.loads(model.preprocessing.to_json())}


Failures = list[tuple[str, str]]


def _new_items(paths: list[Path], root: Path, known: set[str],
               progress: bool) -> tuple[list[Item], list[str], Failures]:
    """Checksum each file; keep the first of each content not already `known` (ids assigned later)."""
    items, duplicates, failed = [], [], []
    seen = set(known)
    for path in tqdm(paths, desc="checksums", unit="img", disable=not progress):
        try:
            digest, size = sha256_file(path), path.stat().st_size
        except OSError as error:
            failed.append((str(path), f"{type(error).__name__}: {error}"))
            continue
        if digest in seen:
            duplicates.append(str(path))
            continue
        seen.add(digest)
        items.append(Item(-1, str(path.resolve()), _label(path, root), size, digest))
    return items, duplicates, failed


def _embed_items(model: nn.Module, items: list[Item], fingerprint: str, work_dir: Path, *, first_id: int,
                 batch_size: int, device: str | None, workers: int, shard_size: int, progress: bool,
                 on_shard: Callable[[int, bool], None] | None) -> tuple[np.ndarray, list[Item], Failures, int]:
    cache_key = f"{fingerprint}\n{model.preprocessing.to_json()}\n{embedding_mode(model)}"
    result = embed_paths(model, [item.path for item in items], model.preprocessing, batch_size=batch_size,
                         device=device, workers=workers, progress=progress, work_dir=work_dir, shard_size=shard_size,
                         cache_key=cache_key, on_shard=on_shard)
    by_path = {item.path: item for item in items}
    kept = [Item(first_id + i, path, by_path[path].label, by_path[path].bytes, by_path[path].sha256)
            for i, path in enumerate(result.ok_paths)]
    return result.embeddings, kept, result.failed, result.shards_reused


@dataclass
class CollectionPass:
    """The embeddings of a folder's new images, for an index or an embed folder about to be written."""

    model: nn.Module
    fingerprint: str
    vectors: np.ndarray
    kept: list[Item]
    failed: list[tuple[str, str]]
    duplicates: list[str]
    reused: int
    work_dir: Path
    is_main: bool


def embed_collection(weights: str | Path, root: Path, out: Path, *, batch_size: int, device: str | None,
                     workers: int, shard_size: int, progress: bool,
                     on_shard: Callable[[int, bool], None] | None) -> CollectionPass:
    """Embed every image under `root` (torchrun shares the work) in resumable shards kept beside
    `out` until it is written; rank 0 refuses a folder where no image decodes."""
    info = distributed.init_distributed()
    model, fingerprint = load_weights(weights)
    items, duplicates, failed = _new_items(list_images(root), root, set(), progress)
    work_dir = out.parent / f".{out.name}.embedding-work"
    vectors, kept, bad, reused = _embed_items(model, items, fingerprint, work_dir, first_id=0, batch_size=batch_size,
                                              device=device, workers=workers, shard_size=shard_size, progress=progress,
                                              on_shard=on_shard)
    failed += bad
    if info.is_main and not kept:
        raise FinegrainError(f"None of the images under {root} could be decoded (e.g. {failed[0][0]}: {failed[0][1]}). "
                             "Check the folder.")
    return CollectionPass(model, fingerprint, vectors, kept, failed, duplicates, reused, work_dir, info.is_main)


def _index_section(vectors: np.ndarray, index_key: str | None, max_memory: int, recall_target: float,
                   recall_k: int, progress: bool):
    index, report = build_tuned_index(vectors, index_key=index_key, max_memory=max_memory,
                                      recall_target=recall_target, recall_k=recall_k, progress=progress)
    section = {**report.to_dict(), "chosen_by": "user" if index_key else "auto", "max_memory": max_memory}
    return index, section


def check_build_options(out: Path, recall_target: float, recall_k: int) -> None:
    """Refuse a bad recall target or an --out that is something else than an index, before any work."""
    if not 0.0 < recall_target <= 1.0:
        raise FinegrainError(f"--recall-target {recall_target} is not in (0, 1]. Use e.g. 0.95.")
    if recall_k < 1:
        raise FinegrainError(f"--recall-k {recall_k} must be at least 1. Use e.g. 10.")
    if out.exists() and not (out / "manifest.json").is_file():
        raise FinegrainError(f"{out} exists and is not a finegrain index. Choose a new --out folder.")


def build_index(images: str | Path, out: str | Path, *, weights: str | Path, index_key: str | None = None,
                max_memory: str | int = "4G", recall_target: float = 0.95, recall_k: int = 10, batch_size: int = 64,
                device: str | None = None, workers: int = 0, shard_size: int = DEFAULT_SHARD_SIZE,
                progress: bool = True, on_shard: Callable[[int, bool], None] | None = None) -> BuildReport:
    """Embed every image under `images` with the model in `weights` and write a tuned index to `out`.

    Embedding shards go to a work folder beside `out` and are reused if the build is run again
    after an interruption; the folder is removed once the index is written.
    """
    out, root = Path(out), Path(images)
    check_build_options(out, recall_target, recall_k)
    budget = parse_memory(max_memory)
    start = time.perf_counter()
    pass_ = embed_collection(weights, root, out, batch_size=batch_size, device=device, workers=workers,
                             shard_size=shard_size, progress=progress, on_shard=on_shard)
    failed, duplicates = pass_.failed, pass_.duplicates
    if not pass_.is_main:  # rank 0 alone tunes and writes the index
        return BuildReport({}, len(pass_.kept), failed, duplicates, pass_.reused)
    index, section = _index_section(pass_.vectors, index_key, budget, recall_target, recall_k, progress)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = {"model": model_record(pass_.model, weights, pass_.fingerprint), "index": section,
                "build": {"created": now, "updated": now, "finegrain_version": __version__,
                          "sources": [str(root.resolve())], "failed": len(failed), "duplicates": len(duplicates),
                          "seconds": round(time.perf_counter() - start, 2)}}
    written = write_index_folder(out, index=index, embeddings=pass_.vectors, items=pass_.kept, failed=failed,
                                 manifest=manifest)
    shutil.rmtree(pass_.work_dir, ignore_errors=True)
    return BuildReport(written, len(pass_.kept), failed, duplicates, pass_.reused)


def add_images(index_dir: str | Path, images: str | Path, *, weights: str | Path | None = None, batch_size: int = 64,
               device: str | None = None, workers: int = 0, shard_size: int = DEFAULT_SHARD_SIZE,
               progress: bool = True, on_shard: Callable[[int, bool], None] | None = None) -> BuildReport:
    """Add the images under `images` whose content is not indexed yet; rebuild and re-tune the index.

    The new folder replaces the old one in a single rename, so an interrupted add leaves the
    previous index intact.
    """
    index_dir, root = Path(index_dir), Path(images)
    start = time.perf_counter()
    with IndexFolder(index_dir, mmap=True, gpu=False) as current:
        manifest = current.manifest
        model, fingerprint = index_model(manifest, weights)
        old_items, old_vectors = current.all_items(), np.asarray(current.embeddings)
        old_failed = list(current.failed)
        new, duplicates, failed = _new_items(list_images(root), root, current.checksums(), progress)
    work_dir = index_dir.parent / f".{index_dir.name}.add-work"
    vectors, kept, bad, reused = _embed_items(model, new, fingerprint, work_dir, first_id=len(old_items),
                                              batch_size=batch_size, device=device, workers=workers,
                                              shard_size=shard_size, progress=progress, on_shard=on_shard)
    failed += bad
    if not kept:  # nothing new: the index stays as it is, byte for byte
        shutil.rmtree(work_dir, ignore_errors=True)
        return BuildReport(manifest, 0, failed, duplicates, reused)
    if vectors.shape[1] != manifest["dim"]:
        raise FinegrainError(f"The model gives {vectors.shape[1]}-d embeddings, the index holds {manifest['dim']}-d. "
                             "Use the weights the index was built with.")
    all_vectors = np.concatenate([old_vectors, vectors])
    section = manifest["index"]
    given_key = section["requested_key"] if section["chosen_by"] == "user" else None
    index, new_section = _index_section(all_vectors, given_key, int(section["max_memory"]),
                                        float(section["recall_target"]), int(section["recall_k"]), progress)
    build = dict(manifest["build"])
    build.update(updated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 sources=build["sources"] + [str(root.resolve())], failed=build["failed"] + len(failed),
                 duplicates=build["duplicates"] + len(duplicates), add_seconds=round(time.perf_counter() - start, 2))
    failed_paths = {path for path, _ in failed}
    all_failed = [entry for entry in old_failed if entry[0] not in failed_paths] + failed
    written = write_index_folder(index_dir, index=index, embeddings=all_vectors, items=old_items + kept,
                                 failed=all_failed, manifest={"model": manifest["model"], "index": new_section,
                                                              "build": build})
    shutil.rmtree(work_dir, ignore_errors=True)
    return BuildReport(written, len(kept), failed, duplicates, reused)


def index_model(manifest: dict[str, Any], weights: str | Path | None = None) -> tuple[nn.Module, str]:
    """The index's own model: from `weights` if given, else the recorded path; the file must
    have the recorded SHA-256, so queries are embedded exactly as the collection was."""
    record = manifest["model"]
    if record is None:
        raise FinegrainError("This index was built from embeddings made elsewhere (`index build --embeddings`), so it "
                             "has no model to embed images with. Search it by vector "
                             "(finegrain.index.search.search_by_vector), or rebuild it from images or from "
                             "`finegrain embed` output.")
    path = Path(weights) if weights is not None else Path(record["weights"])
    if not path.is_file():
        raise FinegrainError(f"The index's model weights {path} are missing. Pass --weights FILE with the weights "
                             f"the index was built with (SHA-256 {record['weights_sha256'][:16]}...).")
    fingerprint = sha256_file(path)
    if fingerprint != record["weights_sha256"]:
        raise FinegrainError(f"Weights {path} (SHA-256 {fingerprint[:16]}...) are not the ones this index was built "
                             f"with ({record['weights_sha256'][:16]}...): its vectors would not be comparable. Pass "
                             f"the original weights, or build a new index with these.")
    model, _ = load_weights(path)
    return model, fingerprint


def describe(index_dir: str | Path) -> dict[str, Any]:
    """`info`: the verified manifest plus derived figures (size = number of vectors, memory)."""
    with IndexFolder(index_dir, mmap=True, gpu=False) as folder:
        manifest = folder.manifest
        files = manifest["files"]
        return {"path": str(Path(index_dir).resolve()), "size": folder.count, "dim": folder.dim,
                "index_type": manifest["index"]["key"], "search_parameters": manifest["index"]["parameters"],
                "memory_bytes": files["index.faiss"]["bytes"], "embeddings_bytes": files["embeddings.npy"]["bytes"],
                "recall": manifest["index"]["recall"], "recall_k": manifest["index"]["recall_k"],
                "recall_target": manifest["index"]["recall_target"], "fallback": manifest["index"]["fallback"],
                "latency_ms": manifest["index"]["latency_ms"],
                "exact_latency_ms": manifest["index"]["exact_latency_ms"], "model": manifest["model"],
                "index": manifest["index"], "build": manifest["build"], "failed": len(folder.failed)}


__all__ = ["BuildReport", "add_images", "build_index", "describe", "index_model", "list_images"]
