"""The index a server answers from, and how it changes under it without failing a request.

`finegrain index add` writes a complete new index folder and swaps it in with one rename
(finegrain.fileio), and every version has its own manifest checksum. A thread polls that
checksum; on a change it verifies and loads the new version beside the old one, then makes it
current in one assignment. A request holds the snapshot it started with to its end (its
embedding, search, labels and thumbnail all come from one version); the old version is closed
once its last request is done. A version that cannot be loaded (caught between writes, or
damaged) leaves the current one serving and is tried again at the next poll.

Queries are embedded exactly as the index embedded its images: the index's own weights (checked
by SHA-256), its recorded preprocessing, and the one predictor with the collection options.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from finegrain.data.images import decode_rgb
from finegrain.errors import FinegrainError
from finegrain.eval.embed import image_transform
from finegrain.eval.inference import InferenceOptions, Predictor, embedding_mode
from finegrain.index.build import index_model
from finegrain.index.manifest import manifest_version
from finegrain.index.search import search_vectors
from finegrain.index.store import IndexFolder
from finegrain.preprocessing import Preprocessing
from finegrain.serve.uploads import UploadLimits, read_upload

log = logging.getLogger("finegrain.serve")
THUMBNAIL_SIDE = 256
THUMBNAIL_CACHE = 512  # entries of a few KB each


@dataclass(frozen=True)
class Embedder:
    """The index's model on the serving device, and the transform its images went through."""

    predictor: Predictor
    transform: Callable[[np.ndarray], torch.Tensor]
    fingerprint: str


class Snapshot:
    """One loaded index version; `users` counts the requests holding it."""

    def __init__(self, folder: IndexFolder, version: str, embedder: Embedder) -> None:
        self.folder, self.version, self.embedder = folder, version, embedder
        # Thumbnails come only from under the folders the index was built from, after symlinks.
        self.roots = tuple(Path(source).resolve() for source in folder.manifest["build"]["sources"])
        self.users, self.retired = 0, False
        self._db_lock = threading.Lock()

    def items(self, ids: Sequence[int]) -> list:
        with self._db_lock:
            return self.folder.items(ids)

    def label_of_content(self, sha256: str) -> tuple[int | None, str | None]:
        """(id, label) of the indexed image with these bytes, else (None, None)."""
        with self._db_lock:
            item = self.folder.item_with_checksum(sha256)
        return (item.id, item.label) if item is not None else (None, None)

    def image_path(self, item_id: int) -> Path | None:
        """The file of item `item_id` if it still is the indexed file and lies under the index's image
        folders; None otherwise (a crafted or moved index never leads outside them)."""
        if not 0 <= item_id < self.folder.count:
            return None
        item = self.items([item_id])[0]
        try:
            path = Path(item.path).resolve(strict=True)
            size = path.stat().st_size
        except (OSError, RuntimeError):  # gone, unreadable, or a symlink loop
            return None
        inside = any(path.is_relative_to(root) for root in self.roots)
        return path if inside and path.is_file() and size == item.bytes else None

    def info(self) -> dict[str, Any]:
        manifest = self.folder.manifest
        index, model = manifest["index"], manifest["model"]
        return {"model": {"arch": model["arch"], "embedding": model["embedding"],
                          "weights_sha256": model["weights_sha256"], "input_size": model["preprocessing"]["crop"]},
                "index": {"type": index["key"], "parameters": index["parameters"], "size": self.folder.count,
                          "dim": self.folder.dim, "recall": index["recall"], "recall_k": index["recall_k"],
                          "recall_target": index["recall_target"], "version": self.version,
                          "updated": manifest["build"]["updated"]}}


@dataclass(frozen=True)
class SearchJob:
    """A decoded, transformed query bound to the snapshot it will be searched in."""

    snapshot: Snapshot
    image: torch.Tensor
    k: int


def search_batch(jobs: Sequence[SearchJob]) -> list[list[dict[str, Any]]]:
    """Neighbours of each job: one forward pass and one faiss search per snapshot in the batch."""
    answers: list[list[dict[str, Any]]] = [[] for _ in jobs]
    groups: dict[int, list[int]] = {}
    for position, job in enumerate(jobs):
        groups.setdefault(id(job.snapshot), []).append(position)
    for positions in groups.values():
        snapshot = jobs[positions[0]].snapshot
        images = torch.stack([jobs[p].image for p in positions])
        vectors = snapshot.embedder.predictor.embed(images).cpu().numpy()
        ids, scores = search_vectors(snapshot.folder, vectors, max(jobs[p].k for p in positions))
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        items = dict(zip(wanted, snapshot.items(wanted)))
        for row, position in enumerate(positions):
            kept = [(int(i), float(s)) for i, s in zip(ids[row], scores[row]) if i >= 0][:jobs[position].k]
            answers[position] = [{"rank": rank, "id": i, "label": items[i].label, "score": round(s, 6),
                                  "thumbnail": f"/v1/thumbnail/{i}"} for rank, (i, s) in enumerate(kept, start=1)]
    return answers


