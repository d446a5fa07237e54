"""Query/gallery retrieval metrics: equal to pytorch-metric-learning's AccuracyCalculator with
ref_includes_query=False (plain and class-balanced), to a brute-force ranking for every K, and
the release's protocol (queries without a gallery match counted as misses)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from finegrain.errors import FinegrainError
from finegrain.eval.query_gallery import query_gallery_metrics, singletons_as_misses
from finegrain.eval.rerank import Rerank
from finegrain.eval.retrieval import retrieval_metrics
from test_rerank import reference_kreciprocal


def query_and_gallery(seed: int, num_queries: int, num_gallery: int, dim: int, num_classes: int,
                      query_only_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Noisy class clusters, unnormalised; the last `query_only_classes` classes have no gallery item."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes + query_only_classes, dim))
    query_labels = rng.integers(0, num_classes + query_only_classes, num_queries)
    gallery_labels = rng.integers(0, num_classes, num_gallery)
    scale = rng.uniform(0.5, 4.0, (num_queries + num_gallery, 1))
    queries = (centres[query_labels] + 1.1 * rng.standard_normal((num_queries, dim))) * scale[:num_queries]
    gallery = (centres[gallery_labels] + 1.1 * rng.standard_normal((num_gallery, dim))) * scale[num_queries:]
    return queries.astype(np.float32), query_labels * 7 + 3, gallery.astype(np.float32), gallery_labels * 7 + 3


def brute_force(queries, query_labels, gallery, gallery_labels, ks, lists=None):
    """Per-query hits@K and AP@R over the whole gallery ranked by (cosine desc, index asc)."""
    unit = lambda x: x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    similarity = unit(queries) @ unit(gallery).T
    hits, precisions, scored = {k: [] for k in ks}, [], []
    for i, row in enumerate(similarity):
        ranked = np.lexsort((np.arange(len(row)), -row)) if lists is None else lists[i]
        relevant = gallery_labels[ranked] == query_labels[i]
        r = int((gallery_labels == query_labels[i]).sum())
        scored.append(r > 0)
        for k in ks:
            hits[k].append(bool(relevant[:k].any()))
        precisions.append(float((np.cumsum(relevant[:r]) / np.arange(1, r + 1) * relevant[:r]).sum() / r) if r else 0.0)
    return {k: np.array(v) for k, v in hits.items()}, np.array(precisions), np.array(scored)


@pytest.mark.parametrize("seed, num_queries, num_gallery, dim, num_classes, query_only", [
    (0, 200, 300, 16, 40, 5), (1, 150, 500, 32, 120, 0), (2, 300, 120, 8, 15, 3)])
@pytest.mark.parametrize("avg_of_avgs", [False, True])
def test_equals_pml_accuracy_calculator_with_a_separate_reference(seed, num_queries, num_gallery, dim, num_classes,
                                                                   query_only, avg_of_avgs):
    queries, query_labels, gallery, gallery_labels = query_and_gallery(seed, num_queries, num_gallery, dim,
                                                                       num_classes, query_only)
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                                    avg_of_avgs=avg_of_avgs, device=torch.device("cpu"))
    normalise = lambda x: torch.nn.functional.normalize(torch.from_numpy(x), dim=1)  # pml ranks by L2
    expected = calculator.get_accuracy(normalise(queries), torch.from_numpy(query_labels), normalise(gallery),
                                       torch.from_numpy(gallery_labels), ref_includes_query=False)

    report = query_gallery_metrics(queries, query_labels, gallery, gallery_labels, (1,), device="cpu")

    recall_1, map_r = ((report.class_balanced["recall@1"], report.class_balanced["map@r"]) if avg_of_avgs
                       else (report.recall[1], report.map_at_r))
    assert 0.05 < recall_1 < 0.95
    assert recall_1 == pytest.approx(expected["precision_at_1"], abs=1e-6)  # pml averages in float32
    assert map_r == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-6)
    without = int(np.isin(query_labels, gallery_labels, invert=True).sum())
    assert report.n_without_positive == without >= query_only
    assert report.n_queries == num_queries - without


@pytest.mark.parametrize("singletons", ["exclude", "miss"])
def test_every_k_and_the_singleton_rule_equal_a_brute_force_ranking(singletons):
    queries, query_labels, gallery, gallery_labels = query_and_gallery(3, 120, 200, 12, 30, 6)
    ks = (1, 2, 4, 8, 200)
    hits, precisions, scored = brute_force(queries, query_labels, gallery, gallery_labels, ks)
    counted = scored if singletons == "exclude" else np.ones_like(scored)

    report = query_gallery_metrics(queries, query_labels, gallery, gallery_labels, ks, singletons=singletons,
                                   batch_size=7, device="cpu")

    for k in ks:
        assert report.recall[k] == int(hits[k][counted].sum()) / int(counted.sum())  # exact fractions
    assert report.map_at_r == pytest.approx(precisions[counted].mean(), abs=1e-12)
    assert report.n_queries == int(counted.sum())
    assert report.to_metrics()["recall@200"] == report.recall[200]
    classes = np.unique(query_labels[counted])
    balanced = np.mean([hits[1][counted][query_labels[counted] == c].mean() for c in classes])
    assert report.class_balanced["recall@1"] == pytest.approx(balanced, abs=1e-12)


def test_reranked_query_gallery_metrics_score_the_reranked_lists():
    queries, query_labels, gallery, gallery_labels = query_and_gallery(4, 30, 60, 8, 8, 0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    lists, _ = reference_kreciprocal(unit(gallery), unit(queries), k1=8, k2=3, lam=0.3)
    hits, precisions, _ = brute_force(queries, query_labels, gallery, gallery_labels, (1, 4), lists)

    report = query_gallery_metrics(queries, query_labels, gallery, gallery_labels, (1, 4), device="cpu",
                                   rerank=Rerank("kreciprocal", k1=8, k2=3, pool=60))

    assert report.recall == {1: hits[1].mean(), 4: hits[4].mean()}
    assert report.map_at_r == pytest.approx(precisions.mean(), abs=1e-9)


def test_release_protocol_counts_leave_one_out_singletons_as_misses():
    rng = np.random.default_rng(5)
    labels = np.concatenate([np.repeat(np.arange(30), 4), 100 + np.arange(12)])  # 12 classes of one image
    embeddings = rng.standard_normal((30 + 12, 16))[np.concatenate([np.repeat(np.arange(30), 4), 30 + np.arange(12)])]
    embeddings = embeddings + 0.9 * rng.standard_normal(embeddings.shape)
    report = retrieval_metrics(embeddings, labels, (1, 2), device="cpu")

    release = singletons_as_misses(report)

    assert report.n_excluded_singletons == 12 and release.n_queries == 132
    assert release.recall[1] == round(report.recall[1] * 120) / 132
    assert release.map_at_r == pytest.approx(report.map_at_r * 120 / 132, abs=1e-15)


@pytest.mark.parametrize("arguments, message", [
    (dict(gallery=np.ones((4, 3), np.float32)), "one width"),
    (dict(query_labels=np.array([0.5, 1.5])), "integer class ids"),
    (dict(gallery_labels=np.array([7, 8, 9, 9])), "No query's class has an item in the gallery"),
    (dict(ks=(5,)), "K=5 is larger than the gallery of 4 items"),
    (dict(singletons="drop"), "singletons must be one of"),
])
def test_bad_input_is_explained(arguments, message):
    base = dict(queries=np.eye(2, 4, dtype=np.float32), query_labels=np.array([0, 1]),
                gallery=np.eye(4, dtype=np.float32), gallery_labels=np.array([0, 1, 0, 1]), ks=(1,))
    with pytest.raises(FinegrainError, match=message):
        query_gallery_metrics(**{**base, **arguments})


# ------------------------------------------------------------------ In-Shop and CSV layouts
def _photos(count: int) -> list[Path]:
    from finegrain.data import demo_root

    return sorted((demo_root() / "test").rglob("*.jpg"))[:count]


def _inshop(root: Path, parts: list[tuple[str, str]], count_line: str | None = None) -> Path:
    """An In-Shop layout over demo photos: (item_id, part) per image."""
    lines = [count_line or str(len(parts)), "image_name item_id evaluation_status"]
    for number, ((item, part), photo) in enumerate(zip(parts, _photos(len(parts)))):
        name = f"img/WOMEN/Dresses/{item}/{number:02d}_1_front.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, root / name)
        lines.append(f"{name}   {item} {part}")
    (root / "Eval").mkdir(exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


PARTS = [("id_01", "train"), ("id_01", "train"), ("id_02", "train"), ("id_03", "query"), ("id_03", "gallery"),
         ("id_03", "gallery"), ("id_04", "query"), ("id_04", "gallery"), ("id_05", "query")]


def test_inshop_reads_train_query_and_gallery_and_the_checkpoint_is_scored_on_them(tmp_path):
    from finegrain.data import load_splits
    from finegrain.eval.retrieval_eval import evaluate_retrieval
    from test_index import _save_embedder

    splits = load_splits("inshop", _inshop(tmp_path / "inshop", PARTS))

    assert [len(splits[name]) for name in ("train", "query", "gallery", "test")] == [3, 3, 3, 6]
    assert splits["query"].classes == splits["gallery"].classes == ["id_03", "id_04", "id_05"]
    assert splits["query"].labels == [0, 1, 2] and splits["gallery"].labels == [0, 0, 1]
    weights = _save_embedder(tmp_path / "w.safetensors", seed=0)
    report = evaluate_retrieval(weights, splits["query"], (1, 3), batch_size=4, workers=0,
                                device=torch.device("cpu"), progress=False, gallery=splits["gallery"],
                                rerank=Rerank("aqe"))
    assert report.n_queries == 2 and report.n_without_positive == 1  # id_05 has no gallery image
    assert report.recall[3] == 1.0  # the whole gallery holds both queries' classes


@pytest.mark.parametrize("parts, count_line, message", [
    (PARTS[:3] + [("id_01", "query")], None, "item id_01 is also in the train part"),
    (PARTS[:3] + [("id_03", "probe")], None, "evaluation_status must be one of"),
    (PARTS, "12", "announces 12 images but lists 9"),
    (PARTS, "many", "must start with the number of images"),
])
def test_bad_inshop_lists_are_explained(tmp_path, parts, count_line, message):
    from finegrain.data import load_splits

    with pytest.raises(FinegrainError, match=message):
        load_splits("inshop", _inshop(tmp_path, parts, count_line))


def _csv(root: Path, rows: list[str]) -> Path:
    for number, photo in enumerate(_photos(len(rows))):
        shutil.copy(photo, root / f"{number}.jpg")
    (root / "dataset.csv").write_text("path,label,split,is_query,is_gallery\n" + "\n".join(
        f"{number}.jpg,{row}" for number, row in enumerate(rows)) + "\n")
    return root


def test_csv_layout_gives_query_and_gallery_or_leave_one_out(tmp_path):
    from finegrain.data import load_splits

    (tmp_path / "qg").mkdir()
    (tmp_path / "loo").mkdir()
    separate = load_splits("csv", _csv(tmp_path / "qg", ["a,train,0,0", "b,test,1,0", "b,test,0,1", "c,test,0,1"]))
    loo = load_splits("csv", _csv(tmp_path / "loo", ["a,train,,", "b,test,true,true", "b,test,1,1"]))

    assert sorted(separate) == ["gallery", "query", "test", "train"]
    assert separate["query"].classes == ["b", "c"] and separate["gallery"].labels == [0, 1]
    assert sorted(loo) == ["test", "train"] and len(loo["test"]) == 2


@pytest.mark.parametrize("rows, message", [
    (["a,train,0,0", "b,test,1,1", "b,test,1,0"], "both query and gallery, the others only one"),
    (["a,train,0,0", "b,test,0,0"], "must be a query, in the gallery, or both"),
    (["a,train,0,0", "b,test,maybe,1"], "is_query must be 1 or 0"),
    (["a,train,0,0", "a,test,1,1"], "label 'a' is in both train and test"),
    (["a,validation,0,0"], "split must be train or test"),
    (["a,train,0"], "expected 5 fields"),
])
def test_bad_csv_rows_are_explained(tmp_path, rows, message):
    from finegrain.data import load_splits

    with pytest.raises(FinegrainError, match=message):
        load_splits("csv", _csv(tmp_path, rows))


def test_csv_paths_may_not_leave_the_data_folder(tmp_path):
    from finegrain.data import load_splits

    (tmp_path / "dataset.csv").write_text("path,label,split,is_query,is_gallery\n../x.jpg,a,train,0,0\n")
    with pytest.raises(FinegrainError, match="could read files outside the data set"):
        load_splits("csv", tmp_path)


# ------------------------------------------------------- the release's protocol, from the CLI
def _retrieval_cli():
    import typer

    from finegrain.cli.retrieval import retrieval

    app = typer.Typer()
    app.command()(retrieval)
    return app


def test_eval_only_counts_singleton_queries_as_misses_on_request(tmp_path):
    """`--singletons miss` scores the same neighbours and divides by every query: Recall@K's hits
    and the sum of APs stay, the denominator grows by the singleton queries."""
    from fractions import Fraction

    from typer.testing import CliRunner

    from finegrain.data import DEMO_ROOT
    from finegrain.train.retrieval import evaluate_saved_embedder
    from test_index import _save_embedder

    data = tmp_path / "data"  # sorted classes: the first 4 train, the last 4 (look-alikes and a singleton) test
    sizes = {"Lemon": 1, "Orange": 1, "Peach": 1, "Nectarine": 1, "Golden 1": 5, "Golden 2": 5, "Golden 3": 5,
             "Strawberry": 1}
    for number, (name, size) in enumerate(sizes.items()):
        (data / f"{number} {name}").mkdir(parents=True)
        for photo in sorted((DEMO_ROOT / "test" / name).glob("*.jpg"))[:size]:
            shutil.copy(photo, data / f"{number} {name}" / photo.name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: singletons\ndata:\n  kind: folder_zeroshot\n  root: {json.dumps(str(data))}\n"
                      "retrieval:\n  recall_ks: [1, 2, 4]\ntrain:\n  batch_size: 8\n  workers: 0\n")
    weights = _save_embedder(tmp_path / "embedder.safetensors", seed=3, embedding_size=16)
    command = ["--eval-only", "--weights", str(weights), "--recipe", str(recipe)]
    runner = CliRunner()

    printed = {rule: runner.invoke(_retrieval_cli(), [*command, "--singletons", rule]) for rule in ("exclude", "miss")}
    reports = {rule: evaluate_saved_embedder(weights, str(recipe), None, [], singletons=rule)[1]
               for rule in ("exclude", "miss")}

    left_out, release = reports["exclude"], reports["miss"]
    assert (left_out.n_queries, left_out.n_excluded_singletons) == (15, 1)
    assert (release.n_queries, release.n_excluded_singletons) == (16, 0)
    assert left_out.recall[1] < 1 and left_out.map_at_r < 1  # not a set every query solves
    for k in (1, 2, 4):
        hits = Fraction(left_out.recall[k]).limit_denominator(15) * 15
        assert hits.denominator == 1 and release.recall[k] == int(hits) / 16
    assert release.map_at_r == pytest.approx(left_out.map_at_r * 15 / 16, rel=1e-12)
    for rule, result in printed.items():
        assert result.exit_code == 0, result.output
        for key, label in (("recall@1", "Recall@1"), ("recall@4", "Recall@4"), ("map@r", "MAP@R")):
            line = next(line for line in result.stdout.splitlines() if label in line)
            assert f"{100 * reports[rule].to_metrics()[key]:.2f}" in line
    words = {rule: " ".join(result.stdout.split()) for rule, result in printed.items()}  # rich wraps lines
    assert "15 queries" in words["exclude"] and "1 with nothing of their class to find left out" in words["exclude"]
    assert "16 queries" in words["miss"] and "1 with nothing of their class to find counted as misses" in words["miss"]

    bad = runner.invoke(_retrieval_cli(), [*command, "--singletons", "drop"])
    assert isinstance(bad.exception, FinegrainError) and "must be exclude or miss, got 'drop'" in str(bad.exception)
    training = runner.invoke(_retrieval_cli(), ["--recipe", str(recipe), "--singletons", "miss"])
    assert isinstance(training.exception, FinegrainError) and "Add --eval-only" in str(training.exception)


def test_query_gallery_checkpoint_counts_a_query_without_gallery_match_as_a_miss(tmp_path):
    from finegrain.data import load_splits
    from finegrain.eval.retrieval_eval import evaluate_retrieval
    from test_index import _save_embedder

    splits = load_splits("inshop", _inshop(tmp_path / "inshop", PARTS))
    weights = _save_embedder(tmp_path / "w.safetensors", seed=0)
    options = dict(batch_size=4, workers=0, device=torch.device("cpu"), progress=False, gallery=splits["gallery"])
    left_out, release = (evaluate_retrieval(weights, splits["query"], (1, 3), singletons=rule, **options)
                         for rule in ("exclude", "miss"))
    assert (left_out.n_queries, left_out.n_excluded_singletons, left_out.recall[3]) == (2, 1, 1.0)
    assert (release.n_queries, release.n_excluded_singletons, release.recall[3]) == (3, 0, 2 / 3)  # id_05: a miss
    assert release.recall[1] == round(left_out.recall[1] * 2) / 3
