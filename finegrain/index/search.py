"""`finegrain index search`: embed queries with the index's own model, return their neighbours.

Similarities are recomputed exactly from the kept embeddings for the candidates the index
returns, so a compressed index (PQ, SQ8) still reports true cosine similarities and ranks by them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from finegrain.errors import FinegrainError
from finegrain.eval.embed import embed_paths, embedding_mode
from finegrain.fileio import atomic_path
from finegrain.index.build import index_model, list_images
from finegrain.index.manifest import rebuild_hint
from finegrain.index.store import IndexFolder
from finegrain.preprocessing import Preprocessing

if TYPE_CHECKING:
    from finegrain.eval.rerank import Rerank

CORRECT, WRONG, NEUTRAL = (20, 140, 20), (200, 30, 30), (60, 60, 60)  # grid caption colours


@dataclass(frozen=True)
class Neighbour:
    rank: int
    id: int
    path: str
    label: str | None
    similarity: float


@dataclass
class QueryResult:
    """A query's neighbours; `label` is its class where known (see `query_labels`), else None."""

    query: str
    neighbours: list[Neighbour]
    label: str | None = None


@dataclass
class SearchReport:
    """Neighbours of every readable query; unreadable queries are listed in `failed`."""

    index: str
    k: int
    results: list[QueryResult]
    failed: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "k": self.k, "results": [asdict(result) for result in self.results],
                "failed": [{"path": path, "reason": reason} for path, reason in self.failed]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def expand_queries(queries: Sequence[str | Path]) -> list[Path]:
    """Image files as given; folders replaced by the images under them."""
    if not queries:
        raise FinegrainError("No query given. Pass image files or folders of images.")
    paths: list[Path] = []
    for query in map(Path, queries):
        if query.is_dir():
            paths += list_images(query)
        elif query.is_file():
            paths.append(query)
        else:
            raise FinegrainError(f"Query {query} does not exist. Pass image files or folders of images.")
    return paths


