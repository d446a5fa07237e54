"""Retrieval metrics with a separate query set and gallery (In-Shop Clothes, OML's is_query /
is_gallery), and the release's way of counting queries that have no correct answer.

Protocol: as eval/retrieval.py (cosine similarity, exact fractions; equal scores in gallery order
among the neighbours faiss returns), except that queries search the gallery only, so nothing is
excluded by position, and R is the number of gallery items of the query's class. Queries whose class has no gallery item have no
defined Recall or AP: by default they are left out and counted (pytorch-metric-learning's
AccuracyCalculator with ref_includes_query=False does the same); `singletons="miss"` counts them
as misses instead, as the authors' release did, so its numbers can be compared.

The class-balanced mean averages each metric per query class first, then over classes (pml's
`avg_of_avgs`), so a few large classes do not decide the figure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from finegrain.errors import FinegrainError
from finegrain.eval.rerank import Rerank, ranker
from finegrain.eval.retrieval import (ArrayLike, RetrievalReport, _checked_ks, _class_ids, _normalised_embeddings,
                                      _searcher)

SINGLETON_RULES = ("exclude", "miss")
_BATCH_WORKSPACE_BYTES = 256 * 2**20
_BYTES_PER_CANDIDATE = 64
_MAX_K = 1 << 40  # K is checked against the gallery below


@dataclass(frozen=True)
class QueryGalleryReport:
    """Fractions in [0, 1]; `class_balanced` has the same keys as `to_metrics()` without the prefix.

    n_queries counts the queries in the means; n_without_positive those whose class has no
    gallery item (in the means, as misses, only when `singletons == "miss"`).
    """

    recall: dict[int, float]
    map_at_r: float
    class_balanced: dict[str, float]
    n_queries: int
    n_without_positive: int
    singletons: str

    @property
    def n_excluded_singletons(self) -> int:
        """Queries left out of the means (RetrievalReport's name for them)."""
        return self.n_without_positive if self.singletons == "exclude" else 0

    @property
    def n_singletons_as_misses(self) -> int:
        """Queries scored as misses for having nothing to find (RetrievalReport's name for them)."""
        return self.n_without_positive if self.singletons == "miss" else 0

    def to_metrics(self) -> dict[str, float]:
        """`recall@K`, `map@r` and their class-balanced `balanced_recall@K`, `balanced_map@r`."""
        metrics = {f"recall@{k}": value for k, value in self.recall.items()}
        metrics["map@r"] = self.map_at_r
        metrics.update({f"balanced_{key}": value for key, value in self.class_balanced.items()})
        return metrics


def query_gallery_metrics(
    queries: ArrayLike,
    query_labels: ArrayLike,
    gallery: ArrayLike,
    gallery_labels: ArrayLike,
    ks: Iterable[int] | int = (1, 2, 4, 8),
    *,
    singletons: str = "exclude",
    rerank: Rerank | None = None,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
) -> QueryGalleryReport:
    """Recall@K for every K in `ks`, MAP@R and their class-balanced means, queries against the gallery.

    Args:
        queries, gallery: ``[M, D]`` and ``[N, D]`` float embeddings (any norm: normalised here).
        query_labels, gallery_labels: ``[M]`` and ``[N]`` integer class ids (the same ids name the same class).
        ks: the K of Recall@K, each in ``[1, N]``.
        singletons: "exclude" (default) or "miss" for queries whose class has no gallery item.
        rerank: re-rank each query's neighbours (eval/rerank.py) before scoring them.
    """
    if singletons not in SINGLETON_RULES:
        raise FinegrainError(f"singletons must be one of {SINGLETON_RULES}, got {singletons!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FinegrainError(f"batch_size must be a positive integer, got {batch_size!r}. Pass e.g. 4096.")
    query_rows, gallery_rows = _embeddings(queries, gallery)
    num_queries = len(query_rows)
    both = _class_ids(np.concatenate([_labels(query_labels), _labels(gallery_labels)]), num_queries + len(gallery_rows))
    query_class, gallery_class = both[:num_queries], both[num_queries:]
    ks = _checked_ks(ks, _MAX_K)
    if max(ks) > len(gallery_rows):
        raise FinegrainError(f"K={max(ks)} is larger than the gallery of {len(gallery_rows)} items. "
                             f"Ask for K <= {len(gallery_rows)}.")

    positives = np.bincount(gallery_class, minlength=int(both.max()) + 1)[query_class]  # R of each query
    scored = np.flatnonzero(positives > 0)
    if len(scored) == 0:
        raise FinegrainError("No query's class has an item in the gallery, so every query is a miss and the metrics "
                             "are undefined. Check that queries and gallery share labels.")
    max_r = int(positives.max())
    depth = max(max(ks), max_r)
    search = _searcher(gallery_rows, depth, device)
    neighbours = ranker(gallery_rows, search, query_rows, rerank)
    rows = min(batch_size, max(1, _BATCH_WORKSPACE_BYTES // (_BYTES_PER_CANDIDATE * depth)))

    hits = {k: np.zeros(num_queries, dtype=bool) for k in ks}
    average_precision = np.zeros(num_queries, dtype=np.float64)
    ranks = np.arange(1, max_r + 1)
    for start in tqdm(range(0, len(scored), rows), desc="retrieval search", unit="batch", leave=False, disable=None):
        ids = scored[start:start + rows]
        relevant = gallery_class[neighbours.neighbours(ids, depth)] == query_class[ids, None]  # [B, depth]
        first_hit = np.where(relevant.any(axis=1), relevant.argmax(axis=1), depth)
        for k in ks:
            hits[k][ids] = first_hit < k
        r = positives[ids]
        top_r = relevant[:, :max_r] & (ranks <= r[:, None])
        average_precision[ids] = (np.cumsum(top_r, axis=1) / ranks * top_r).sum(axis=1) / r

    counted = scored if singletons == "exclude" else np.arange(num_queries)
    per_query = {f"recall@{k}": hits[k][counted].astype(np.float64) for k in ks}
    per_query["map@r"] = average_precision[counted]
    return QueryGalleryReport(
        recall={k: int(np.count_nonzero(hits[k][counted])) / len(counted) for k in ks},
        map_at_r=math.fsum(average_precision[counted].tolist()) / len(counted),
        class_balanced={key: _class_balanced(values, query_class[counted]) for key, values in per_query.items()},
        n_queries=len(counted),
        n_without_positive=num_queries - len(scored),
        singletons=singletons,
    )


def singletons_as_misses(report: RetrievalReport) -> RetrievalReport:
    """A leave-one-out report with its excluded singleton queries counted as misses (the release's protocol)."""
    total = report.n_queries + report.n_excluded_singletons
    recall = {k: round(value * report.n_queries) / total for k, value in report.recall.items()}  # hits are integers
    return replace(report, recall=recall, map_at_r=report.map_at_r * report.n_queries / total, n_queries=total,
                   n_excluded_singletons=0, n_singletons_as_misses=report.n_excluded_singletons)


def _class_balanced(values: np.ndarray, classes: np.ndarray) -> float:
    """Mean over classes of the mean of `values` within each class."""
    counts = np.bincount(classes)
    present = counts > 0
    sums = np.bincount(classes, weights=values)
    return math.fsum((sums[present] / counts[present]).tolist()) / int(present.sum())


def _labels(labels: ArrayLike) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1:
        raise FinegrainError(f"Labels must have shape [N], got {tuple(array.shape)}. Pass one class id per embedding.")
    if not np.issubdtype(array.dtype, np.integer):
        raise FinegrainError(f"Labels must be integer class ids, got dtype {array.dtype}. Convert them, e.g. "
                             "labels.long().")
    return array.astype(np.int64)


def _embeddings(queries: ArrayLike, gallery: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm float32 query and gallery rows, checked together (same width, finite, non-zero)."""
    shapes = [tuple(x.shape) for x in (queries, gallery)]
    if any(len(shape) != 2 for shape in shapes) or shapes[0][1] != shapes[1][1] or 0 in shapes[0] + shapes[1]:
        raise FinegrainError(f"Queries and gallery must be [M, D] and [N, D] embeddings of one width, got {shapes[0]} "
                             f"and {shapes[1]}. Embed both with the same model.")
    if isinstance(queries, torch.Tensor) != isinstance(gallery, torch.Tensor):
        queries, gallery = (torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
                            for x in (queries, gallery))
    join = torch.cat if isinstance(queries, torch.Tensor) else np.concatenate
    rows = _normalised_embeddings(join([queries, gallery]))
    return rows[:shapes[0][0]], rows[shapes[0][0]:]
