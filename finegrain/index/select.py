"""Choosing and tuning a faiss index for a recall target, not for a latency budget.

autofaiss picks an index by size and memory, sets its search parameters for a latency and only
reports recall afterwards; on hard data that silently yields recall@10 around 0.7. Here the
order is reversed: the search parameter (nprobe, efSearch) is raised until recall@k against
exact search on held-out vectors reaches the target, and when no setting reaches it faster than
exact search does, the exact index is returned and the reason is reported.

All indexes use inner product on L2-normalised embeddings (cosine similarity).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np
from tqdm.auto import tqdm

from finegrain.errors import FinegrainError

# Below this many multiply-adds per query (n * d), exact search takes a few milliseconds on one
# core, so an approximate index would buy little latency for a recall loss.
EXACT_WORK_LIMIT = 1 << 25
_IVF_IDS_BYTES = 8  # an IVF list stores an int64 id next to each code
_ADD_CHUNK = 65536
MAX_MEMORY = 1 << 60


@dataclass(frozen=True)
class IndexPlan:
    """A faiss index_factory key with the reason it was chosen and how many vectors train it."""

    key: str
    reason: str
    train_size: int = 0


@dataclass(frozen=True)
class OperatingPoint:
    """One tried search setting: recall@k on the held-out queries and batched latency per query."""

    parameters: str
    recall: float
    latency_ms: float


@dataclass
class TuneReport:
    """What was built, with which search parameters, and the recall and latency measured."""

    requested_key: str
    key: str
    parameters: str
    recall_target: float
    recall_k: int
    recall: float
    latency_ms: float
    single_query_latency_ms: float
    exact_latency_ms: float
    exact_single_query_latency_ms: float
    queries: int
    reason: str
    fallback: str | None = None
    points: list[OperatingPoint] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_memory(text: str | int) -> int:
    """'4G', '512M', '1.5GB', '123456' -> bytes (binary units, as faiss and autofaiss use)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", str(text), flags=re.IGNORECASE)
        if not match:
            raise FinegrainError(f"Cannot read the memory size {text!r}. Write it like 512M, 4G or 1.5T.")
        scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
        value = float(match.group(1)) * scale
        size = int(value) if value < MAX_MEMORY else MAX_MEMORY + 1
    if not 1 <= size <= MAX_MEMORY:
        raise FinegrainError(f"The memory size {text!r} is not between 1 byte and 1 EiB. "
                             "Write it like 512M, 4G or 1.5T.")
    return size


def _nlist_for(count: int) -> int:
    """IVF list count: the power of two nearest 4 * sqrt(n) (faiss's guideline), 64..65536."""
    return int(min(65536, max(64, 2 ** round(math.log2(4 * math.sqrt(count))))))


def plan_index(count: int, dim: int, max_memory: int) -> IndexPlan:
    """Pick an index_factory key from the collection size, dimension and memory budget.

    Exact Flat while a query costs little; IVF-Flat while the raw vectors fit in the budget
    (it memory-maps, runs on GPU faiss and shards by list, which HNSW does not); IVF-SQ8 at a
    quarter of that; OPQ + IVF-PQ with as many sub-quantizers as the budget allows beyond that.
    """
    flat_bytes = 4 * count * dim
    if count * dim <= EXACT_WORK_LIMIT and flat_bytes <= max_memory:
        return IndexPlan("Flat", f"{count} x {dim} is small: exact search costs little per query")
    nlist = _nlist_for(count)
    train = min(count, 64 * nlist)
    quantizer = f"IVF{nlist}" if nlist <= 16384 else f"IVF{nlist}_HNSW32"
    if count * (4 * dim + _IVF_IDS_BYTES) <= max_memory:
        return IndexPlan(f"{quantizer},Flat", f"raw vectors ({_gib(flat_bytes)}) fit the budget", train)
    if count * (dim + _IVF_IDS_BYTES) <= max_memory:
        return IndexPlan(f"{quantizer},SQ8", "8-bit scalar codes fit the budget, raw vectors do not", train)
    for subquantizers in (64, 32, 16, 8):
        if count * (subquantizers + _IVF_IDS_BYTES) <= max_memory:
            rotated = min(dim, 4 * subquantizers)
            return IndexPlan(f"OPQ{subquantizers}_{rotated},{quantizer},PQ{subquantizers}",
                             f"only {subquantizers}-byte product codes fit the budget", train)
    need = count * (8 + _IVF_IDS_BYTES)
    raise FinegrainError(f"{count} vectors need at least {_gib(need)} even as 8-byte codes. "
                         f"Raise --max-memory to {_gib(need)} or more.")


