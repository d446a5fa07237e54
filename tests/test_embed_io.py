"""Embeddings in and out: `finegrain embed` output indexes to the same index as the images do;
any .npy with an ids file indexes and is searched by vector; hostile .npy / CSV / folders are refused.

Model: the random assemble_resnet50 embedder of tests/test_index.py (base width 8, 64-d, 32 px).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.errors import FinegrainError
from finegrain.eval.rerank import Rerank, ranker
from finegrain.index.build import build_index
from finegrain.index.embeddings import build_index_from_embeddings, embed_images
from finegrain.index.search import search_by_vector, search_index
from finegrain.index.store import IndexFolder
from test_index import _copy_subset, _save_embedder

runner = CliRunner()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embed")
    images = _copy_subset("train", 6, root / "images")
    queries = _copy_subset("test", 2, root / "queries")
    return {"root": root, "images": images, "queries": queries, "weights": _save_embedder(root / "w.safetensors", 0)}


def test_index_from_embed_output_equals_the_index_from_the_images(photos, tmp_path):
    from_images = tmp_path / "from-images"
    build_index(photos["images"], from_images, weights=photos["weights"], shard_size=20, progress=False)  # same batches
    embedded = tmp_path / "embedded"
    result = runner.invoke(app, ["embed", "--weights", str(photos["weights"]), "--images", str(photos["images"]),
                                 "--out", str(embedded), "--shard-size", "20"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((embedded / "embeddings.json").read_text())
    assert len(manifest["shards"]) == 3 and manifest["count"] == 48  # 8 classes x 6 photos, 20 per shard
    assert np.load(embedded / "embeddings-000002.npy", allow_pickle=False).shape == (8, 64)
    assert (embedded / "items.csv").read_text().splitlines()[0] == "id,path,label,bytes,sha256"

    from_embeddings = tmp_path / "from-embeddings"
    result = runner.invoke(app, ["index", "build", "--embeddings", str(embedded), "--out", str(from_embeddings)])
    assert result.exit_code == 0, result.output

    with IndexFolder(from_images) as first, IndexFolder(from_embeddings) as second:
        assert np.array_equal(np.asarray(first.embeddings), np.asarray(second.embeddings))
        assert first.all_items() == second.all_items()
        assert first.manifest["model"] == second.manifest["model"]
        assert first.manifest["index"]["key"] == second.manifest["index"]["key"]
    by_images = search_index(from_images, [photos["queries"]], k=5)
    by_embeddings = search_index(from_embeddings, [photos["queries"]], k=5)
    assert by_images.to_dict()["results"] == by_embeddings.to_dict()["results"]
    assert len(by_images.results) == 16

    result = runner.invoke(app, ["index", "search", "--index", str(from_embeddings), str(photos["queries"]), "--k", "5",
                                 "--rerank", "dba", "--json"])
    assert result.exit_code == 0, result.output
    reranked = search_index(from_embeddings, [photos["queries"]], k=5, rerank=Rerank("dba"))
    assert json.loads(result.output)["results"] == reranked.to_dict()["results"] != by_embeddings.to_dict()["results"]


def test_an_interrupted_embed_resumes_from_its_finished_shards(photos, tmp_path):
    out = tmp_path / "embedded"

    def stop_after_first(number: int, reused: bool) -> None:
        if number == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_images(photos["images"], out, weights=photos["weights"], shard_size=16, progress=False,
                     on_shard=stop_after_first)
    assert not out.exists()  # nothing half-written

    report = embed_images(photos["images"], out, weights=photos["weights"], shard_size=16, progress=False)

    assert report.shards_reused == 2 and report.manifest["count"] == 48
    assert not (tmp_path / ".embedded.embedding-work").exists()


def test_any_npy_with_an_ids_file_is_indexed_and_searched_by_vector(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 5)
    vectors = rng.standard_normal((10, 32))[labels] + 0.3 * rng.standard_normal((50, 32))
    np.save(tmp_path / "vectors.npy", vectors)  # float64, not normalised: both are fine
    lines = ["id,label,extra"] + [f"sku-{i},class {label},x" for i, label in enumerate(labels)]
    (tmp_path / "ids.csv").write_text("\n".join(lines) + "\n")

    build_index_from_embeddings(tmp_path / "vectors.npy", tmp_path / "index", metadata=tmp_path / "ids.csv",
                                progress=False)
    report = search_by_vector(tmp_path / "index", vectors[:3] * 7.0, k=5)

    for query, result in enumerate(report.results):
        assert result.neighbours[0].path == f"sku-{query}" and result.neighbours[0].similarity == pytest.approx(1.0)
        assert {n.label for n in result.neighbours} == {f"class {labels[query]}"}
    with pytest.raises(FinegrainError, match="Search it by vector"):
        search_index(tmp_path / "index", [tmp_path / "vectors.npy"])

    reranked = search_by_vector(tmp_path / "index", vectors[:3], k=5, rerank=Rerank("aqe"))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    expected = ranker(unit(vectors), queries=unit(vectors[:3]), rerank=Rerank("aqe")).neighbours(np.arange(3), 5)
    assert [[n.id for n in result.neighbours] for result in reranked.results] == expected.tolist()


def _save_raw(path: Path, header: dict, payload: bytes) -> Path:
    text = repr(header).encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "expected a C-order"),
    (lambda p: _save_raw(p, {"descr": "<f4", "fortran_order": False, "shape": (1000, 8)}, b"\0" * 64),
     "do not add up"),
    (lambda p: _save_raw(p, {"descr": "<f4", "fortran_order": True, "shape": (2, 2)}, b"\0" * 16), "Fortran"),
    (lambda p: np.save(p, np.array([[1.0, 2.0], [np.nan, 0.0]])), "row 1 holds NaN"),
    (lambda p: np.save(p, np.zeros((2, 3), np.float32)), "row 0 holds NaN, inf or only zeros"),
    (lambda p: p.write_bytes(pickle.dumps([1, 2, 3])), "not a readable .npy"),
])
def test_hostile_npy_files_are_refused_before_they_are_used(tmp_path, make, message):
    path = tmp_path / "vectors.npy"
    make(path)
    with pytest.raises(FinegrainError, match=message):
        build_index_from_embeddings(path, tmp_path / "index", progress=False)
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("text, message", [
    ("name,label\na,1\nb,2\n", "must name the columns, with id"),
    ("id,label\na,1\n", "lists 1 rows for 2 embeddings"),
    ("id,label\na,1\na,2\n", "id 'a' is listed twice"),
    ("id,label\na,1,3\nb,2\n", "3 fields, the header has 2"),
    ("id\n\"a\nb\n", "not valid CSV|fields"),
])
def test_bad_ids_files_are_explained(tmp_path, text, message):
    np.save(tmp_path / "vectors.npy", np.eye(2, dtype=np.float32))
    (tmp_path / "ids.csv").write_text(text)
    with pytest.raises(FinegrainError, match=message):
        build_index_from_embeddings(tmp_path / "vectors.npy", tmp_path / "index", metadata=tmp_path / "ids.csv",
                                    progress=False)


def test_a_changed_embed_folder_is_refused(photos, tmp_path):
    out = tmp_path / "embedded"
    embed_images(photos["images"], out, weights=photos["weights"], progress=False)
    shard = out / "embeddings-000000.npy"
    array = np.load(shard)
    array[0, 0] += 0.5
    np.save(shard, array)
    with pytest.raises(FinegrainError, match="fails its size or SHA-256 check"):
        build_index_from_embeddings(out, tmp_path / "index", progress=False)
