"""Recall@K and MAP@R of image-retrieval embeddings: exact faiss search in memory-bounded batches.

Protocol (the deep-metric-learning literature's; details and the comparison with
pytorch-metric-learning and OML in docs/retrieval-metrics.md):

- similarity is the cosine: embeddings are L2-normalised here, then ranked by inner product;
- every item queries all the others: a query never retrieves itself, excluded by POSITION, so an
  exact duplicate of the query (same image twice, or a distractor of another class) still counts;
- equal scores are ranked by gallery order, lower index first, whatever faiss returned;
- queries whose class has no other member are left out of every mean and counted;
- Recall@K: the fraction of queries with at least one same-class item among their K nearest;
- MAP@R (Musgrave et al., 2020): R = number of other items of the query's class,
  AP@R = (1/R) * sum_{i<=R} precision@i * rel(i), averaged over queries;
- exact fractions: Recall@K counts hits as integers and divides once in float64 (144/160 is
  exactly 0.9); MAP@R averages the per-query float64 AP@R with an exactly rounded sum: the
  metrics add no float32 rounding of their own, and the batch size does not change them.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import faiss
import numpy as np
import torch
from tqdm import tqdm

from finegrain.errors import FinegrainError

if TYPE_CHECKING:
    from finegrain.eval.rerank import Rerank

ArrayLike = torch.Tensor | np.ndarray
# (queries [B, D] float32, k) -> (scores [B, k] float32, gallery ids [B, k] int64)
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]

# Working memory of one query batch (faiss' result buffers and our sort/gather copies): the batch
# shrinks when K grows, so any K fits at SOP scale (60,502 x 1536) in well under 2 GB.
_BATCH_WORKSPACE_BYTES = 256 * 2**20
_BYTES_PER_CANDIDATE = 64
_NORMALISE_CHUNK_BYTES = 64 * 2**20
# faiss GPU k-selection handles at most this many neighbours; deeper searches run on the CPU.
_GPU_MAX_K = 2048


@dataclass(frozen=True)
class RetrievalReport:
    """Everything one neighbour search yields; fractions in [0, 1].

    n_queries counts the queries that were scored; n_excluded_singletons those left out because
    their class has no other member (their Recall and AP are undefined); n_singletons_as_misses
    those scored as misses instead (the release's protocol, eval/query_gallery.py).
    """

    recall: dict[int, float]
    map_at_r: float
    n_queries: int
    n_excluded_singletons: int
    n_singletons_as_misses: int = 0

    def to_metrics(self) -> dict[str, float]:
        """Flat `recall@K` / `map@r` keys, as written to metrics.jsonl."""
        metrics = {f"recall@{k}": value for k, value in self.recall.items()}
        metrics["map@r"] = self.map_at_r
        return metrics


def retrieval_metrics(
    embeddings: ArrayLike,
    labels: ArrayLike,
    ks: Iterable[int] | int = (1, 2, 4, 8),
    *,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
    rerank: Rerank | None = None,
) -> RetrievalReport:
    """Recall@K for every K in `ks` and MAP@R, from a single exact neighbour search.

    Args:
        embeddings: ``[N, D]`` float tensor or array, one row per image (any norm: normalised here).
        labels: ``[N]`` integer class ids.
        ks: the K of Recall@K, each in ``[1, N - 1]``.
        batch_size: most queries searched at once; lowered automatically for deep searches.
        device: ``"cpu"``, ``"cuda[:i]"`` for faiss GPU, or None for a faiss GPU when faiss sees one.
        rerank: re-rank each query's neighbours (eval/rerank.py) before scoring them.

    Returns:
        RetrievalReport with ``recall`` (K -> fraction), ``map_at_r``, ``n_queries`` (scored) and
        ``n_excluded_singletons``.
    """
    gallery = _normalised_embeddings(embeddings)
    num_items = len(gallery)
    class_ids = _class_ids(labels, num_items)
    ks = _checked_ks(ks, num_items)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FinegrainError(f"batch_size must be a positive integer, got {batch_size!r}. Pass e.g. 4096.")

    positives = np.bincount(class_ids)[class_ids] - 1  # [N] other items of each query's class (R)
    scored_ids = np.flatnonzero(positives > 0)
    if len(scored_ids) == 0:
        raise FinegrainError(
            "Every class has a single item, so no query has a correct neighbour and retrieval metrics "
            "are undefined. Pass labels with at least two items per class."
        )
    max_r = int(positives.max())
    depth = max(max(ks), max_r)  # neighbours each query needs, itself excluded
    search = _searcher(gallery, depth + 2, device)
    reranked = rerank.prepare(gallery, search) if rerank is not None else None
    rows = min(batch_size, max(1, _BATCH_WORKSPACE_BYTES // (_BYTES_PER_CANDIDATE * (depth + 2))))

    hits = dict.fromkeys(ks, 0)  # integer counts: Recall@K = hits / queries, one float64 division
    average_precisions: list[np.ndarray] = []  # float64, one per query
    ranks = np.arange(1, max_r + 1)
    batch_starts = range(0, len(scored_ids), rows)
    for start in tqdm(batch_starts, desc="retrieval search", unit="batch", leave=False, disable=None):
        query_ids = scored_ids[start : start + rows]
        neighbour_ids = (_neighbours(search, gallery, query_ids, depth) if reranked is None
                         else reranked.neighbours(query_ids, depth))
        relevant = class_ids[neighbour_ids] == class_ids[query_ids, None]  # [B, depth]
        first_hit = np.where(relevant.any(axis=1), relevant.argmax(axis=1), depth)
        for k in ks:
            hits[k] += int(np.count_nonzero(first_hit < k))
        r = positives[query_ids]
        top_r = relevant[:, :max_r] & (ranks <= r[:, None])
        precision = np.cumsum(top_r, axis=1) / ranks
        average_precisions.append((precision * top_r).sum(axis=1) / r)

    n_queries = len(scored_ids)
    return RetrievalReport(
        recall={k: hits[k] / n_queries for k in ks},
        # fsum: the exactly rounded sum, so the mean does not depend on the batch size
        map_at_r=math.fsum(np.concatenate(average_precisions).tolist()) / n_queries,
        n_queries=n_queries,
        n_excluded_singletons=num_items - n_queries,
    )


def recall_at_k(
    embeddings: ArrayLike,
    labels: ArrayLike,
    ks: Iterable[int] | int = (1, 2, 4, 8),
    *,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
) -> dict[int, float]:
    """Recall@K (K -> fraction of queries with a same-class item among their K nearest).

    Shapes and protocol as in :func:`retrieval_metrics`: embeddings ``[N, D]``, labels ``[N]``.
    """
    return retrieval_metrics(embeddings, labels, ks, batch_size=batch_size, device=device).recall


def map_at_r(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
) -> float:
    """MAP@R of Musgrave et al. (R = other items of the query's class); embeddings ``[N, D]``, labels ``[N]``."""
    return retrieval_metrics(embeddings, labels, (1,), batch_size=batch_size, device=device).map_at_r


def _neighbours(search: SearchFn, gallery: np.ndarray, query_ids: np.ndarray, depth: int) -> np.ndarray:
    """``[B]`` query positions -> ``[B, depth]`` gallery positions, nearest first, the query itself removed.

    faiss orders equal scores arbitrarily and cuts ties at the k-th neighbour arbitrarily too, so
    rows holding a tie are re-sorted by (score desc, index asc), and one extra neighbour tells
    whether the cut fell inside a tie: only such rows (duplicates, collapsed embeddings) are
    re-ranked over the whole gallery.
    """
    width = depth + 1  # the query itself is among them unless duplicates push it out
    probe = min(width + 1, len(gallery))
    scores, ids = search(gallery[query_ids], probe)
    not_strictly_ranked = np.flatnonzero((scores[:, 1:] >= scores[:, :-1]).any(axis=1))
    if len(not_strictly_ranked):
        order = np.lexsort((ids[not_strictly_ranked], -scores[not_strictly_ranked]), axis=-1)
        ids[not_strictly_ranked] = np.take_along_axis(ids[not_strictly_ranked], order, axis=1)
        scores[not_strictly_ranked] = np.take_along_axis(scores[not_strictly_ranked], order, axis=1)
    if probe > width:
        cut_in_tie = scores[:, width - 1] == scores[:, width]
        if cut_in_tie.any():
            ids[cut_in_tie, :width] = _exact_top(gallery, query_ids[cut_in_tie], width)
    ids = ids[:, :width]
    is_self = ids == query_ids[:, None]
    is_self[~is_self.any(axis=1), -1] = True  # self ranked beyond `width`: drop the last instead
    return ids[~is_self].reshape(len(query_ids), depth)


def _exact_top(gallery: np.ndarray, query_ids: np.ndarray, width: int) -> np.ndarray:
    """``[T]`` queries -> ``[T, width]`` ids ranked by (score desc, index asc) over the whole gallery."""
    top = np.empty((len(query_ids), width), dtype=np.int64)
    chunk = max(1, _BATCH_WORKSPACE_BYTES // (8 * len(gallery)))
    for start in range(0, len(query_ids), chunk):
        scores = gallery[query_ids[start : start + chunk]] @ gallery.T  # [c, N]
        cut = -np.partition(-scores, width - 1, axis=1)[:, width - 1]  # width-th largest score
        for row, (row_scores, threshold) in enumerate(zip(scores, cut)):
            candidates = np.flatnonzero(row_scores >= threshold)
            ranked = candidates[np.lexsort((candidates, -row_scores[candidates]))]
            top[start + row] = ranked[:width]
    return top


class _GpuSearch:
    """Exact inner-product search on one faiss GPU; the gallery is uploaded once."""

    def __init__(self, gallery: np.ndarray, gpu_id: int) -> None:
        self.resources = faiss.StandardGpuResources()
        self.index = faiss.index_cpu_to_gpu(self.resources, gpu_id, faiss.IndexFlatIP(gallery.shape[1]))
        self.index.add(gallery)

    def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)


def _searcher(gallery: np.ndarray, max_k: int, device: str | torch.device | None) -> SearchFn:
    """faiss exact inner-product search over `gallery`, on a GPU when asked or available."""
    gpu_id = _faiss_gpu_id(device)
    if gpu_id is not None and max_k <= _GPU_MAX_K:
        return _GpuSearch(gallery, gpu_id)

    # faiss.knn runs IndexFlatIP's exact kernel without copying the gallery into an index.
    def cpu_search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(queries, gallery, k, metric=faiss.METRIC_INNER_PRODUCT)

    return cpu_search


def _faiss_gpu_id(device: str | torch.device | None) -> int | None:
    """The faiss GPU to search on, or None for the CPU."""
    num_gpus = faiss.get_num_gpus()
    if device is None:
        return 0 if num_gpus > 0 else None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise FinegrainError(f"Unknown device {device!r} ({error}). Pass 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise FinegrainError(f"Retrieval search runs on 'cpu' or 'cuda', not {device.type!r}. Pass one of those.")
    gpu_id = device.index or 0
    if gpu_id >= num_gpus:
        raise FinegrainError(
            f"Device {device} was asked for but faiss sees {num_gpus} GPU(s). "
            "Pass device='cpu', or install a faiss build with GPU support on a GPU machine."
        )
    return gpu_id


def _normalised_embeddings(embeddings: ArrayLike) -> np.ndarray:
    """``[N, D]`` float tensor/array -> L2-normalised C-contiguous float32 copy, after checking it."""
    if isinstance(embeddings, torch.Tensor):
        if not embeddings.is_floating_point():
            raise FinegrainError(
                f"Embeddings must be floating point, got {embeddings.dtype}. Pass the model's float output."
            )
        array = embeddings.detach().to(device="cpu", dtype=torch.float32).numpy()
    else:
        array = np.asarray(embeddings)
        if not np.issubdtype(array.dtype, np.floating):
            raise FinegrainError(
                f"Embeddings must be floating point, got {array.dtype}. Pass the model's float output."
            )
    if array.ndim != 2:
        raise FinegrainError(f"Embeddings must have shape [N, D], got {tuple(array.shape)}. Stack one row per image.")
    num_items, dim = array.shape
    if num_items == 0 or dim == 0:
        raise FinegrainError(
            f"Embeddings are empty (shape {tuple(array.shape)}). Extract embeddings for the test set first."
        )
    if num_items < 2:
        raise FinegrainError(
            "Retrieval needs at least 2 embeddings (each query searches the others). Pass more images."
        )

    normalised = np.empty((num_items, dim), dtype=np.float32)
    rows = max(1, _NORMALISE_CHUNK_BYTES // (8 * dim))
    for start in range(0, num_items, rows):
        block = array[start : start + rows].astype(np.float64)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            raise FinegrainError(
                f"Embedding row {start + int(np.argmin(finite))} holds NaN or inf. "
                "Check the model and its precision (an fp16 overflow or a diverged training run gives these)."
            )
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        if not norms.all():
            raise FinegrainError(
                f"Embedding row {start + int(np.argmin(norms))} is all zeros, so its cosine similarity is undefined. "
                "Check the model's output for that image."
            )
        normalised[start : start + rows] = block / norms[:, None]
    return normalised


def _class_ids(labels: ArrayLike, num_items: int) -> np.ndarray:
    """``[N]`` integer labels of any values -> dense class ids ``[N]`` in ``[0, C)``."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1:
        raise FinegrainError(f"Labels must have shape [N], got {tuple(array.shape)}. Pass one class id per embedding.")
    if len(array) != num_items:
        raise FinegrainError(
            f"Got {len(array)} labels for {num_items} embeddings. Pass exactly one label per embedding row."
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise FinegrainError(
            f"Labels must be integer class ids, got dtype {array.dtype}. Convert them, e.g. labels.long()."
        )
    return np.unique(array, return_inverse=True)[1].reshape(-1)


def _checked_ks(ks: Iterable[int] | int, num_items: int) -> tuple[int, ...]:
    """The distinct K values in given order, each in [1, N - 1] (the gallery minus the query)."""
    values = [ks] if isinstance(ks, int) else list(ks)
    if not values:
        raise FinegrainError("No K given for Recall@K. Pass e.g. ks=(1, 2, 4, 8).")
    checked = []
    for k in values:
        try:
            if isinstance(k, bool):
                raise TypeError
            k = operator.index(k)
        except TypeError:
            raise FinegrainError(f"K must be a positive integer, got {k!r}. Pass e.g. ks=(1, 2, 4, 8).") from None
        if k < 1:
            raise FinegrainError(f"K must be at least 1, got {k}. Pass e.g. ks=(1, 2, 4, 8).")
        if k > num_items - 1:
            raise FinegrainError(
                f"K={k} is larger than the gallery: each of the {num_items} queries ranks only the other "
                f"{num_items - 1} items. Ask for K <= {num_items - 1}."
            )
        checked.append(k)
    return tuple(dict.fromkeys(checked))
