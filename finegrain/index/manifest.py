"""manifest.json of an index folder: checksummed, then checked field by field before anything is read.

An index folder may come from a stranger, so nothing the manifest says is trusted as written:
its own SHA-256 is kept beside it (manifest.sha256, in `sha256sum -c` format), every field is
checked for type and range, the search parameters against the index type, and the sizes it
gives for the other files against each other, so that no later reader allocates from a number
it did not check. The same check runs before a manifest is written.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, NoReturn

from finegrain.errors import FinegrainError

FORMAT = "finegrain-index"
FORMAT_VERSION = 2  # 2: manifest.sha256 beside the manifest
MANIFEST, MANIFEST_CHECKSUM = "manifest.json", "manifest.sha256"
INDEX_FILE, EMBEDDINGS_FILE, ITEMS_FILE, FAILED_FILE = "index.faiss", "embeddings.npy", "items.sqlite", "failed.json"
REQUIRED_FILES = (INDEX_FILE, EMBEDDINGS_FILE, ITEMS_FILE, FAILED_FILE)

MAX_MANIFEST_BYTES = 16 << 20
MAX_COUNT, MAX_DIM = 1 << 31, 1 << 16
MAX_FILE_BYTES = 1 << 44
MAX_FAILED_BYTES = 256 << 20
MAX_NPY_HEADER_BYTES = 1 << 16
MAX_PARAMETER = 1 << 16  # nprobe <= nlist <= 65536; efSearch beyond this only burns memory per query
MAX_TEXT = 4096
# faiss IndexFlat file: fourcc, d (int32), ntotal (int64), two reserved int64, is_trained (uint8),
# metric (int32), then the number of 4-byte code words (int64) and the float32 vectors.
FLAT_HEADER_BYTES = 4 + 4 + 8 + 8 + 8 + 1 + 4 + 8
TUNABLE = {"nprobe": "IVF", "efSearch": "HNSW"}
_KEY = re.compile(r"[A-Za-z0-9_,.=-]{1,200}")
_PARAMETER = re.compile(r"([A-Za-z]+)=([0-9]{1,6})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHECKSUM_LINE = re.compile(rf"([0-9a-f]{{64}})  {re.escape(MANIFEST)}\n?")
EMBEDDING_MODES = ("forward_embedding", "pooled_features")


def rebuild_hint(root: str | Path) -> str:
    return (f"Rebuild the index with `finegrain index build --weights WEIGHTS --images FOLDER --out {root}` "
            "(or restore the folder from where it came).")


def _fail(path: Path, problem: str) -> NoReturn:
    raise FinegrainError(f"{path}: {problem}. The index is damaged or was changed. {rebuild_hint(path.parent)}")


def _entry(section: dict, key: str, where: str, path: Path) -> Any:
    if key not in section:
        _fail(path, f"{where}.{key} is missing")
    return section[key]


def _dict(value: Any, where: str, path: Path) -> dict:
    if not isinstance(value, dict):
        _fail(path, f"{where} is not an object")
    return value


def _int(value: Any, where: str, path: Path, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _fail(path, f"{where} is {_show(value)}, expected a whole number in [{low}, {high}]")
    return value


def _number(value: Any, where: str, path: Path, low: float, high: float, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        _fail(path, f"{where} is {_show(value)}, expected a number in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _text(value: Any, where: str, path: Path, pattern: re.Pattern | None = None, optional: bool = False) -> str:
    if optional and value is None:
        return value
    if not isinstance(value, str) or len(value) > MAX_TEXT or "\x00" in value or (pattern and not
                                                                                  pattern.fullmatch(value)):
        _fail(path, f"{where} is {_show(value)}, expected {'a well-formed' if pattern else 'a'} string")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_parameters(parameters: str, key: str, path: Path) -> dict[str, int]:
    """'name=value,...' -> {name: value}, each name the one knob of the index type `key`, in range."""
    if not isinstance(parameters, str) or len(parameters) > 200:
        _fail(path, f"index.parameters is {_show(parameters)}, expected 'name=value' text")
    values: dict[str, int] = {}
    for item in filter(None, parameters.split(",")):
        match = _PARAMETER.fullmatch(item)
        if not match or match.group(1) in values:
            _fail(path, f"index.parameters {parameters!r} is not a list of distinct name=value")
        values[match.group(1)] = int(match.group(2))
    allowed = tunable_parameter(key)
    if allowed and allowed not in values:  # the tuned value, never whatever the faiss file carries
        _fail(path, f"index.parameters {parameters!r} does not set {allowed}, which a {key!r} index needs")
    for name, value in values.items():
        if name != allowed:
            knob = f"only {allowed}" if allowed else "no search parameters"
            _fail(path, f"index.parameters sets {name}, but a {key!r} index takes {knob}")
        limit = _ivf_lists(key) if name == "nprobe" else MAX_PARAMETER
        if not 1 <= value <= limit:
            _fail(path, f"index.parameters {name}={value} is out of range: it must be in [1, {limit}] for {key!r}")
    return values


def tunable_parameter(key: str) -> str | None:
    """The search parameter an index_factory key's index has (IVF: nprobe, else HNSW: efSearch)."""
    return next((name for name, marker in TUNABLE.items() if marker in key), None)


