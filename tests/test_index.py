"""`finegrain index`: build / add / search / info on the shipped demo images, the safety of the
index folder (checksums, atomic writes, resumable embedding), and index choice and tuning.

Model: a randomly initialised assemble_resnet50 embedder (base width 8, 64-d, 32 px inputs),
saved and reloaded like any user's weights. A random CNN is a fixed random feature map; on
the demo's white-background fruit photos it keeps colour and shape, so classes separate
(measured: ~0.8 of the top-5 neighbours of a test image share its class, chance is 1/8 here)
without any training that the test would have to wait for. Nothing in the index knows the
labels, so a wrong id -> metadata mapping or a broken ranking drops this to chance.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import finegrain
from finegrain.cli.index import app
from finegrain.data import demo_root
from finegrain.errors import FinegrainError
from finegrain.fileio import sha256_file
from finegrain.index.build import add_images, build_index, describe
from finegrain.index.search import search_index, search_vectors
from finegrain.index.select import build_tuned_index, neighbour_recall, parse_memory, plan_index
from finegrain.index.store import IndexFolder, Item, verify_files, write_index_folder
from finegrain.preprocessing import Preprocessing

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 12, 4
runner = CliRunner()


def _copy_subset(split: str, per_class: int, dest: Path) -> Path:
    for folder in sorted((demo_root() / split).iterdir())[:CLASSES]:
        (dest / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.jpg"))[:per_class]:
            shutil.copy(image, dest / folder.name / image.name)
    return dest


def _save_embedder(path: Path, seed: int, embedding_size: int = 64) -> Path:
    torch.manual_seed(seed)
    model = finegrain.create_embedder("assemble_resnet50", base_width=8, embedding_size=embedding_size)
    model.preprocessing = Preprocessing(model.preprocessing.mean, model.preprocessing.std, 32, 32, 32)
    return finegrain.save_model(model, path)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("index")
    train = _copy_subset("train", TRAIN_PER_CLASS, root / "train")
    test = _copy_subset("test", TEST_PER_CLASS, root / "test")
    weights = _save_embedder(root / "embedder.safetensors", seed=0)
    build_index(train, root / "index", weights=weights, progress=False)
    return {"root": root, "train": train, "test": test, "weights": weights, "index": root / "index"}


@pytest.fixture
def index_copy(demo, tmp_path) -> Path:
    return Path(shutil.copytree(demo["index"], tmp_path / "index"))


def test_nearest_neighbour_of_an_indexed_image_is_itself(demo):
    queries = sorted(demo["train"].glob("*/*.jpg"))[::7]
    report = search_index(demo["index"], queries, k=3)
    assert [r.neighbours[0].path for r in report.results] == [str(q.resolve()) for q in queries]
    assert all(r.neighbours[0].similarity == pytest.approx(1.0, abs=1e-4) for r in report.results)
    assert all(r.neighbours[0].label == q.parent.name for r, q in zip(report.results, queries))


def test_a_query_of_a_known_class_returns_mostly_that_class(demo):
    report = search_index(demo["index"], [demo["test"]], k=5)
    assert len(report.results) == CLASSES * TEST_PER_CLASS and not report.failed
    same = [[n.label == Path(r.query).parent.name for n in r.neighbours] for r in report.results]
    assert np.mean(same) > 0.5  # chance: 1/8
    assert np.mean([row[0] for row in same]) > 0.7
    sims = [[n.similarity for n in r.neighbours] for r in report.results]
    assert all(row == sorted(row, reverse=True) for row in sims)


def test_info_json_reports_size_type_memory_model_and_recall(demo):
    result = runner.invoke(app, ["info", "--index", str(demo["index"]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["size"] == CLASSES * TRAIN_PER_CLASS and info["dim"] == 64
    assert info["index_type"] == "Flat" and info["recall"] == 1.0 and info["fallback"] is None
    assert info["memory_bytes"] == (demo["index"] / "index.faiss").stat().st_size
    assert info["model"]["arch"] == "assemble_resnet50"
    assert info["model"]["weights_sha256"] == sha256_file(demo["weights"])
    assert info["model"]["preprocessing"]["crop"] == 32
    expected = {"key", "parameters", "recall_target", "recall_k", "latency_ms", "max_memory", "chosen_by"}
    assert expected <= set(info["index"])


def test_search_cli_prints_json_and_draws_a_grid(demo, tmp_path):
    query = sorted(demo["test"].glob("*/*.jpg"))[0]
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["search", "--index", str(demo["index"]), str(query), "--k", "3", "--json",
                                 "--grid", str(grid)])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["results"][0]["neighbours"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and all({"path", "label", "similarity"} <= set(h) for h in hits)
    from PIL import Image

    with Image.open(grid) as image:
        assert image.width > 4 * 112 and image.height > 112  # one row: query + 3 thumbnails


def test_add_skips_images_already_indexed_by_checksum(demo, index_copy, tmp_path):
    before = describe(index_copy)["size"]
    report = add_images(index_copy, demo["test"], progress=False)
    assert report.added == CLASSES * TEST_PER_CLASS and not report.duplicates
    assert describe(index_copy)["size"] == before + report.added
    renamed = tmp_path / "more" / "Renamed"
    renamed.mkdir(parents=True)
    for image in sorted(demo["test"].glob("*/*.jpg"))[:3]:
        shutil.copy(image, renamed / f"copy-{image.name}")
    again = add_images(index_copy, renamed.parent, progress=False)
    assert again.added == 0 and len(again.duplicates) == 3
    query = sorted(demo["test"].glob("*/*.jpg"))[5]
    assert search_index(index_copy, [query], k=1).results[0].neighbours[0].path == str(query.resolve())


def test_undecodable_images_are_listed_and_counted_not_dropped(demo, tmp_path):
    images = tmp_path / "images" / "Mixed"
    images.mkdir(parents=True)
    good = sorted(demo["train"].glob("*/*.jpg"))[:3]
    for image in good:
        shutil.copy(image, images / image.name)
    (images / "empty.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes(good[0].read_bytes()[:200] + b"garbage")
    report = build_index(images.parent, tmp_path / "index", weights=demo["weights"], progress=False)
    assert report.added == 3
    assert sorted(Path(path).name for path, _ in report.failed) == ["empty.jpg", "truncated.jpg"]
    assert describe(tmp_path / "index")["failed"] == 2
    assert all(reason for _, reason in json.loads((tmp_path / "index" / "failed.json").read_text()))


def test_a_killed_build_leaves_no_index_and_the_rerun_reuses_its_shards(demo, tmp_path):
    images = tmp_path / "images"
    for folder in sorted(demo["train"].iterdir())[:4]:
        shutil.copytree(folder, images / folder.name, ignore=lambda _, names: sorted(names)[6:])
    out, work = tmp_path / "index", tmp_path / ".index.embedding-work"
    command = [sys.executable, "-m", "finegrain.cli.index", "build", "--weights", str(demo["weights"]),
               "--images", str(images), "--out", str(out), "--shard-size", "4"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline and len(list(work.glob("shard-*"))) < 2:
        time.sleep(0.01)
    assert process.poll() is None, "the build finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    finished = {p.name for p in work.glob("shard-*")}
    assert len(finished) >= 2
    events: list[tuple[int, bool]] = []
    report = build_index(images, out, weights=demo["weights"], shard_size=4, progress=False,
                         on_shard=lambda number, reused: events.append((number, reused)))
    assert report.shards_reused == len(finished) == sum(reused for _, reused in events)
    assert len(events) == 4 * 6 // 4 and report.added == 24 and not work.exists()
    with IndexFolder(out) as resumed, IndexFolder(demo["index"]) as reference:
        rows = {item.sha256: item.id for item in reference.all_items()}
        expected = reference.embeddings[[rows[item.sha256] for item in resumed.all_items()]]
        assert np.allclose(resumed.embeddings, expected, atol=1e-4)  # reused + new shards = a fresh embedding


def test_an_interrupted_add_leaves_the_previous_index_intact(demo, index_copy):
    manifest = (index_copy / "manifest.json").read_text()

    def interrupt(number: int, reused: bool) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        add_images(index_copy, demo["test"], shard_size=8, progress=False, on_shard=interrupt)
    assert (index_copy / "manifest.json").read_text() == manifest
    verify_files(index_copy)
    assert sorted(p.name for p in index_copy.iterdir()) == ["embeddings.npy", "failed.json", "index.faiss",
                                                             "items.sqlite", "manifest.json", "manifest.sha256"]


def test_a_corrupted_index_file_is_refused_before_faiss_reads_it(index_copy):
    target = index_copy / "index.faiss"
    original = target.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(FinegrainError, match="index.faiss fails its SHA-256 check"):
        IndexFolder(index_copy)
    result = runner.invoke(app, ["info", "--index", str(index_copy)])
    assert isinstance(result.exception, FinegrainError) and "SHA-256" in str(result.exception)
    target.write_bytes(original)
    verify_files(index_copy)
    embeddings = index_copy / "embeddings.npy"
    embeddings.write_bytes(embeddings.read_bytes()[:-64])
    with pytest.raises(FinegrainError, match="embeddings.npy has .* bytes, the manifest says"):
        verify_files(index_copy)


def test_files_that_do_not_belong_together_are_refused(demo, index_copy, tmp_path):
    other_weights = _save_embedder(tmp_path / "narrow.safetensors", seed=1, embedding_size=32)
    images = tmp_path / "few" / "A"
    images.mkdir(parents=True)
    for image in sorted(demo["train"].glob("*/*.jpg"))[:4]:
        shutil.copy(image, images / image.name)
    build_index(images.parent, tmp_path / "narrow", weights=other_weights, progress=False)
    shutil.copy(tmp_path / "narrow" / "index.faiss", index_copy / "index.faiss")
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["files"]["index.faiss"] = {"sha256": sha256_file(index_copy / "index.faiss"),
                                        "bytes": (index_copy / "index.faiss").stat().st_size}
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FinegrainError, match="manifest.json: it fails its SHA-256 check"):
        IndexFolder(index_copy)
    (index_copy / "manifest.sha256").write_text(f"{sha256_file(index_copy / 'manifest.json')}  manifest.json\n")
    with pytest.raises(FinegrainError, match="index.faiss.bytes is .*, but an exact index of 96 x 64 vectors"):
        IndexFolder(index_copy)
    with pytest.raises(FinegrainError, match="not the ones this index was built with"):
        search_index(demo["index"], [images], weights=other_weights)


def test_plan_follows_size_and_memory_budget():
    assert plan_index(10_000, 256, 4 << 30).key == "Flat"
    assert plan_index(1_000_000, 256, 4 << 30).key == "IVF4096,Flat"
    assert plan_index(1_000_000, 256, 512 << 20).key == "IVF4096,SQ8"
    assert plan_index(1_000_000, 256, 64 << 20).key == "OPQ32_128,IVF4096,PQ32"
    with pytest.raises(FinegrainError, match="Raise --max-memory"):
        plan_index(1_000_000, 256, 1 << 20)


def test_bad_memory_sizes_and_index_keys_are_explained():
    assert parse_memory("4G") == 4 << 30 and parse_memory("1.5g") == 3 << 29 and parse_memory("512MiB") == 512 << 20
    with pytest.raises(FinegrainError, match="Write it like 512M"):
        parse_memory("lots")
    for empty_or_huge in ("0", "0.1", "9" * 400 + "T"):
        with pytest.raises(FinegrainError, match="is not between 1 byte and 1 EiB"):
            parse_memory(empty_or_huge)
    vectors = np.eye(64, 16, dtype=np.float32).repeat(4, axis=0)
    with pytest.raises(FinegrainError, match="cannot build 'IVFx,Flat'"):
        build_tuned_index(vectors, index_key="IVFx,Flat", progress=False)


def _clustered(count: int, dim: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((count // 20, 8), dtype=np.float32)
    centres = latent @ rng.standard_normal((8, dim), dtype=np.float32)
    points = centres[rng.integers(0, len(centres), count)]
    scale = noise * np.linalg.norm(centres, axis=1).mean() / np.sqrt(dim)
    points += scale * rng.standard_normal(points.shape, dtype=np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tuned_ivf() -> tuple[faiss.Index, object, np.ndarray, np.ndarray]:
    data = _clustered(20_000 + 200, 32, noise=0.3, seed=0)
    base, queries = data[:20_000], data[20_000:]
    index, report = build_tuned_index(base, index_key="IVF128,Flat", recall_target=0.9, progress=False)
    return index, report, base, queries


def test_tuning_reaches_the_recall_target_on_new_queries(tuned_ivf):
    index, report, base, queries = tuned_ivf
    assert report.key == "IVF128,Flat" and report.fallback is None and report.recall >= 0.9
    assert report.parameters.startswith("nprobe=") and int(report.parameters[7:]) < 128
    _, truth = faiss.knn(queries, base, 10, faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(queries, 10)
    assert neighbour_recall(found, truth, 10) >= 0.85  # measured on queries the tuning never saw
    assert index.ntotal == len(base)
    _, self_hits = index.search(base[:50], 1)
    assert (self_hits[:, 0] == np.arange(50)).all()  # held-out rows kept their ids


def test_an_approximate_index_reloads_memory_mapped_with_its_tuned_parameters(demo, tuned_ivf, tmp_path):
    index, report, base, queries = tuned_ivf
    items = [Item(i, f"/images/{i}.jpg", None, 1, f"{i:064x}") for i in range(len(base))]
    with IndexFolder(demo["index"]) as built:  # a model and build record as `index build` writes them
        records = {"model": built.manifest["model"], "build": built.manifest["build"]}
    manifest = {**records, "index": {**report.to_dict(), "chosen_by": "user", "max_memory": 1 << 30}}
    write_index_folder(tmp_path / "ivf", index=index, embeddings=base, items=items, failed=[], manifest=manifest)
    with IndexFolder(tmp_path / "ivf") as folder:
        assert faiss.extract_index_ivf(folder.index).nprobe == int(report.parameters.split("=")[1])
        ids, similarity = search_vectors(folder, queries[:20], 5)
        assert np.allclose(similarity, np.einsum("qkd,qd->qk", base[ids], queries[:20]), atol=1e-5)
        assert (np.diff(similarity, axis=1) <= 1e-6).all()
        assert [item.path for item in folder.items(ids[0])] == [f"/images/{i}.jpg" for i in ids[0]]


def test_when_no_setting_beats_exact_search_at_the_target_it_falls_back_to_exact():
    data = np.random.default_rng(1).standard_normal((20_000, 64)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    index, report = build_tuned_index(data, index_key="IVF256,Flat", recall_target=0.99, progress=False)
    assert report.key == "Flat" and report.requested_key == "IVF256,Flat" and report.recall == 1.0
    assert "using exact search instead" in report.fallback
    assert all(p.recall < 0.99 or p.latency_ms >= report.exact_latency_ms for p in report.points)
    assert min(p.recall for p in report.points) < 0.99  # the approximate index alone would have fallen short
    assert isinstance(index, faiss.IndexFlatIP) and index.ntotal == len(data)


def test_neighbour_recall_counts_shared_ids_and_never_missing_results():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 9, 1], [-1, -1, 4]])
    assert neighbour_recall(found, exact, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_a_search_where_no_query_image_can_be_read_fails_naming_them(demo, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(FinegrainError, match="None of the 2 query images could be read: .*empty.jpg.*text.png"):
        search_index(demo["index"], [tmp_path / "empty.jpg", tmp_path / "text.png"], k=3)
    result = runner.invoke(app, ["search", "--index", str(demo["index"]), str(tmp_path / "empty.jpg")])
    assert result.exit_code != 0 and isinstance(result.exception, FinegrainError)


def _caption_hues(path: Path) -> set[str]:
    """'green' / 'red' where caption text of that hue is drawn under the first row of thumbnails."""
    from PIL import Image

    pad, thumb, caption = 6, 112, 28  # draw_grid's layout
    with Image.open(path) as image:
        strip = np.asarray(image.convert("RGB"))[pad + thumb + 3:pad + thumb + caption].reshape(-1, 3).astype(int)
    red, green, blue = strip.T
    return {hue for hue, mask in (("red", (red > green + 80) & (red > blue + 80)),
                                  ("green", (green > red + 60) & (green > blue + 60))) if mask.any()}


def test_a_query_outside_a_class_folder_has_no_label_and_a_neutral_grid(demo, tmp_path):
    from finegrain.index.search import draw_grid

    image = sorted((demo["test"] / sorted(p.name for p in demo["test"].iterdir())[0]).glob("*.jpg"))[0]
    downloads = tmp_path / "Downloads"
    downloads.mkdir()
    query = Path(shutil.copy(image, downloads / "photo.jpg"))
    report = search_index(demo["index"], [query], k=4)
    assert report.results[0].label is None and json.loads(report.to_json())["results"][0]["label"] is None
    draw_grid(report, tmp_path / "neutral.png")
    assert _caption_hues(tmp_path / "neutral.png") == set()
    labelled = search_index(demo["index"], [query], k=4, label=image.parent.name)
    assert labelled.results[0].label == image.parent.name
    draw_grid(labelled, tmp_path / "labelled.png")
    expected = {"green" if n.label == image.parent.name else "red" for n in labelled.results[0].neighbours}
    assert _caption_hues(tmp_path / "labelled.png") == expected


def test_a_query_label_is_its_class_folder_when_the_index_knows_that_class(demo, tmp_path):
    indexed = sorted(demo["train"].glob("*/*.jpg"))[3]
    of_a_known_class = sorted(demo["test"].glob("*/*.jpg"))[9]
    unknown = tmp_path / "Holiday" / "beach.jpg"
    unknown.parent.mkdir()
    shutil.copy(of_a_known_class, unknown)
    report = search_index(demo["index"], [indexed, of_a_known_class, unknown], k=2)
    assert [r.label for r in report.results] == [indexed.parent.name, of_a_known_class.parent.name, None]
    result = runner.invoke(app, ["search", "--index", str(demo["index"]), str(unknown), "--k", "2", "--json",
                                 "--label", "Holiday"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["results"][0]["label"] == "Holiday"