def prepare_query(snapshot: Snapshot, data: bytes, k: int, limits: UploadLimits) -> tuple[SearchJob, int | None,
                                                                                          str | None]:
    """(job, id and label of the same image in the index, if it is there); UploadRefused on a bad upload."""
    rgb = read_upload(data, limits)
    job = SearchJob(snapshot, snapshot.embedder.transform(rgb), k)
    return (job, *snapshot.label_of_content(hashlib.sha256(data).hexdigest()))


class LiveIndex:
    """The current snapshot of the index at `root`, replaced when a new version appears."""

    def __init__(self, root: str | Path, device: torch.device, reload_interval: float = 1.0) -> None:
        self.root, self.device, self.reload_interval = Path(root), device, reload_interval
        self._lock = threading.Lock()
        self._current = self._load(manifest_version(self.root), None)
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._thumbnails: OrderedDict[str, bytes] = OrderedDict()
        self._thumbnail_lock = threading.Lock()

    def _load(self, version: str | None, reuse: Embedder | None) -> Snapshot:
        folder = IndexFolder(self.root)
        try:
            manifest = folder.manifest
            record = manifest["model"]
            if reuse is not None and record is not None and reuse.fingerprint == record["weights_sha256"]:
                embedder = reuse
            else:
                model, fingerprint = index_model(manifest)  # an index without a model cannot embed a query
                if embedding_mode(model) != record["embedding"]:
                    raise FinegrainError("The model's embedding kind differs from the index's. Rebuild the index.")
                pre = Preprocessing.from_json(json.dumps(record["preprocessing"]))
                embedder = Embedder(Predictor(model, self.device, InferenceOptions.for_collection(self.device)),
                                    image_transform(model, pre), fingerprint)
            return Snapshot(folder, version or "unknown", embedder)
        except BaseException:
            folder.close()
            raise

    @contextlib.contextmanager
    def use(self) -> Iterator[Snapshot]:
        """The current snapshot, kept open until the block ends even if a new version arrives."""
        with self._lock:
            snapshot = self._current
            snapshot.users += 1
        try:
            yield snapshot
        finally:
            with self._lock:
                snapshot.users -= 1
                done = snapshot.retired and snapshot.users == 0
            if done:
                snapshot.folder.close()

    def refresh(self) -> bool:
        """Load and switch to a new version if there is one; True when it switched."""
        version = manifest_version(self.root)
        current = self._current
        if version is None or version == current.version:
            return False
        snapshot = self._load(version, current.embedder)
        if manifest_version(self.root) != version:  # replaced again while loading: the next poll takes it
            snapshot.folder.close()
            return False
        with self._lock:
            old, self._current = self._current, snapshot
            old.retired = True
            done = old.users == 0
        if done:
            old.folder.close()
        log.info("serving index version %s (%d images)", version[:12], snapshot.folder.count)
        return True

    def _poll(self) -> None:
        while not self._stop.wait(self.reload_interval):
            try:
                self.refresh()
            except FinegrainError as error:
                log.warning("a new version of %s is not loadable yet, still serving the previous one: %s",
                            self.root, error)

    def start(self) -> None:
        if self.reload_interval > 0 and self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="index-poller", daemon=True)
            self._poller.start()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
        with self._lock:
            self._current.retired = True
            done = self._current.users == 0
        if done:
            self._current.folder.close()

    def thumbnail(self, snapshot: Snapshot, item_id: int) -> bytes | None:
        """A JPEG of at most THUMBNAIL_SIDE pixels a side of an indexed image, or None (no such
        image, or its file is no longer the indexed one). Cached by file and modification time."""
        path = snapshot.image_path(item_id)
        if path is None:
            return None
        key = f"{path}\0{path.stat().st_mtime_ns}"
        with self._thumbnail_lock:
            if key in self._thumbnails:
                self._thumbnails.move_to_end(key)
                return self._thumbnails[key]
        try:
            image = Image.fromarray(decode_rgb(str(path), draft=(THUMBNAIL_SIDE, THUMBNAIL_SIDE)))
        except Exception:  # noqa: BLE001 - an indexed file damaged since: no thumbnail, not a server error
            return None
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        data = out.getvalue()
        with self._thumbnail_lock:
            self._thumbnails[key] = data
            while len(self._thumbnails) > THUMBNAIL_CACHE:
                self._thumbnails.popitem(last=False)
        return data