def _gib(size: float) -> str:
    return f"{size / (1 << 30):.2f} GiB"


def neighbour_recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k ids that the approximate top-k contains (ANN vs exact).

    Not the class Recall@K of `finegrain.eval.retrieval.recall_at_k`, which asks whether a
    neighbour shares the query's label.

    found, exact: [Q, >=k] int64 ids (-1 = no result, never counted as a hit).
    """
    found, exact = found[:, :k], exact[:, :k]
    hits = ((found[:, :, None] == exact[:, None, :]) & (found[:, :, None] >= 0)).any(axis=2)
    return float(hits.sum(axis=1).mean() / k)


def _parameter_ladder(index: faiss.Index, k: int) -> tuple[str, list[int]]:
    """The one search parameter that trades speed for recall, with the values to try in order."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", [2**i for i in range(int(math.log2(ivf.nlist)) + 1)]
    if "HNSW" in type(faiss.downcast_index(_inner(index))).__name__:
        return "efSearch", [max(k, 2**i) for i in range(4, 13)]
    return "", []


def _inner(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def _set_parameter(index: faiss.Index, name: str, value: int) -> None:
    faiss.ParameterSpace().set_index_parameter(index, name, value)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and name == "nprobe" and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        faiss.downcast_index(ivf.quantizer).hnsw.efSearch = max(64, 2 * value)


def apply_parameters(index: faiss.Index, parameters: str) -> None:
    """Apply 'name=value,...' as stored in an index manifest (empty for exact indexes)."""
    for item in filter(None, parameters.split(",")):
        name, value = item.split("=")
        _set_parameter(index, name, int(value))


def _timed_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    return ids, 1000 * (time.perf_counter() - start) / len(queries)


def _single_query_ms(search, queries: np.ndarray, k: int, limit: int = 100) -> float:
    """Latency of one query at a time, as an interactive user sees it."""
    sample = queries[:limit]
    start = time.perf_counter()
    for row in sample:
        search(row[None], k)
    return 1000 * (time.perf_counter() - start) / len(sample)


def _add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, progress: bool) -> None:
    for start in tqdm(range(0, len(vectors), _ADD_CHUNK), desc="add to index", disable=not progress, leave=False):
        index.add_with_ids(vectors[start:start + _ADD_CHUNK], ids[start:start + _ADD_CHUNK])


