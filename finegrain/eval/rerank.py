"""Re-ranking of retrieval neighbour lists: alpha query expansion, database-side augmentation and
k-reciprocal re-ranking (Zhong et al., CVPR 2017), on faiss neighbour lists in bounded memory.

Every method works from top-k neighbour lists, never from an N x N matrix, so it runs at SOP scale
(60,502 items) in a few hundred MB:

- ``aqe`` (alpha query expansion, Radenovic et al. 2018): a query becomes
  ``normalise(q + sum_i max(s_i, 0)^alpha * g_i)`` over its ``n`` nearest gallery items, then is
  searched again.
- ``dba`` (database-side augmentation, same weights): every gallery item is replaced by the same
  weighted sum over its ``n`` nearest other items; queries search the augmented gallery (a query
  that is a gallery item, in leave-one-out evaluation, is its augmented self).
- ``kreciprocal`` (Zhong et al., their re_ranking.py step for step): k-reciprocal sets with k1,
  their expansion by the round(k1/2)-reciprocal sets of members sharing more than 2/3 of them,
  weights ``exp(-d)`` normalised per row, local query expansion over the k2 nearest, Jaccard
  distance, ``final = (1 - lambda) * jaccard + lambda * d``. Two changes make it bounded and
  exact on unit vectors: ``d = 2 - 2 cos`` (squared Euclidean) without the original's division
  by each column's maximum (which needs the whole matrix and makes d asymmetric), and only the
  first ``pool`` neighbours of a query are re-ranked (with ``pool`` >= the gallery size the
  result is the full-matrix algorithm's). Queries and gallery form one set, as in the paper.

Ranking is by (score, gallery index): equal scores keep gallery order. The query itself is
excluded by position in leave-one-out evaluation (queries = the gallery).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import faiss
import numpy as np
from scipy import sparse

from finegrain.errors import FinegrainError

METHODS = ("aqe", "dba", "kreciprocal")
# (queries [B, D] float32, k) -> (inner products [B, k], gallery ids [B, k])
Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
_BATCH_BYTES = 64 * 2**20  # working memory of one batch of queries
_MAX_SETTING = 1024  # neighbour counts: within faiss GPU k-selection, and memory stays O(N * setting)


class Ranker(Protocol):
    """Neighbour lists of a prepared gallery."""

    def neighbours(self, rows: np.ndarray, depth: int) -> np.ndarray:
        """``[B]`` query rows -> ``[B, depth]`` gallery ids, best first."""


@dataclass(frozen=True)
class Rerank:
    """A re-ranking method and its settings (defaults: the papers')."""

    method: str
    n: int = 2  # aqe / dba: neighbours averaged in
    alpha: float = 3.0  # aqe / dba: similarity exponent
    k1: int = 20  # kreciprocal: k of the k-reciprocal sets
    k2: int = 6  # kreciprocal: neighbours of the local query expansion
    lam: float = 0.3  # kreciprocal: weight of the original distance
    pool: int = 100  # kreciprocal: neighbours of a query that are re-ranked

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FinegrainError(f"Unknown re-ranking {self.method!r}. Use one of: {', '.join(METHODS)}.")
        for name in ("n", "k1", "k2", "pool"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SETTING:
                raise FinegrainError(f"Re-ranking setting {name} must be a whole number in [1, {_MAX_SETTING}], "
                                     f"got {value!r}.")
        if not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise FinegrainError(f"Re-ranking setting alpha must be a finite number >= 0, got {self.alpha!r}.")
        if not 0.0 <= self.lam <= 1.0:
            raise FinegrainError(f"Re-ranking setting lam must be in [0, 1], got {self.lam!r}.")

    def prepare(self, gallery: np.ndarray, search: Search | None = None,
                queries: np.ndarray | None = None) -> Ranker:
        """A ranker over `gallery` ([N, D] unit rows, float32). `search` finds gallery neighbours
        (default: exact faiss); `queries` ([M, D] unit rows) is a separate query set, None for
        leave-one-out (query rows are gallery rows, each excluded from its own list)."""
        search = search or exact_search(gallery)
        if self.method == "aqe":
            return _QueryExpansion(self, gallery, search, queries)
        if self.method == "dba":
            return _DatabaseAugmentation(self, gallery, search, queries)
        return _KReciprocal(self, gallery, search, queries)


def ranker(gallery: np.ndarray, search: Search | None = None, queries: np.ndarray | None = None,
           rerank: Rerank | None = None) -> Ranker:
    """Neighbour lists of `queries` (None: leave-one-out) in `gallery`, re-ranked by `rerank` if given."""
    if rerank is not None:
        return rerank.prepare(gallery, search, queries)
    return _Plain(gallery, search or exact_search(gallery), queries)


def exact_search(gallery: np.ndarray) -> Search:
    """Exact inner-product search over `gallery` (faiss' flat kernel, no copy into an index)."""
    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), gallery, k,
                         metric=faiss.METRIC_INNER_PRODUCT)

    return search


