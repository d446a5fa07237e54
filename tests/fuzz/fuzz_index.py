"""Fuzz harness for the index folder loader (`IndexFolder`, then a search of what it loaded).

Structure-aware: the manifest's checksum and the files' SHA-256 would stop a byte-level fuzzer
at the door, so each input edits one part of a small valid index folder and the harness then
re-hashes what the edit changed, as a stranger crafting a folder would. Three valid bases are
built once per process in a temporary folder: the project's exact (Flat) index, an IVF and an
HNSW index, each of 64 random 8-d vectors. The first byte of an input picks the base and the
mode; the rest is the payload:

    raw-faiss, raw-npy, raw-sqlite, raw-failed, raw-manifest   the payload replaces that file
    edits      the payload is a list of edits of the manifest's JSON tree (set / delete a field)
    patches    the payload is a list of (file, offset, width, value) writes into the data files
    checksum   the payload replaces manifest.sha256 (not re-hashed)

Run: python tests/fuzz/fuzz_index.py -atheris_runs=100000   (pip install -e ".[fuzz]")
"""
from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np

if __name__ == "__main__" and "--write-seeds" not in sys.argv:  # fuzzing: instrument our code, not numpy/faiss
    import atheris
    import torch  # noqa: F401  (search.py's imports pull it in; far too large to instrument)

    with atheris.instrument_imports(include=["finegrain"]):
        import finegrain.index.search  # noqa: F401

from finegrain.errors import FinegrainError  # noqa: E402
from finegrain.index.manifest import MANIFEST, MANIFEST_CHECKSUM, REQUIRED_FILES  # noqa: E402
from finegrain.index.search import query_labels, search_vectors  # noqa: E402
from finegrain.index.select import build_tuned_index  # noqa: E402
from finegrain.index.store import IndexFolder, Item, write_index_folder  # noqa: E402

CORPUS = Path(__file__).parent / "corpus" / "index"
COUNT, DIM = 64, 8
BASES = ("Flat", "IVF4,Flat", "HNSW8")
MODES = ("raw-faiss", "raw-npy", "raw-sqlite", "raw-failed", "raw-manifest", "edits", "patches", "checksum")
RAW_FILES = {"raw-faiss": "index.faiss", "raw-npy": "embeddings.npy", "raw-sqlite": "items.sqlite",
             "raw-failed": "failed.json", "raw-manifest": MANIFEST}
_state: dict[str, Any] = {}


