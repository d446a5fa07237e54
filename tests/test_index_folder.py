"""An index folder from a stranger: every file checked before use, every failure one FinegrainError.

The folders are real: written by `write_index_folder` from random vectors with real faiss
indexes (exact, IVF, HNSW), then damaged the way issue 13 found (a manifest edited and re-hashed,
an object-dtype .npy, an empty items table, a failed.json that is not JSON, a 98-byte crafted
index.faiss) and re-hashed, so that the checks after the checksums are the ones tested.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import pytest

import finegrain.fileio as fileio
from finegrain.errors import FinegrainError
from finegrain.fileio import atomic_path, old_sibling, recover_swap
from finegrain.index.search import search_vectors
from finegrain.index.select import build_tuned_index
from finegrain.index.store import IndexFolder, Item, verify_files, write_index_folder

COUNT, DIM = 200, 16


def _vectors(seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((COUNT, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _write(out: Path, key: str = "Flat", seed: int = 0) -> Path:
    """A valid folder: the project's exact index, or a faiss IVF / HNSW one as a user key makes."""
    vectors = _vectors(seed)
    index, report = build_tuned_index(vectors, index_key="Flat", progress=False)
    section = {**report.to_dict(), "chosen_by": "user", "max_memory": 1 << 30}
    if key != "Flat":
        index = faiss.index_factory(DIM, key, faiss.METRIC_INNER_PRODUCT)
        if key.startswith("HNSW"):
            index = faiss.IndexIDMap(index)
        index.train(vectors)
        index.add_with_ids(vectors, np.arange(COUNT, dtype=np.int64))
        section.update(key=key, requested_key=key, parameters="nprobe=4" if key.startswith("IVF") else "efSearch=32")
    items = [Item(i, f"/photos/c{i % 3}/{i}.jpg", f"c{i % 3}", 1000 + i, hashlib.sha256(bytes([i % 256, i // 256])
                                                                                          ).hexdigest())
             for i in range(COUNT)]
    model = {"arch": "assemble_resnet50", "weights": "/w.safetensors", "weights_sha256": "ab" * 32,
             "embedding": "forward_embedding", "preprocessing": {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0],
                                                                 "train_size": 32, "resize": 36, "crop": 32}}
    build = {"created": "2025-01-01T00:00:00+00:00", "updated": "2025-01-01T00:00:00+00:00",
             "finegrain_version": "0.1.0", "sources": ["/photos"], "failed": 0, "duplicates": 0, "seconds": 1.0}
    write_index_folder(out, index=index, embeddings=vectors, items=items, failed=[],
                       manifest={"model": model, "index": section, "build": build})
    return out


def _rehash(folder: Path, edit: Callable[[dict], None] | None = None) -> None:
    """Re-hash the files into the manifest (after `edit`) and the manifest into manifest.sha256."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if edit:
        edit(manifest)
    text = json.dumps(manifest, indent=2).encode()
    (folder / "manifest.json").write_bytes(text)
    (folder / "manifest.sha256").write_text(f"{hashlib.sha256(text).hexdigest()}  manifest.json\n")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    return {key: _write(root / key.split(",")[0], key) for key in ("Flat", "IVF8,Flat", "HNSW8")}


@pytest.fixture
def flat(folders, tmp_path) -> Path:
    return Path(shutil.copytree(folders["Flat"], tmp_path / "flat"))


def _refused(folder: Path, pattern: str) -> None:
    with pytest.raises(FinegrainError, match=pattern) as caught:
        with IndexFolder(folder, gpu=False) as loaded:
            search_vectors(loaded, _vectors(1)[:4], 5)
    assert "finegrain index build" in str(caught.value)  # the fix is named


def test_valid_folders_of_each_index_type_load_and_search(folders):
    for key, folder in folders.items():
        with IndexFolder(folder, gpu=False) as loaded:
            ids, _ = search_vectors(loaded, _vectors()[:10], 1)
            assert (ids[:, 0] == np.arange(10)).all(), key


def test_a_manifest_changed_without_its_checksum_is_refused(flat):
    manifest = flat / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"Flat"', '"HNSW8"', 1))
    _refused(flat, "manifest.json: it fails its SHA-256 check against manifest.sha256")
    (flat / "manifest.sha256").unlink()
    _refused(flat, "manifest.sha256: it is missing")


@pytest.mark.parametrize("key, parameters, pattern", [
    ("Flat", "nprobe=0", "sets nprobe, but a 'Flat' index takes no search parameters"),
    ("Flat", "nprobe=1", "takes no search parameters"),
    ("IVF8,Flat", "nprobe=0", r"nprobe=0 is out of range: it must be in \[1, 8\]"),
    ("IVF8,Flat", "nprobe=9", r"nprobe=9 is out of range"),
    ("IVF8,Flat", "", "does not set nprobe"),
    ("IVF8,Flat", "nprobe=2,efSearch=16", "sets efSearch, but a 'IVF8,Flat' index takes only nprobe"),
    ("HNSW8", "efSearch=0", "efSearch=0 is out of range"),
    ("HNSW8", "efSearch=999999", "efSearch=999999 is out of range"),
    ("HNSW8", "efSearch=1000000", "not a list of distinct name=value"),
    ("HNSW8", "efSearch=4,efSearch=8", "not a list of distinct name=value"),
    ("HNSW8", "bogus", "not a list of distinct name=value"),
])
def test_search_parameters_are_checked_against_the_index_type(folders, tmp_path, key, parameters, pattern):
    folder = Path(shutil.copytree(folders[key], tmp_path / "copy"))
    _rehash(folder, lambda manifest: manifest["index"].update(parameters=parameters))
    _refused(folder, pattern)


def test_a_key_that_does_not_name_the_index_in_the_file_is_refused(folders, tmp_path):
    folder = Path(shutil.copytree(folders["IVF8,Flat"], tmp_path / "copy"))
    _rehash(folder, lambda manifest: manifest["index"].update(key="HNSW8", parameters="efSearch=16"))
    _refused(folder, "it is a IVF index, the manifest says 'HNSW8'")
    _rehash(folder, lambda manifest: manifest["index"].update(key="IVF64,Flat", parameters="nprobe=32"))
    _refused(folder, "nprobe=32 exceeds the index's 8 lists")


@pytest.mark.parametrize("field, value, pattern", [
    ("count", -1, r"count is -1, expected a whole number in \[1, "),
    ("count", True, "count is True"),
    ("dim", 10**9, "dim is 1000000000"),
    ("count", COUNT + 1, "but an exact index of 201 x 16 vectors has"),
    ("count", COUNT + 10_000, "cannot hold 10200 x 16 float32 values"),
    ("metric", "l2", "metric is 'l2'"),
    ("format_version", 1, "format version 1, this finegrain reads 2"),
    ("files", {}, "files lists"),
    ("model", [], "model is not an object"),
])
def test_manifest_fields_are_typed_bounded_and_consistent(flat, field, value, pattern):
    _rehash(flat, lambda manifest: manifest.update({field: value}))
    _refused(flat, pattern)


@pytest.mark.parametrize("section, field, value, pattern", [
    ("index", "recall_k", 0, "index.recall_k is 0"),
    ("index", "recall", float("nan"), "index.recall is nan"),
    ("index", "max_memory", "4G", "index.max_memory is '4G'"),
    ("model", "weights_sha256", "xyz", "model.weights_sha256 is 'xyz', expected a well-formed string"),
    ("model", "embedding", "logits", "model.embedding is 'logits'"),
    ("build", "sources", "/photos", "build.sources is '/photos'"),
    ("build", "failed", -3, "build.failed is -3"),
])
def test_nested_manifest_fields_are_checked(flat, section, field, value, pattern):
    _rehash(flat, lambda manifest: manifest[section].update({field: value}))
    _refused(flat, pattern)


def test_a_zero_preprocessing_std_is_refused(flat):
    _rehash(flat, lambda manifest: manifest["model"]["preprocessing"].update(std=[1.0, 0.0, 1.0]))
    _refused(flat, r"model.preprocessing.std is 0.0, expected a number in \(0.0")


def test_embeddings_of_object_dtype_wrong_shape_or_nan_are_refused(flat):
    target = flat / "embeddings.npy"
    vectors = np.load(target)
    with open(target, "wb") as handle:  # an object array's header, over bytes of the expected size
        np.lib.format.write_array_header_1_0(handle, {"descr": "|O", "fortran_order": False, "shape": (COUNT, DIM)})
        handle.write(bytes(4 * COUNT * DIM))
    _rehash(flat)
    _refused(flat, r"embeddings.npy: it holds object \(200, 16\)")
    np.save(target, vectors.astype(np.float64))
    _rehash(flat)
    _refused(flat, r"embeddings.npy: it holds float64 \(200, 16\)")
    vectors[7, 3] = np.nan
    np.save(target, vectors)
    _rehash(flat)
    _refused(flat, "embeddings.npy: it holds NaN")
    size = len(target.read_bytes())
    target.write_bytes(b"\x93NUMPY\x01\x00" + b"x" * (size - 8))
    _rehash(flat)
    _refused(flat, "embeddings.npy: it is not a readable .npy file")
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1d+6e9"  # unbalanced: a tokenizer error
    target.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + header.ljust(117) + b"\n" + bytes(size - 128))
    _rehash(flat)
    _refused(flat, "embeddings.npy: it is not a readable .npy file \\(TokenError")


def test_items_that_are_empty_not_sqlite_or_of_another_schema_are_refused(flat, tmp_path):
    target = flat / "items.sqlite"
    original = target.read_bytes()
    with sqlite3.connect(target) as db:
        db.execute("DELETE FROM items")
    db.close()
    _rehash(flat)
    _refused(flat, r"items.sqlite: it lists 0 items \(ids None..None\), the manifest says 200")
    target.write_bytes(original)
    with sqlite3.connect(target) as db:
        db.execute("UPDATE items SET path = x'0102' WHERE id = 3")
    db.close()
    _rehash(flat)
    _refused(flat, "items.sqlite: 1 rows have a path, label, size or SHA-256 of the wrong type")
    target.write_bytes(original)
    with sqlite3.connect(target) as db:
        db.execute("UPDATE items SET path = CAST(x'8a8a' AS TEXT) WHERE id = 5")  # text that is not UTF-8
    db.close()
    _rehash(flat)
    with pytest.raises(FinegrainError, match="(?i)items.sqlite: SQLite cannot read it .*utf-8"):
        with IndexFolder(flat, gpu=False) as loaded:
            loaded.all_items()
    target.write_bytes(original)
    with sqlite3.connect(target) as db:
        db.execute("CREATE VIEW extra AS SELECT * FROM items")
    db.close()
    _rehash(flat)
    _refused(flat, "items.sqlite: its tables are not the items table finegrain writes")
    target.write_bytes(original)
    with sqlite3.connect(target) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    data = bytearray(original)
    leaf = next(start for start in range(page_size, len(data), page_size) if data[start] == 0x0D)  # table leaf
    first, second = leaf + 8, leaf + 10  # its first two cell pointers, swapped: rowids out of order
    data[first:first + 2], data[second:second + 2] = data[second:second + 2], data[first:first + 2]
    target.write_bytes(bytes(data))
    _rehash(flat)
    _refused(flat, "items.sqlite: it fails SQLite's integrity check .*out of order")
    target.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    _rehash(flat)
    _refused(flat, "items.sqlite: (SQLite cannot read it|its tables are not)")
    target.write_bytes(b"")
    _rehash(flat)
    _refused(flat, "items.sqlite: it is not an SQLite database")


@pytest.mark.parametrize("content", [b"not json", b"{\"a\": 1}", b"[[\"a\", 1]]", b"\xff\xfe", b"[" * 100_000])
def test_a_failed_list_that_is_not_json_of_path_reason_pairs_is_refused(flat, content):
    (flat / "failed.json").write_bytes(content)
    _rehash(flat)
    _refused(flat, "failed.json: it (is not valid JSON|is not a list of \\[path, reason\\] pairs)")


def test_a_crafted_98_byte_index_faiss_is_refused_before_any_allocation(folders, tmp_path):
    # An exact-index header with the right d and ntotal that claims 2^36 code words: faiss alone
    # answers with std::bad_alloc.
    header = b"IxFI" + struct.pack("<iqqqBi", DIM, COUNT, 1 << 20, 1 << 20, 1, 0) + struct.pack("<q", 1 << 36)
    crafted = header + bytes(98 - len(header))
    for key, pattern in (("Flat", "files.index.faiss.bytes is 98, but an exact index"),
                         ("HNSW8", "index.faiss: faiss cannot read it")):
        folder = Path(shutil.copytree(folders[key], tmp_path / key))
        (folder / "index.faiss").write_bytes(crafted)
        _rehash(folder)
        _refused(folder, pattern)


def test_an_index_faiss_of_other_vectors_or_ids_is_refused(folders, tmp_path):
    folder = Path(shutil.copytree(folders["Flat"], tmp_path / "flat"))
    other = faiss.IndexFlatIP(DIM)
    other.add(_vectors()[:COUNT - 1])
    faiss.write_index(other, str(folder / "index.faiss"))
    _rehash(folder, lambda manifest: None)
    _refused(folder, "files.index.faiss.bytes is .*, but an exact index of 200 x 16 vectors")
    folder = Path(shutil.copytree(folders["IVF8,Flat"], tmp_path / "ivf"))
    shifted = faiss.index_factory(DIM, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    shifted.train(_vectors())
    shifted.add_with_ids(_vectors(), np.arange(COUNT, dtype=np.int64) + 1000)
    faiss.write_index(shifted, str(folder / "index.faiss"))
    _rehash(folder)
    _refused(folder, "returned vector ids outside 0..199")


def test_commands_on_a_damaged_folder_exit_2_with_one_line(flat):
    (flat / "failed.json").write_bytes(b"oops")
    _rehash(flat)
    result = subprocess.run([sys.executable, "-m", "finegrain", "index", "info", "--index", str(flat)],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "failed.json: it is not valid JSON" in result.stderr and "finegrain index build" in result.stderr


def test_replacing_a_folder_leaves_the_new_version_and_nothing_else(tmp_path):
    out = _write(tmp_path / "index", seed=0)
    _write(out, seed=1)
    with IndexFolder(out, gpu=False) as loaded:
        assert np.array_equal(loaded.embeddings, _vectors(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_an_interrupted_two_rename_swap_is_recovered_on_the_next_run(folders, tmp_path):
    out = Path(shutil.copytree(folders["Flat"], tmp_path / "index"))
    os.replace(out, old_sibling(out))  # crash after the first rename: only the parked old version
    with IndexFolder(out, gpu=False) as loaded:  # the next run puts it back
        assert loaded.count == COUNT
    assert not old_sibling(out).exists()
    shutil.copytree(out, old_sibling(out))  # crash after the second rename: both versions
    verify_files(out)
    assert not old_sibling(out).exists()


def test_the_fallback_swap_without_rename_exchange_replaces_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "_exchange", lambda first, second: False)  # a kernel without renameat2
    out = _write(tmp_path / "index", seed=0)
    _write(out, seed=2)
    with IndexFolder(out, gpu=False) as loaded:
        assert np.array_equal(loaded.embeddings, _vectors(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_atomic_path_keeps_its_file_behaviour(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    recover_swap(target)  # nothing to recover for a file
    assert target.read_text() == "new"