def _ivf_lists(key: str) -> int:
    match = re.search(r"IVF([0-9]{1,6})", key)
    return min(int(match.group(1)), MAX_PARAMETER) if match else MAX_PARAMETER


def check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """Every field the commands read: present, of its type, in range, and consistent with the others."""
    top = _dict(manifest, "the manifest", path)
    if top.get("format") != FORMAT:
        raise FinegrainError(f"{path} is not a finegrain index manifest. "
                             "Point --index at a folder made by `finegrain index build`.")
    if top.get("format_version") != FORMAT_VERSION:
        raise FinegrainError(f"{path.parent} has index format version {_show(top.get('format_version'))}, this "
                             f"finegrain reads {FORMAT_VERSION}. {rebuild_hint(path.parent)}")
    count = _int(_entry(top, "count", "manifest", path), "count", path, 1, MAX_COUNT)
    dim = _int(_entry(top, "dim", "manifest", path), "dim", path, 1, MAX_DIM)
    if _entry(top, "metric", "manifest", path) != "inner_product":
        _fail(path, f"metric is {_show(top['metric'])}, expected 'inner_product'")
    model = _entry(top, "model", "manifest", path)
    if model is not None:  # None: built from embeddings made elsewhere (index/embeddings.py)
        _check_model(_dict(model, "model", path), path)
    key = _check_index(_dict(_entry(top, "index", "manifest", path), "index", path), count, path)
    _check_build(_dict(_entry(top, "build", "manifest", path), "build", path), path)
    _check_files(_dict(_entry(top, "files", "manifest", path), "files", path), count, dim, key, path)
    return top


def _check_model(model: dict, path: Path) -> None:
    for name in ("arch", "weights"):
        _text(_entry(model, name, "model", path), f"model.{name}", path)
    _text(_entry(model, "weights_sha256", "model", path), "model.weights_sha256", path, _SHA256)
    if _entry(model, "embedding", "model", path) not in EMBEDDING_MODES:
        _fail(path, f"model.embedding is {_show(model['embedding'])}, expected one of {EMBEDDING_MODES}")
    pre = _dict(_entry(model, "preprocessing", "model", path), "model.preprocessing", path)
    for name in ("mean", "std"):
        values = _entry(pre, name, "model.preprocessing", path)
        if not isinstance(values, list) or len(values) != 3:
            _fail(path, f"model.preprocessing.{name} is {_show(values)}, expected 3 numbers")
        for value in values:
            _number(value, f"model.preprocessing.{name}", path, -1e6 if name == "mean" else 0.0, 1e6,
                    low_open=name == "std")
    for name in ("train_size", "resize", "crop"):
        _int(_entry(pre, name, "model.preprocessing", path), f"model.preprocessing.{name}", path, 1, 8192)


def _check_index(index: dict, count: int, path: Path) -> str:
    key = _text(_entry(index, "key", "index", path), "index.key", path, _KEY)
    _text(_entry(index, "requested_key", "index", path), "index.requested_key", path, _KEY)
    parse_parameters(_entry(index, "parameters", "index", path), key, path)
    _text(_entry(index, "reason", "index", path), "index.reason", path)
    _text(_entry(index, "fallback", "index", path), "index.fallback", path, optional=True)
    if _entry(index, "chosen_by", "index", path) not in ("user", "auto"):
        _fail(path, f"index.chosen_by is {_show(index['chosen_by'])}, expected 'user' or 'auto'")
    _number(_entry(index, "recall_target", "index", path), "index.recall_target", path, 0.0, 1.0, low_open=True)
    _number(_entry(index, "recall", "index", path), "index.recall", path, 0.0, 1.0)
    _int(_entry(index, "recall_k", "index", path), "index.recall_k", path, 1, count)
    _int(_entry(index, "queries", "index", path), "index.queries", path, 0, count)
    _int(_entry(index, "max_memory", "index", path), "index.max_memory", path, 1, 1 << 60)
    for name in ("latency_ms", "single_query_latency_ms", "exact_latency_ms", "exact_single_query_latency_ms"):
        _number(_entry(index, name, "index", path), f"index.{name}", path, 0.0, 1e9)
    points = _entry(index, "points", "index", path)
    if not isinstance(points, list) or len(points) > 64:
        _fail(path, f"index.points is {_show(points)}, expected a list of at most 64 operating points")
    for point in points:
        point = _dict(point, "index.points[]", path)
        _text(_entry(point, "parameters", "index.points[]", path), "index.points[].parameters", path)
        _number(_entry(point, "recall", "index.points[]", path), "index.points[].recall", path, 0.0, 1.0)
        _number(_entry(point, "latency_ms", "index.points[]", path), "index.points[].latency_ms", path, 0.0, 1e9)
    return key