def search_vectors(folder: IndexFolder, vectors: np.ndarray, k: int,
                   rerank: Rerank | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ids [Q, k] (-1 where fewer than k exist) and exact cosine similarities [Q, k], best first.

    With `rerank` (eval/rerank.py) the order is the re-ranked one, found by exact search over the
    kept embeddings (dba and kreciprocal search the whole collection once: O(N^2) work); the
    similarities stay the plain cosines of query and item.
    """
    if vectors.ndim != 2 or vectors.shape[1] != folder.dim:
        raise FinegrainError(f"Query embeddings are {vectors.shape[-1]}-d, the index holds {folder.dim}-d vectors. "
                             "Embed the queries with the index's own model.")
    k = min(k, folder.count)
    if rerank is not None:
        gallery = np.ascontiguousarray(folder.embeddings, dtype=np.float32)
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = rerank.prepare(gallery, queries=queries).neighbours(np.arange(len(queries)), k)
        return ids, np.einsum("qkd,qd->qk", gallery[ids], queries)
    try:
        _, ids = folder.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
    except (RuntimeError, MemoryError) as error:
        raise FinegrainError(f"faiss failed to search {folder.root / 'index.faiss'} ({str(error).strip()[-200:]}). "
                             f"{rebuild_hint(folder.root)}") from None
    if ((ids < -1) | (ids >= folder.count)).any():
        raise FinegrainError(f"{folder.root / 'index.faiss'} returned vector ids outside 0..{folder.count - 1}: it "
                             f"does not belong to this folder's items. {rebuild_hint(folder.root)}")
    valid = ids >= 0
    candidates = np.asarray(folder.embeddings[np.where(valid, ids, 0).ravel()]).reshape(*ids.shape, folder.dim)
    similarity = np.where(valid, np.einsum("qkd,qd->qk", candidates, vectors), -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(similarity, order, 1)


def query_labels(folder: IndexFolder, queries: Sequence[str], label: str | None = None) -> list[str | None]:
    """The class of each query where it is known, else None (a query's folder is not always its class).

    Known: given as `label`; or the query lies under a folder the index was built from, where
    its class is its parent folder as for the indexed images; or its parent folder's name is one
    of the indexed classes. A photo in ~/Downloads is not of class "Downloads".
    """
    if label is not None:
        return [label] * len(queries)
    roots = [Path(source) for source in folder.manifest["build"]["sources"]]
    classes: set[str] | None = None
    labels: list[str | None] = []
    for query in map(Path, queries):
        parent = query.resolve().parent
        root = next((root for root in roots if parent == root or root in parent.parents), None)
        if root is not None:
            labels.append(parent.name if parent != root else None)
            continue
        classes = folder.labels() if classes is None else classes
        labels.append(parent.name if parent.name in classes else None)
    return labels


def search_index(index_dir: str | Path, queries: Sequence[str | Path], *, k: int = 10,
                 weights: str | Path | None = None, device: str | None = None, batch_size: int = 64,
                 progress: bool = False, label: str | None = None, rerank: Rerank | None = None) -> SearchReport:
    """The k nearest indexed images of each query image (files or folders); `label`: the queries' class;
    `rerank`: re-rank the neighbours (see `search_vectors`)."""
    if k < 1:
        raise FinegrainError(f"--k {k} must be at least 1.")
    paths = expand_queries(queries)
    with IndexFolder(index_dir) as folder:
        model, _ = index_model(folder.manifest, weights)
        if embedding_mode(model) != folder.manifest["model"]["embedding"]:
            raise FinegrainError("The model's embedding kind differs from the index's. "
                                 "Use the weights the index was built with.")
        pre = Preprocessing.from_json(json.dumps(folder.manifest["model"]["preprocessing"]))
        embedded = embed_paths(model, paths, pre, batch_size=batch_size, device=device, progress=progress)
        if not embedded.ok_paths:
            shown = "; ".join(f"{path}: {reason}" for path, reason in embedded.failed[:3])
            more = f" (and {len(embedded.failed) - 3} more)" if len(embedded.failed) > 3 else ""
            raise FinegrainError(f"None of the {len(paths)} query images could be read: {shown}{more}. "
                                 "Pass readable image files (JPEG, PNG, ...).")
        ids, similarity = search_vectors(folder, embedded.embeddings, k, rerank)
        results = _results(folder, embedded.ok_paths, query_labels(folder, embedded.ok_paths, label), ids, similarity)
        return SearchReport(str(Path(index_dir)), k, results, embedded.failed)


def search_by_vector(index_dir: str | Path, vectors: np.ndarray, *, k: int = 10,
                     rerank: Rerank | None = None) -> SearchReport:
    """The k nearest indexed items of each row of `vectors` ([Q, D], any norm: normalised here);
    query i is named "vector i". Works for every index, also one built from embeddings made elsewhere."""
    from finegrain.index.embedding_files import unit_rows

    if k < 1:
        raise FinegrainError(f"k={k} must be at least 1.")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating) or 0 in vectors.shape:
        raise FinegrainError(f"Query vectors must be a non-empty float array [Q, D], got {vectors.dtype} "
                             f"{vectors.shape}.")
    vectors = unit_rows(vectors, "query vectors", normalise=True)
    with IndexFolder(index_dir) as folder:
        ids, similarity = search_vectors(folder, vectors, k, rerank)
        names = [f"vector {i}" for i in range(len(vectors))]
        return SearchReport(str(Path(index_dir)), k, _results(folder, names, [None] * len(names), ids, similarity))


def _results(folder: IndexFolder, queries: Sequence[str], labels: Sequence[str | None], ids: np.ndarray,
             similarity: np.ndarray) -> list[QueryResult]:
    results = []
    for query, query_label, row_ids, row_sims in zip(queries, labels, ids, similarity):
        valid = row_ids >= 0
        items = folder.items(row_ids[valid])
        results.append(QueryResult(query, [Neighbour(rank + 1, item.id, item.path, item.label, float(sim))
                                           for rank, (item, sim) in enumerate(zip(items, row_sims[valid]))],
                                   query_label))
    return results


def _thumbnail(path: str, size: int) -> Image.Image:
    try:
        with Image.open(path) as image:
            return ImageOps.pad(image.convert("RGB"), (size, size), color=(255, 255, 255))
    except Exception:  # noqa: BLE001 - an image moved or damaged since indexing is drawn as grey
        return Image.new("RGB", (size, size), (160, 160, 160))


def draw_grid(report: SearchReport, out: str | Path, thumb: int = 112) -> Path:
    """One row per query: the query (blue frame), then its neighbours with label and similarity
    (green caption when the label matches the query's known class, red when not, grey when the
    query's class is unknown)."""
    if not report.results:
        raise FinegrainError("No query could be embedded, so there is nothing to draw. Check the query images.")
    columns, caption, pad = 1 + max(len(r.neighbours) for r in report.results), 28, 6
    cell_w, cell_h = thumb + pad, thumb + caption + pad
    sheet = Image.new("RGB", (columns * cell_w + pad, len(report.results) * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for row, result in enumerate(report.results):
        y = pad + row * cell_h
        sheet.paste(_thumbnail(result.query, thumb), (pad, y))
        draw.rectangle([pad - 3, y - 3, pad + thumb + 2, y + thumb + 2], outline=(40, 90, 220), width=3)
        caption = "query" if result.label is None else f"query: {result.label}"
        draw.text((pad, y + thumb + 2), _fit(caption, thumb), fill=(40, 90, 220))
        for column, neighbour in enumerate(result.neighbours, start=1):
            x = pad + column * cell_w
            sheet.paste(_thumbnail(neighbour.path, thumb), (x, y))
            colour = NEUTRAL if result.label is None else CORRECT if neighbour.label == result.label else WRONG
            draw.text((x, y + thumb + 2), _fit(str(neighbour.label), thumb), fill=colour)
            draw.text((x, y + thumb + 14), f"{neighbour.similarity:.3f}", fill=(60, 60, 60))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(out)


def _fit(text: str, width: int) -> str:
    """Shorten a caption to the thumbnail width (PIL's default font is about 6 px a character)."""
    limit = max(4, width // 6)
    return text if len(text) <= limit else text[:limit - 1] + "…"