def exact_index(vectors: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def build_tuned_index(vectors: np.ndarray, *, index_key: str | None = None, max_memory: int = 4 << 30,
                      recall_target: float = 0.95, recall_k: int = 10, holdout: int = 1000, seed: int = 0,
                      progress: bool = True) -> tuple[faiss.Index, TuneReport]:
    """Build an index over `vectors` [N, D] (row i gets id i) tuned to `recall_target` recall@k.

    Approximate indexes are trained and filled without a held-out sample of rows, tuned with
    those rows as queries (new vectors, as real queries are), then the rows are added back.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    if count == 0:
        raise FinegrainError("There are no vectors to index. Give a folder with readable images.")
    plan = plan_index(count, dim, max_memory) if index_key is None else IndexPlan(index_key, "given by --index-key")
    if plan.key == "Flat":
        return _exact_report(vectors, plan, recall_target, recall_k, seed)
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(count, size=min(holdout, count // 10), replace=False))
    if len(held) < 10:
        raise FinegrainError(f"{count} vectors are too few to tune {plan.key!r}. Use --index-key Flat.")
    base = np.setdiff1d(np.arange(count), held)
    try:
        index = faiss.index_factory(dim, plan.key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise FinegrainError(f"faiss cannot build {plan.key!r} for {dim}-d vectors: {str(error).splitlines()[0]}. "
                             "Check the index_factory key, or leave --index-key out to let it be picked.") from None
    if faiss.try_extract_index_ivf(index) is None:
        index = faiss.IndexIDMap(index)  # held-out rows are added last but keep their row ids
    train_rows = np.sort(rng.choice(base, size=min(len(base), plan.train_size or len(base)), replace=False))
    try:
        index.train(vectors[train_rows])
    except RuntimeError as error:
        raise FinegrainError(f"faiss cannot train {plan.key!r} on {len(train_rows)} vectors: "
                             f"{str(error).splitlines()[0]}. Choose a smaller index key or let it be picked.") from None
    queries, k, base_vectors = vectors[held], min(recall_k, len(base)), vectors[base]
    _add(index, base_vectors, base.astype(np.int64), progress)
    gt_start = time.perf_counter()
    _, exact_ids = faiss.knn(queries, base_vectors, k, faiss.METRIC_INNER_PRODUCT)
    exact_ms = 1000 * (time.perf_counter() - gt_start) / len(queries)
    exact_ids = base[exact_ids]
    name, ladder = _parameter_ladder(index, k)
    points: list[OperatingPoint] = []
    chosen: OperatingPoint | None = None
    for value in ladder or [0]:
        if name:
            _set_parameter(index, name, value)
        ids, latency = _timed_search(index, queries, k)
        point = OperatingPoint(f"{name}={value}" if name else "", neighbour_recall(ids, exact_ids, k), latency)
        points.append(point)
        if point.recall >= recall_target and point.latency_ms < exact_ms:
            chosen = point
            break
        if point.latency_ms >= exact_ms:
            break  # any slower setting would also lose to exact search
    exact_single = _single_query_ms(lambda q, kk: faiss.knn(q, base_vectors, kk, faiss.METRIC_INNER_PRODUCT),
                                    queries, k)
    del base_vectors
    if chosen is None:
        why = _fallback_reason(plan.key, points, recall_target, k, exact_ms)
        exact = exact_index(vectors)
        return exact, TuneReport(plan.key, "Flat", "", recall_target, k, 1.0, exact_ms, exact_single, exact_ms,
                                 exact_single, len(held), plan.reason, why, points)
    single = _single_query_ms(index.search, queries, k)
    _add(index, vectors[held], held.astype(np.int64), progress)
    return index, TuneReport(plan.key, plan.key, chosen.parameters, recall_target, k, chosen.recall,
                             chosen.latency_ms, single, exact_ms, exact_single, len(held), plan.reason, None, points)


def _fallback_reason(key: str, points: list[OperatingPoint], target: float, k: int, exact_ms: float) -> str:
    meeting = [p for p in points if p.recall >= target]
    if meeting:
        cheapest = meeting[0]
        return (f"{key} reaches recall@{k} {cheapest.recall:.3f} only at {cheapest.parameters} "
                f"({cheapest.latency_ms:.3f} ms/query), slower than exact search ({exact_ms:.3f} ms/query); "
                "using exact search instead")
    best = max(points, key=lambda p: p.recall)
    return (f"{key} reaches recall@{k} {best.recall:.3f} at best ({best.parameters or 'default'}), below the "
            f"target {target} at every setting faster than exact search ({exact_ms:.3f} ms/query); "
            "using exact search instead")


def _exact_report(vectors: np.ndarray, plan: IndexPlan, target: float, k: int,
                  seed: int) -> tuple[faiss.Index, TuneReport]:
    index = exact_index(vectors)
    rng = np.random.default_rng(seed)
    queries = vectors[rng.choice(len(vectors), size=min(100, len(vectors)), replace=False)]
    k = min(k, len(vectors))
    _, batched = _timed_search(index, queries, k)
    single = _single_query_ms(index.search, queries, k)
    return index, TuneReport(plan.key, "Flat", "", target, k, 1.0, batched, single, batched, single,
                             len(queries), plan.reason)
