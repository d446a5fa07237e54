"""Recall@K / MAP@R: equal to pytorch-metric-learning and to a brute-force ranking, corner cases pinned."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from finegrain.errors import FinegrainError
from finegrain.eval.retrieval import _neighbours, map_at_r, recall_at_k, retrieval_metrics


def clustered(seed: int, num_items: int, dim: int, num_classes: int, singletons: int = 0, duplicates: int = 0,
              cross_class_duplicates: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy class clusters (raw, unnormalised rows) with singleton classes and duplicated rows mixed in."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_items)
    labels[:singletons] = num_classes + np.arange(singletons)  # classes of one item
    centres = rng.standard_normal((num_classes + singletons, dim))
    embeddings = centres[labels] + 1.2 * rng.standard_normal((num_items, dim))
    embeddings *= rng.uniform(0.1, 10.0, (num_items, 1))  # norms must not matter
    sources = rng.choice(np.arange(singletons, num_items), duplicates + cross_class_duplicates, replace=False)
    targets = rng.choice(np.arange(singletons, num_items), len(sources), replace=False)
    for position, (source, target) in enumerate(zip(sources, targets)):
        embeddings[target] = embeddings[source] * rng.choice([0.5, 2.0, 4.0])  # power of 2: an exact tie
        if position < duplicates:
            labels[target] = labels[source]
    return embeddings.astype(np.float32), labels


def brute_force(embeddings: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> tuple[dict[int, float], float]:
    """The protocol written out: float64 cosine, others ranked by (score desc, index asc), singletons skipped."""
    unit = embeddings.astype(np.float64) / np.linalg.norm(embeddings.astype(np.float64), axis=1, keepdims=True)
    similarity = unit @ unit.T
    hits, average_precisions = {k: [] for k in ks}, []
    for query in range(len(unit)):
        others = np.delete(np.arange(len(unit)), query)
        ranked = others[np.lexsort((others, -similarity[query, others]))]
        relevant = labels[ranked] == labels[query]
        r = int(relevant.sum())
        if r == 0:
            continue
        for k in ks:
            hits[k].append(relevant[:k].any())
        precision = np.cumsum(relevant[:r]) / np.arange(1, r + 1)
        average_precisions.append(float((precision * relevant[:r]).sum() / r))
    return {k: float(np.mean(v)) for k, v in hits.items()}, float(np.mean(average_precisions))


@pytest.mark.parametrize(
    "seed, num_items, dim, num_classes, singletons, duplicates",
    [(0, 300, 16, 60, 5, 10), (1, 500, 32, 200, 40, 30), (2, 257, 8, 20, 1, 0), (3, 400, 64, 150, 0, 50)],
)
def test_matches_pml_accuracy_calculator(seed, num_items, dim, num_classes, singletons, duplicates):
    embeddings, labels = clustered(seed, num_items, dim, num_classes, singletons, duplicates)
    unit = torch.nn.functional.normalize(torch.from_numpy(embeddings), dim=1)  # pml ranks raw L2: give it unit rows
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count", device=torch.device("cpu")
    )
    torch_labels = torch.from_numpy(labels)
    expected = calculator.get_accuracy(unit, torch_labels, unit, torch_labels, ref_includes_query=True)

    report = retrieval_metrics(embeddings, labels, (1,))

    assert 0.05 < report.recall[1] < 0.95  # neither trivial nor hopeless
    assert report.recall[1] == pytest.approx(expected["precision_at_1"], abs=1e-12)
    assert report.map_at_r == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-12)
    class_sizes = np.bincount(labels)[labels]
    assert report.n_excluded_singletons == int((class_sizes == 1).sum()) >= singletons
    assert report.n_queries == num_items - report.n_excluded_singletons


@pytest.mark.parametrize("batch_size", [7, 4096])
def test_matches_brute_force_with_ties_and_deep_k(batch_size):
    embeddings, labels = clustered(4, 240, 12, 40, singletons=3, duplicates=8, cross_class_duplicates=12)
    ks = (1, 2, 5, 100, 239)  # 239 = N - 1: the whole gallery

    report = retrieval_metrics(embeddings, labels, ks, batch_size=batch_size)

    expected_recall, expected_map = brute_force(embeddings, labels, ks)
    assert report.recall == pytest.approx(expected_recall, abs=1e-12)
    assert report.recall[239] == 1.0
    assert report.map_at_r == pytest.approx(expected_map, abs=1e-12)


def test_metrics_are_exact_fractions_whatever_the_batch():
    """80 tight pairs; 72 pairs share a label, 8 are relabelled so each item's nearest is of another
    class: Recall@1 = MAP@R = 144/160, exactly 0.9 (a float32 mean gives 0.8999999761581421)."""
    pairs = np.eye(80, dtype=np.float32)
    embeddings = np.concatenate([pairs, pairs + 0.01 * np.roll(pairs, 1, axis=1)])  # item p and 80 + p pair up
    labels = np.concatenate([np.arange(80), np.arange(80)])
    labels[152:] = 72 + (np.arange(8) + 1) % 8  # pairs 72..79: partner of another class, classes stay of two

    report = retrieval_metrics(embeddings, labels, (1, 2))

    assert (report.recall[1], report.map_at_r, report.n_queries) == (0.9, 0.9, 160)
    shuffled, clustered_labels = clustered(11, 400, 16, 60, singletons=4, duplicates=10)
    by_batch = [retrieval_metrics(shuffled, clustered_labels, (1, 4), batch_size=size) for size in (1, 7, 4096)]
    assert by_batch[0] == by_batch[1] == by_batch[2]  # MAP@R too, to the last bit
    hits = brute_force_hits(shuffled, clustered_labels)
    assert by_batch[0].recall[1] == hits / by_batch[0].n_queries


def brute_force_hits(embeddings: np.ndarray, labels: np.ndarray) -> int:
    """Queries (with a classmate) whose nearest other item, ties by index, is a classmate: an integer."""
    unit = embeddings.astype(np.float64) / np.linalg.norm(embeddings.astype(np.float64), axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    has_classmate = np.bincount(labels)[labels] > 1
    nearest = np.argmax(similarity, axis=1)  # the first (lowest index) of equal maxima
    return int(np.count_nonzero((labels[nearest] == labels) & has_classmate))


def test_distractor_identical_to_query_but_of_another_class_is_retrieved():
    """Item 1 duplicates item 0 with another label: each must retrieve the other first (a miss).

    Hand ranking (ties by index): q0 -> [1 B, 2 A, 3 B], q1 -> [0 A, 2 A, 3 B], q2 -> [0 A, 1 B, 3 B],
    q3 -> [0 A, 1 B, 2 A]. A metric that drops the top hit, or every score of 1, as "the query
    itself" (the release's TF bug) scores q0 a hit at rank 1 instead.
    """
    side = np.sqrt(np.float32(0.19))
    embeddings = np.array([[1, 0, 0], [1, 0, 0], [0.9, side, 0], [0.9, 0, side]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1])

    report = retrieval_metrics(embeddings, labels, (1, 2, 3))

    assert report.recall == {1: 0.25, 2: 0.75, 3: 1.0}
    assert report.map_at_r == 0.25


@pytest.mark.parametrize("ks", [(1,), (1, 3, 4)])
def test_self_excluded_by_position_among_identical_items(ks):
    """Five identical embeddings (classes B B B A A) among far-away others: ranking goes by index.

    Query 4 ranks 0 1 2 3 (itself excluded by position even when the tie pushes it out of the
    searched depth), so A's queries first meet their class at rank 4; B's queries at rank 1.
    """
    rng = np.random.default_rng(5)
    far = rng.standard_normal((6, 8)).astype(np.float32)
    far[:, 0] = -10.0  # far from the identical group along the first axis
    same = np.tile(np.eye(8, dtype=np.float32)[:1], (5, 1))
    embeddings = np.concatenate([same, far])
    labels = np.array([1, 1, 1, 0, 0, 2, 2, 3, 3, 4, 4])

    report = retrieval_metrics(embeddings, labels, ks)

    group_recall, group_map = {1: 3 / 5, 3: 3 / 5, 4: 1.0}, 3 / 5  # B queries hit at rank 1, A at rank 4
    far_recall, far_map = brute_force(far, labels[5:], ks)  # the far items only ever rank each other first
    for k in ks:
        assert report.recall[k] == pytest.approx((5 * group_recall[k] + 6 * far_recall[k]) / 11)
    assert report.map_at_r == pytest.approx((5 * group_map + 6 * far_map) / 11)


def test_ties_ranked_by_gallery_order_whatever_the_search_returns():
    """A search that breaks ties by HIGHER index (as a GPU k-selection may) still yields index order."""
    rng = np.random.default_rng(6)
    groups = rng.standard_normal((12, 6)).astype(np.float32)
    gallery = groups[rng.integers(0, 12, 90)]  # 90 rows, many exact duplicates
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    query_ids = np.arange(0, 90, 3)
    depth = 10

    def highest_index_first(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = faiss.knn(queries, gallery, len(gallery), metric=faiss.METRIC_INNER_PRODUCT)
        order = np.lexsort((-ids, -scores), axis=-1)[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    neighbours = _neighbours(highest_index_first, gallery, query_ids, depth)

    similarity = gallery.astype(np.float64) @ gallery.astype(np.float64).T
    for row, query in enumerate(query_ids):
        others = np.delete(np.arange(len(gallery)), query)
        ranked = others[np.lexsort((others, -similarity[query, others]))]
        np.testing.assert_array_equal(neighbours[row], ranked[:depth])


def test_input_types_dtypes_and_norms_do_not_change_results():
    embeddings, labels = clustered(7, 200, 16, 40, singletons=2, duplicates=5)
    reference = retrieval_metrics(embeddings, labels, (1, 4))
    scaled = embeddings * np.random.default_rng(8).uniform(0.01, 100.0, (len(embeddings), 1)).astype(np.float32)

    for candidate_embeddings, candidate_labels in [
        (torch.from_numpy(embeddings), torch.from_numpy(labels)),
        (embeddings.astype(np.float64), labels.astype(np.int32)),
        (torch.from_numpy(scaled).double(), torch.from_numpy(labels + 1000)),  # label values are arbitrary
    ]:
        assert retrieval_metrics(candidate_embeddings, candidate_labels, (1, 4)) == reference

    assert recall_at_k(embeddings, labels, (1, 4)) == reference.recall
    assert map_at_r(embeddings, labels) == reference.map_at_r
    assert reference.to_metrics() == {
        "recall@1": reference.recall[1], "recall@4": reference.recall[4], "map@r": reference.map_at_r
    }


def test_duplicate_and_single_int_ks():
    embeddings, labels = clustered(9, 100, 8, 20)
    assert list(recall_at_k(embeddings, labels, (4, 1, 4))) == [4, 1]
    assert recall_at_k(embeddings, labels, 2) == recall_at_k(embeddings, labels, (2,))


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs a faiss GPU")
def test_gpu_search_matches_cpu():
    embeddings, labels = clustered(10, 3000, 64, 400, singletons=10, duplicates=40, cross_class_duplicates=40)
    ks = (1, 10, 100, 2999)  # 2999 > faiss' GPU k limit: that search falls back to the CPU
    for searched_ks in (ks[:3], ks):
        on_gpu = retrieval_metrics(embeddings, labels, searched_ks, device="cuda")
        assert on_gpu == retrieval_metrics(embeddings, labels, searched_ks, device="cpu")


def _with_row(value: float) -> np.ndarray:
    embeddings, _ = clustered(11, 20, 4, 5)
    embeddings[7] = value
    return embeddings


GOOD_EMBEDDINGS, GOOD_LABELS = clustered(12, 20, 4, 5)


@pytest.mark.parametrize(
    "embeddings, labels, kwargs, message",
    [
        (_with_row(np.nan), GOOD_LABELS, {}, "row 7 holds NaN or inf"),
        (_with_row(np.inf), GOOD_LABELS, {}, "row 7 holds NaN or inf"),
        (_with_row(0.0), GOOD_LABELS, {}, "row 7 is all zeros"),
        (GOOD_EMBEDDINGS, GOOD_LABELS[:-1], {}, "Got 19 labels for 20 embeddings"),
        (GOOD_EMBEDDINGS, GOOD_LABELS[:, None], {}, r"Labels must have shape \[N\]"),
        (GOOD_EMBEDDINGS, GOOD_LABELS.astype(np.float32), {}, "Labels must be integer"),
        (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), {}, "Embeddings are empty"),
        (GOOD_EMBEDDINGS[0], GOOD_LABELS, {}, r"shape \[N, D\]"),
        (GOOD_EMBEDDINGS.astype(np.int64), GOOD_LABELS, {}, "floating point"),
        (torch.ones(20, 4, dtype=torch.long), GOOD_LABELS, {}, "floating point"),
        (GOOD_EMBEDDINGS[:1], GOOD_LABELS[:1], {}, "at least 2 embeddings"),
        (GOOD_EMBEDDINGS, GOOD_LABELS, {"ks": (1, 20)}, "K=20 is larger than the gallery.*K <= 19"),
        (GOOD_EMBEDDINGS, GOOD_LABELS, {"ks": (0,)}, "K must be at least 1"),
        (GOOD_EMBEDDINGS, GOOD_LABELS, {"ks": (1.0,)}, "K must be a positive integer"),
        (GOOD_EMBEDDINGS, GOOD_LABELS, {"ks": (True,)}, "K must be a positive integer"),
        (GOOD_EMBEDDINGS, GOOD_LABELS, {"ks": ()}, "No K given"),
        (GOOD_EMBEDDINGS, np.arange(20), {}, "Every class has a single item"),
        (GOOD_EMBEDDINGS, GOOD_LABELS, {"batch_size": 0}, "batch_size must be a positive integer"),
        (GOOD_EMBEDDINGS, GOOD_LABELS, {"device": "mps"}, "runs on 'cpu' or 'cuda'"),
        (GOOD_EMBEDDINGS, GOOD_LABELS, {"device": "no-such-device"}, "Unknown device"),
    ],
)
def test_bad_input_raises_clear_error(embeddings, labels, kwargs, message):
    with pytest.raises(FinegrainError, match=message):
        retrieval_metrics(embeddings, labels, **kwargs)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="this machine's faiss has a GPU")
def test_cuda_without_faiss_gpu_is_a_clear_error():
    with pytest.raises(FinegrainError, match="faiss sees 0 GPU"):
        retrieval_metrics(GOOD_EMBEDDINGS, GOOD_LABELS, device="cuda")