def _check_build(build: dict, path: Path) -> None:
    for name in ("created", "updated", "finegrain_version"):
        _text(_entry(build, name, "build", path), f"build.{name}", path)
    sources = _entry(build, "sources", "build", path)
    if not isinstance(sources, list) or len(sources) > 100_000:
        _fail(path, f"build.sources is {_show(sources)}, expected a list of folders")
    for source in sources:
        _text(source, "build.sources[]", path)
    for name in ("failed", "duplicates"):
        _int(_entry(build, name, "build", path), f"build.{name}", path, 0, MAX_FILE_BYTES)
    _number(_entry(build, "seconds", "build", path), "build.seconds", path, 0.0, 1e9)
    if "add_seconds" in build:
        _number(build["add_seconds"], "build.add_seconds", path, 0.0, 1e9)


def _check_files(files: dict, count: int, dim: int, key: str, path: Path) -> None:
    if set(files) != set(REQUIRED_FILES):
        _fail(path, f"files lists {_show(sorted(files))}, expected exactly {list(REQUIRED_FILES)}")
    sizes = {}
    for name in REQUIRED_FILES:
        entry = _dict(files[name], f"files.{name}", path)
        _text(_entry(entry, "sha256", f"files.{name}", path), f"files.{name}.sha256", path, _SHA256)
        size = _entry(entry, "bytes", f"files.{name}", path)
        sizes[name] = _int(size, f"files.{name}.bytes", path, 0, MAX_FILE_BYTES)
    vector_bytes = 4 * count * dim
    if not 0 < sizes[EMBEDDINGS_FILE] - vector_bytes <= MAX_NPY_HEADER_BYTES:
        _fail(path, f"files.{EMBEDDINGS_FILE}.bytes is {sizes[EMBEDDINGS_FILE]}, which cannot hold {count} x {dim} "
                    "float32 values and a header")
    if key == "Flat" and sizes[INDEX_FILE] != FLAT_HEADER_BYTES + vector_bytes:
        _fail(path, f"files.{INDEX_FILE}.bytes is {sizes[INDEX_FILE]}, but an exact index of {count} x {dim} vectors "
                    f"has {FLAT_HEADER_BYTES + vector_bytes}")
    if sizes[FAILED_FILE] > MAX_FAILED_BYTES:
        _fail(path, f"files.{FAILED_FILE}.bytes is {sizes[FAILED_FILE]}, more than {MAX_FAILED_BYTES}")


def manifest_bytes(manifest: dict[str, Any]) -> tuple[bytes, bytes]:
    """manifest.json and manifest.sha256 as written (the manifest is checked first, as a reader would)."""
    text = json.dumps(manifest, indent=2).encode()
    try:
        check_manifest(json.loads(text), Path(MANIFEST))
    except FinegrainError as error:
        raise FinegrainError(f"Refusing to write an index manifest that would not load: {error} "
                             "This is a bug; please report it.") from None
    return text, f"{hashlib.sha256(text).hexdigest()}  {MANIFEST}\n".encode()


def manifest_version(root: str | Path) -> str | None:
    """The SHA-256 that manifest.sha256 gives for manifest.json: it changes with every build and
    `add` (the manifest records when), so a server polls it to see a new version cheaply. None
    while there is no readable checksum line (nothing is verified here: loading does that)."""
    path = Path(root) / MANIFEST_CHECKSUM
    try:
        with open(path, "rb") as handle:
            line = handle.read(1025)
    except OSError:
        return None
    match = _CHECKSUM_LINE.fullmatch(line.decode("ascii", errors="replace"))
    return match.group(1) if match else None


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest, refused unless its checksum matches and every field passes `check_manifest`."""
    root = Path(root)
    path, checksum = root / MANIFEST, root / MANIFEST_CHECKSUM
    if not path.is_file():
        raise FinegrainError(f"{root} is not a finegrain index (no {MANIFEST}). "
                             "Build one with `finegrain index build`.")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        _fail(path, f"it has {path.stat().st_size} bytes, more than a manifest can ({MAX_MANIFEST_BYTES})")
    data = path.read_bytes()
    if not checksum.is_file() or checksum.stat().st_size > 1024:
        _fail(checksum, f"it is missing or not a checksum line, so {MANIFEST} cannot be verified")
    match = _CHECKSUM_LINE.fullmatch(checksum.read_bytes().decode("ascii", errors="replace"))
    if not match:
        _fail(checksum, f"it is not one line '<sha256>  {MANIFEST}'")
    if hashlib.sha256(data).hexdigest() != match.group(1):
        _fail(path, f"it fails its SHA-256 check against {MANIFEST_CHECKSUM}")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        _fail(path, f"it is not valid JSON ({str(error)[:100]})")
    return check_manifest(manifest, path)