def _vectors() -> np.ndarray:
    vectors = np.random.default_rng(0).standard_normal((COUNT, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _approximate(key: str, vectors: np.ndarray) -> tuple[faiss.Index, str]:
    """An IVF or HNSW index as `build_tuned_index` makes them (it would pick exact search at this size)."""
    index = faiss.index_factory(DIM, key, faiss.METRIC_INNER_PRODUCT)
    if key.startswith("HNSW"):
        index = faiss.IndexIDMap(index)
    else:
        faiss.extract_index_ivf(index).cp.min_points_per_centroid = 8  # 64 points for 4 lists, no warning
    index.train(vectors)
    index.add_with_ids(vectors, np.arange(COUNT, dtype=np.int64))
    return index, "nprobe=2" if key.startswith("IVF") else "efSearch=16"


def _base_files(root: Path, key: str) -> dict[str, bytes]:
    """A valid index folder written by the project's own writer; its files' bytes."""
    vectors = _vectors()
    index, report = build_tuned_index(vectors, index_key="Flat", progress=False)
    section = {**report.to_dict(), "chosen_by": "user", "max_memory": 1 << 30}
    if key != "Flat":
        index, parameters = _approximate(key, vectors)
        section.update(key=key, requested_key=key, parameters=parameters)
    items = [Item(i, f"/images/c{i % 4}/{i}.jpg", f"c{i % 4}" if i % 5 else None, 100 + i,
                  hashlib.sha256(str(i).encode()).hexdigest()) for i in range(COUNT)]
    model = {"arch": "assemble_resnet50", "weights": "/weights.safetensors", "weights_sha256": "0" * 64,
             "embedding": "forward_embedding", "preprocessing": {"mean": [123.7, 116.3, 103.5],
                                                                 "std": [58.4, 57.1, 57.4], "train_size": 32,
                                                                 "resize": 32, "crop": 32}}
    build = {"created": "2025-01-01T00:00:00+00:00", "updated": "2025-01-01T00:00:00+00:00",
             "finegrain_version": "0.1.0", "sources": ["/images"], "failed": 1, "duplicates": 0, "seconds": 0.5}
    folder = root / f"base-{BASES.index(key)}"
    write_index_folder(folder, index=index, embeddings=vectors, items=items, failed=[("/images/bad.jpg", "empty")],
                       manifest={"model": model, "index": section, "build": build})
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def _setup() -> dict[str, Any]:
    if not _state:
        faiss.omp_set_num_threads(1)
        # in memory where possible: rewriting a file on ext4 flushes it to disk at close (auto_da_alloc)
        root = Path(tempfile.mkdtemp(prefix="fuzz-index-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
        atexit.register(shutil.rmtree, root, True)
        _state.update(root=root, work=root / "work", bases=[_base_files(root, key) for key in BASES],
                      queries=_vectors()[::7] + 0.01)
    return _state


def _tree_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix]
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in children:
        paths += _tree_paths(child, prefix + (key,))
    return paths


def _value(op: int, payload: bytes, at: int) -> tuple[Any, int]:
    """A replacement value of kind `op` read from the payload at `at`; returns it and the new position."""
    chunk = payload[at:at + 8].ljust(8, b"\0")
    if op == 0:
        return struct.unpack("<q", chunk)[0], at + 8
    if op == 1:
        return struct.unpack("<d", chunk)[0], at + 8
    if op == 2:
        return payload[at] - 128 if at < len(payload) else 0, at + 1
    if op == 3:
        length = payload[at] if at < len(payload) else 0
        return payload[at + 1:at + 1 + length].decode("latin-1"), at + 1 + length
    return [None, True, False, [], {}, "", 2 ** 63, -1][op - 4], at


def _edit_manifest(manifest: dict, payload: bytes) -> dict:
    """Apply edits (path selector, op, value) to the manifest's JSON tree."""
    at = 0
    while at + 2 <= len(payload):
        paths = _tree_paths(manifest)
        path, op = paths[payload[at] % len(paths)], payload[at + 1] % 13
        at += 2
        if not path:
            continue
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if op == 12:
            if isinstance(parent, dict):
                del parent[path[-1]]
            continue
        parent[path[-1]], at = _value(op, payload, at)
    return manifest


def _patch(files: dict[str, bytes], payload: bytes) -> None:
    """Overwrite parts of the data files: (file, 16-bit offset, width 1/4/8, little-endian value) records,
    so that a size or count field inside index.faiss, the .npy header or the database can be set whole."""
    at = 0
    while at + 4 <= len(payload):
        name = REQUIRED_FILES[payload[at] % len(REQUIRED_FILES)]
        offset, width = int.from_bytes(payload[at + 1:at + 3], "little"), (1, 4, 8)[payload[at + 3] % 3]
        value = payload[at + 4:at + 4 + width].ljust(width, b"\0")
        at += 4 + width
        data = bytearray(files[name])
        if data:
            offset %= len(data)
            data[offset:offset + width] = value[:len(data) - offset]
            files[name] = bytes(data)


def _folder(data: bytes) -> Path:
    """Write the index folder that `data` describes (re-hashed unless the mode is 'checksum')."""
    state = _setup()
    selector, payload = (data[0], data[1:]) if data else (0, b"")
    files = dict(state["bases"][selector % len(BASES)])
    mode = MODES[(selector // len(BASES)) % len(MODES)]
    manifest = json.loads(files[MANIFEST])
    if mode in RAW_FILES:
        files[RAW_FILES[mode]] = payload
    elif mode == "edits":
        files[MANIFEST] = json.dumps(_edit_manifest(manifest, payload), indent=2).encode()
    elif mode == "patches":
        _patch(files, payload)
    if mode not in ("raw-manifest", "edits", "checksum"):
        for name in REQUIRED_FILES:
            manifest["files"][name] = {"sha256": hashlib.sha256(files[name]).hexdigest(), "bytes": len(files[name])}
        files[MANIFEST] = json.dumps(manifest, indent=2).encode()
    if mode == "checksum":
        files[MANIFEST_CHECKSUM] = payload
    else:
        files[MANIFEST_CHECKSUM] = f"{hashlib.sha256(files[MANIFEST]).hexdigest()}  {MANIFEST}\n".encode()
    work = state["work"]
    work.mkdir(exist_ok=True)
    for name, content in files.items():
        (work / name).write_bytes(content)
    return work


def one_input(data: bytes) -> None:
    """Load the folder `data` describes and search it; only FinegrainError may come out."""
    root = _folder(data)
    try:
        with IndexFolder(root, gpu=False) as folder:
            ids, similarity = search_vectors(folder, _state["queries"], 5)
            assert ids.shape == similarity.shape == (len(_state["queries"]), min(5, folder.count))
            folder.items(ids[ids >= 0])
            assert len(folder.all_items()) == folder.count
            folder.checksums()
            query_labels(folder, ["/images/c1/q.jpg", "/elsewhere/c2/q.jpg", "/elsewhere/q.jpg"])
    except FinegrainError:
        return


def write_seeds() -> None:
    """(Re)write the seed corpus: every mode on every base, payloads from the valid files."""
    state = _setup()
    CORPUS.mkdir(parents=True, exist_ok=True)
    for base_number, files in enumerate(state["bases"]):
        for mode_number, mode in enumerate(MODES):
            payload = {"edits": bytes([7, 2, 40, 3, 200, 12]),  # a field set to a string, another deleted
                       "patches": bytes([0, 37, 0, 2]) + (1 << 40).to_bytes(8, "little") + bytes([1, 130, 0, 0, 7]),
                       "checksum": files[MANIFEST_CHECKSUM]}.get(mode) or files[RAW_FILES[mode]]
            if mode == "raw-sqlite" and base_number:
                continue  # one copy of the 28 KB database is enough
            selector = base_number + len(BASES) * mode_number
            (CORPUS / f"{BASES[base_number].split(',')[0].lower()}-{mode}").write_bytes(bytes([selector]) + payload)


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds()
        return
    import atheris

    arguments = sys.argv[1:]
    if all(argument.startswith("-") for argument in arguments):  # no corpus or files given: the seeds,
        # behind a scratch folder, since libFuzzer adds what it finds to the first folder it is given
        arguments += [tempfile.mkdtemp(prefix="fuzz-index-corpus-"), str(CORPUS)]
    atheris.Setup([sys.argv[0], *arguments], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