def ranked_search(search: Search, vectors: np.ndarray, depth: int, self_ids: np.ndarray | None,
                  size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) ``[B, depth]`` by (score desc, id asc), each row's `self_ids` entry removed."""
    width = min(depth + (self_ids is not None), size)
    scores, ids = search(np.ascontiguousarray(vectors, dtype=np.float32), width)
    order = np.lexsort((ids, -scores), axis=-1)
    ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
    if self_ids is None:
        return ids[:, :depth], scores[:, :depth]
    is_self = ids == self_ids[:, None]
    is_self[~is_self.any(axis=1), -1] = True  # self beyond the list: drop the last instead
    keep = ~is_self
    count = len(ids)
    return ids[keep].reshape(count, width - 1)[:, :depth], scores[keep].reshape(count, width - 1)[:, :depth]


def _expand(vectors: np.ndarray, gallery: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
    """normalise(v + sum_i max(v . g_i, 0)^alpha g_i) for each row v and its neighbours `ids`."""
    neighbours = gallery[ids]  # [B, n, D]
    weights = np.maximum(np.einsum("bnd,bd->bn", neighbours, vectors), 0.0) ** alpha
    expanded = vectors + np.einsum("bn,bnd->bd", weights, neighbours)
    return (expanded / np.linalg.norm(expanded, axis=1, keepdims=True)).astype(np.float32)


def _rows_per_batch(width: int) -> int:
    return max(1, _BATCH_BYTES // (8 * max(width, 1)))


class _Plain:
    def __init__(self, gallery: np.ndarray, search: Search, queries: np.ndarray | None) -> None:
        self.gallery, self.search, self.queries = gallery, search, queries

    def neighbours(self, rows: np.ndarray, depth: int) -> np.ndarray:
        loo = self.queries is None
        vectors = self.gallery[rows] if loo else self.queries[rows]
        return ranked_search(self.search, vectors, depth, rows if loo else None, len(self.gallery))[0]


class _QueryExpansion(_Plain):
    def __init__(self, settings: Rerank, gallery: np.ndarray, search: Search, queries: np.ndarray | None) -> None:
        super().__init__(gallery, search, queries)
        self.settings = settings

    def neighbours(self, rows: np.ndarray, depth: int) -> np.ndarray:
        loo = self.queries is None
        vectors = self.gallery[rows] if loo else self.queries[rows]
        self_ids = rows if loo else None
        n = min(self.settings.n, len(self.gallery) - loo)
        first, _ = ranked_search(self.search, vectors, n, self_ids, len(self.gallery))
        expanded = _expand(vectors, self.gallery, first, self.settings.alpha)
        return ranked_search(self.search, expanded, depth, self_ids, len(self.gallery))[0]


class _DatabaseAugmentation(_Plain):
    def __init__(self, settings: Rerank, gallery: np.ndarray, search: Search, queries: np.ndarray | None) -> None:
        n = min(settings.n, len(gallery) - 1)
        augmented = np.empty_like(gallery)
        rows = _rows_per_batch(n * gallery.shape[1])
        for start in range(0, len(gallery), rows):
            ids = np.arange(start, min(start + rows, len(gallery)))
            first, _ = ranked_search(search, gallery[ids], n, ids, len(gallery))
            augmented[ids] = _expand(gallery[ids], gallery, first, settings.alpha)
        super().__init__(augmented, exact_search(augmented), queries)


class _KReciprocal:
    """Zhong et al.'s re-ranking on sparse neighbour lists; queries and gallery form one set A."""

    def __init__(self, settings: Rerank, gallery: np.ndarray, search: Search, queries: np.ndarray | None) -> None:
        self.settings, self.gallery, self.search, self.queries = settings, gallery, search, queries
        self.offset = 0 if queries is None else len(queries)  # gallery item j is A[offset + j]
        self.everything = gallery if queries is None else np.concatenate([queries, gallery])
        k1 = min(settings.k1, len(self.everything) - 1)
        half = int(np.around(k1 / 2))
        nearest = self._nearest_in_everything(k1 + 1)
        reciprocal = _reciprocal(nearest[:, :k1 + 1])
        expansion = _expanded_sets(reciprocal, _reciprocal(nearest[:, :half + 1]))
        expansion = expansion[:, expansion.shape[1] - int((expansion >= 0).sum(axis=1).max()):]  # members last
        v = self._weights(expansion)
        k2 = min(settings.k2, nearest.shape[1])
        averaging = sparse.csr_matrix((np.full(nearest[:, :k2].size, 1.0 / k2),
                                       (np.repeat(np.arange(len(nearest)), k2), nearest[:, :k2].ravel())),
                                      shape=v.shape)
        self.v = (averaging @ v).tocsr()  # local query expansion: mean of the k2 nearest rows
        self.v.sort_indices()

    def _nearest_in_everything(self, k: int) -> np.ndarray:
        """``[|A|, k]`` ids into A, nearest first, each item itself included (rank 0 unless duplicated)."""
        everything, offset = self.everything, self.offset
        k = min(k, len(everything))
        nearest = np.empty((len(everything), k), dtype=np.int64)
        query_search = exact_search(self.queries) if self.queries is not None else None
        rows = _rows_per_batch(4 * k)
        for start in range(0, len(everything), rows):
            block = everything[start:start + rows]
            scores, ids = self.search(block, min(k, len(self.gallery)))
            ids = ids + offset
            if query_search is not None:
                more_scores, more_ids = query_search(block, min(k, offset))
                scores, ids = np.concatenate([scores, more_scores], 1), np.concatenate([ids, more_ids], 1)
            order = np.lexsort((ids, -scores), axis=-1)[:, :k]
            nearest[start:start + len(block)] = np.take_along_axis(ids, order, 1)
        return nearest

    def _weights(self, members: np.ndarray) -> sparse.csr_matrix:
        """V: row i holds exp(-d(i, j)) over its expanded set (ids >= 0 in `members`), normalised to sum 1."""
        size, dim = len(self.everything), self.everything.shape[1]
        values = np.zeros(members.shape, dtype=np.float64)
        rows = _rows_per_batch(members.shape[1] * dim // 2)
        for start in range(0, size, rows):
            part = members[start:start + rows]
            valid = part >= 0
            vectors = self.everything[np.where(valid, part, 0)]  # [B, m, D]
            cosine = np.einsum("bmd,bd->bm", vectors, self.everything[start:start + len(part)]).astype(np.float64)
            values[start:start + len(part)] = np.where(valid, np.exp(-(2.0 - 2.0 * cosine)), 0.0)
        sums = values.sum(axis=1, keepdims=True)
        values = np.divide(values, sums, out=np.zeros_like(values), where=sums > 0)
        valid = members >= 0
        return sparse.csr_matrix((values[valid], (np.nonzero(valid)[0], members[valid])), shape=(size, size))

    def neighbours(self, rows: np.ndarray, depth: int) -> np.ndarray:
        settings, loo, offset = self.settings, self.queries is None, self.offset
        vectors = self.gallery[rows] if loo else self.queries[rows]
        pool = min(max(depth, settings.pool), len(self.gallery) - loo)
        candidates, scores = ranked_search(self.search, vectors, pool, rows if loo else None, len(self.gallery))
        result = np.empty((len(rows), depth), dtype=np.int64)
        batch = _rows_per_batch(self.v.shape[1])
        for start in range(0, len(rows), batch):
            part = slice(start, start + batch)
            jaccard = self._jaccard(rows[part], candidates[part] + offset)  # A = [queries; gallery]
            final = (1.0 - settings.lam) * jaccard + settings.lam * (2.0 - 2.0 * scores[part].astype(np.float64))
            order = np.lexsort((candidates[part], final), axis=-1)[:, :depth]
            result[part] = np.take_along_axis(candidates[part], order, 1)
        return result

    def _jaccard(self, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """``[B, P]`` Jaccard distances 1 - sum(min)/sum(max) of V rows (each sums to 1: sum(max) = 2 - sum(min))."""
        dense = self.v[queries].toarray()  # [B, |A|]
        rows = self.v[candidates.ravel()]
        lengths = np.diff(rows.indptr)
        pair = np.repeat(np.arange(candidates.size), lengths)
        owner = pair // candidates.shape[1]
        smallest = np.minimum(dense[owner, rows.indices], rows.data)
        shared = np.bincount(pair, weights=smallest, minlength=candidates.size).reshape(candidates.shape)
        return 1.0 - shared / (2.0 - shared)


def _reciprocal(nearest: np.ndarray) -> np.ndarray:
    """Row i: the j among i's neighbours whose own neighbours include i, else -1 (same shape)."""
    result = np.full(nearest.shape, -1, dtype=np.int64)
    rows = _rows_per_batch(nearest.shape[1] ** 2)
    for start in range(0, len(nearest), rows):
        part = nearest[start:start + rows]
        own = np.arange(start, start + len(part))
        back = (nearest[part] == own[:, None, None]).any(axis=2)  # [B, k]: i among j's neighbours
        result[start:start + len(part)] = np.where(back, part, -1)
    return result


def _expanded_sets(reciprocal: np.ndarray, half: np.ndarray) -> np.ndarray:
    """R*(i): R(i) plus R_half(c) of each c in R(i) with |R_half(c) & R(i)| > 2/3 |R_half(c)|; sorted, -1s first."""
    k, h = reciprocal.shape[1], half.shape[1]
    members = np.full((len(reciprocal), k + k * h), -1, dtype=np.int64)
    rows = _rows_per_batch(k * h * k)
    for start in range(0, len(reciprocal), rows):
        own = reciprocal[start:start + rows]  # [B, k]
        theirs = np.where((own >= 0)[..., None], half[np.maximum(own, 0)], -1)  # [B, k, h]
        shared = ((theirs[..., None] == own[:, None, None, :]) & (theirs >= 0)[..., None]).any(axis=3).sum(axis=2)
        accepted = (shared > 2.0 / 3.0 * (theirs >= 0).sum(axis=2)) & (own >= 0)
        joined = np.concatenate([own, np.where(accepted[..., None], theirs, -1).reshape(len(own), -1)], axis=1)
        joined.sort(axis=1)
        joined[:, 1:][joined[:, 1:] == joined[:, :-1]] = -1  # duplicates out
        joined.sort(axis=1)  # members after the -1 padding
        members[start:start + len(own)] = joined
    return members
