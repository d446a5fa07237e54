"""The `finegrain.*` metadata of our safetensors files: one typed record, one writer, one reader.

Checkpoints are shared between people, so the reader trusts nothing: the header length is
bounded before safetensors parses it, every value is checked for type and range (a flipped bit
gives one FinegrainError naming the file and the key, never a JSON or KeyError traceback), and
the tensors' names, dtypes and shapes come back with it, so that a model is compared with them
before it is built (models/factory.py). The keys are those finegrain has always written, so
older files keep loading.
"""
from __future__ import annotations

import json
import math
import re
import reprlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from safetensors import safe_open

from finegrain.errors import FinegrainError
from finegrain.models import registry
from finegrain.preprocessing import Preprocessing

ARCH = "finegrain.arch"
NUM_CLASSES = "finegrain.num_classes"
OVERRIDES = "finegrain.overrides"
PREPROCESSING = "finegrain.preprocessing"
CLASSES = "finegrain.classes"
DATA = "finegrain.data"
TASK = "finegrain.task"
RECIPE = "finegrain.recipe"
EPOCH = "finegrain.epoch"
METRIC = "finegrain.metric."  # + the metric's name, one key per metric
RECALL_KS = "finegrain.recall_ks"
KD_TEACHER = "finegrain.kd_teacher"
SOURCE = "finegrain.source"
SOURCE_KIND = "finegrain.source_kind"
SOURCE_SHA256 = "finegrain.source_sha256"
VERSION = "finegrain.version"
# Teacher-logits files share classes, num_classes and preprocessing, and add these (kept in `extra`).
TEACHER_PATHS = "finegrain.paths"
TEACHER = "finegrain.teacher"
TEACHER_ARCH = "finegrain.teacher_arch"
PATHS_RELATIVE_TO = "finegrain.paths_relative_to"

# safetensors' own limit; a teacher-logits header lists every training image (ImageNet: ~50 MB).
MAX_HEADER_BYTES = 100_000_000
MAX_TEXT = 4096  # a free-text value: recipe name, source, a class name, a data folder
MAX_IMAGE_SIDE = 16384
MAX_RECALL_KS = 64
TASKS = ("fgvc", "backbone", "retrieval")
SOURCE_KINDS = ("release", "torchvision", "timm")
FIX = "The file is damaged or was edited: re-create it, or download it again."
_COUNT = re.compile(r"[0-9]{1,9}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")
_METRIC_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,100}")  # top1, recall@1, map@r, train_loss ...


@dataclass(frozen=True)
class DataRecord:
    """The data set a model was trained on: `load_splits(kind, root, **options)` finds it again."""

    kind: str
    root: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    """Everything finegrain records in a checkpoint; None where a file does not say.

    architecture + num_classes + overrides rebuild the network, preprocessing says what input it
    expects, classes / data where it was trained, the rest is provenance. `extra` holds the keys
    finegrain does not interpret (a teacher-logits file's paths, a user's notes), unchanged.
    """

    architecture: str | None = None
    num_classes: int | None = None
    overrides: dict[str, Any] | None = None
    preprocessing: Preprocessing | None = None
    classes: tuple[str, ...] | None = None
    data: DataRecord | None = None
    task: str | None = None
    recipe: str | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    recall_ks: tuple[int, ...] | None = None
    kd_teacher: str | None = None
    source: str | None = None
    source_kind: str | None = None
    source_sha256: str | None = None
    version: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors' name: F32, BF16, I64, ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's header, read without loading a tensor."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


class _Bad(Exception):
    """A value that does not parse; `parse_metadata` adds the file and the key."""


# ------------------------------------------------------------------------------- value parsers
def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, an int of 5,000 digits, nesting beyond the stack
        raise _Bad("is not valid JSON") from None


def _text(text: str) -> str:
    if not 0 < len(text) <= MAX_TEXT:
        raise _Bad(f"must be a text of 1 to {MAX_TEXT} characters")
    return text


def _count(text: str) -> int:
    if not _COUNT.fullmatch(text):
        raise _Bad("must be a whole number")
    return int(text)


def _num_classes(text: str) -> int:
    value = _count(text)
    if value > registry.MAX_CLASSES:
        raise _Bad(f"must be at most {registry.MAX_CLASSES}")
    return value


def _architecture(text: str) -> str:
    try:
        registry.family_of(text)
    except FinegrainError:
        raise _Bad(f"names no known model ({text[:80]!r})") from None
    return text


def _overrides(text: str) -> dict[str, Any]:
    value = _json(text)
    if not isinstance(value, dict):
        raise _Bad("must be a JSON object")
    return value


def _number(value: Any, low: float, high: float, what: str) -> float:
    # Bounds first: NaN fails them, and math.isfinite would overflow on a 400-digit JSON integer.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
            or not math.isfinite(value):
        raise _Bad(f"{what} must be a finite number in [{low}, {high}], got {reprlib.repr(value)}")
    return float(value)


def _side(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IMAGE_SIDE:
        raise _Bad(f"{what} must be an integer in [1, {MAX_IMAGE_SIDE}], got {reprlib.repr(value)}")
    return value


def _preprocessing(text: str) -> Preprocessing:
    raw = _json(text)
    keys = {"mean", "std", "train_size", "resize", "crop"}
    if not isinstance(raw, dict) or set(raw) != keys:
        raise _Bad(f"must be a JSON object with exactly the keys {', '.join(sorted(keys))}")
    for name in ("mean", "std"):
        if not isinstance(raw[name], list) or len(raw[name]) != 3:
            raise _Bad(f"{name} must be a list of 3 numbers (R, G, B)")
    # std divides every pixel: zero, negative or tiny values give inf / NaN inputs.
    return Preprocessing(mean=tuple(_number(v, -1e4, 1e4, "mean") for v in raw["mean"]),
                         std=tuple(_number(v, 1e-3, 1e4, "std") for v in raw["std"]),
                         train_size=_side(raw["train_size"], "train_size"), resize=_side(raw["resize"], "resize"),
                         crop=_side(raw["crop"], "crop"))


def _classes(text: str) -> tuple[str, ...]:
    value = _json(text)
    if not isinstance(value, list) or not all(isinstance(name, str) and len(name) <= MAX_TEXT for name in value):
        raise _Bad("must be a JSON list of class names")
    if len(value) > registry.MAX_CLASSES or len(set(value)) != len(value):
        raise _Bad(f"must list at most {registry.MAX_CLASSES} distinct names")
    return tuple(value)


def _data(text: str) -> DataRecord:
    if not text.lstrip().startswith(("{", "[", '"')):  # older files: a bare folder path
        return DataRecord("folder", _text(text), {})
    value = _json(text)
    if isinstance(value, str):
        return DataRecord("folder", _text(value), {})
    if not isinstance(value, dict) or not {"kind", "root"} <= set(value) <= {"kind", "root", "options"}:
        raise _Bad('must be a JSON object {"kind", "root", "options"}')
    kind, root, options = value["kind"], value["root"], value.get("options", {})
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise _Bad("kind must be a data set kind such as folder or food101")
    if not isinstance(root, str):
        raise _Bad("root must be a folder path")
    if not isinstance(options, dict) or not all(isinstance(k, str) and k.isidentifier() for k in options):
        raise _Bad("options must be a JSON object of option names")
    return DataRecord(kind, _text(root), options)


def _task(text: str) -> str:
    if text not in TASKS:
        raise _Bad(f"must be one of {', '.join(TASKS)}")
    return text


def _recall_ks(text: str) -> tuple[int, ...]:
    value = _json(text)
    if not isinstance(value, list) or not 0 < len(value) <= MAX_RECALL_KS or not all(
            isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 10**9 for k in value):
        raise _Bad(f"must be a JSON list of 1 to {MAX_RECALL_KS} positive integers")
    return tuple(value)


def _source_kind(text: str) -> str:
    if text not in SOURCE_KINDS:
        raise _Bad(f"must be one of {', '.join(SOURCE_KINDS)}")
    return text


def _sha256(text: str) -> str:
    if not _SHA256.fullmatch(text):
        raise _Bad("must be 64 lowercase hexadecimal digits")
    return text


def _metric(text: str) -> float:
    try:
        return float(text)  # a diverged run's loss may be nan: a report, not an input
    except ValueError:
        raise _Bad("must be a number") from None


def _dump_data(record: DataRecord) -> str:
    return json.dumps({"kind": record.kind, "root": record.root, "options": record.options})


# field -> (key, writer, reader). The writer's text is what the reader accepts.
_FIELDS: dict[str, tuple[str, Callable[[Any], str], Callable[[str], Any]]] = {
    "architecture": (ARCH, str, _architecture),
    "num_classes": (NUM_CLASSES, str, _num_classes),
    "overrides": (OVERRIDES, lambda v: json.dumps(v, sort_keys=True), _overrides),
    "preprocessing": (PREPROCESSING, Preprocessing.to_json, _preprocessing),
    "classes": (CLASSES, lambda v: json.dumps(list(v)), _classes),
    "data": (DATA, _dump_data, _data),
    "task": (TASK, str, _task),
    "recipe": (RECIPE, str, _text),
    "epoch": (EPOCH, str, _count),
    "recall_ks": (RECALL_KS, lambda v: json.dumps(list(v)), _recall_ks),
    "kd_teacher": (KD_TEACHER, str, _text),
    "source": (SOURCE, str, _text),
    "source_kind": (SOURCE_KIND, str, _source_kind),
    "source_sha256": (SOURCE_SHA256, str, _sha256),
    "version": (VERSION, str, _text),
}
_KEYS = {key: name for name, (key, _, _) in _FIELDS.items()}


# ------------------------------------------------------------------------------- writer, reader
def to_metadata(info: CheckpointInfo) -> dict[str, str]:
    """The one writer: every field that is set, under its key, as text `parse_metadata` reads back."""
    metadata = dict(info.extra)
    for name, (key, dump, _) in _FIELDS.items():
        value = getattr(info, name)
        if value is not None:
            metadata[key] = dump(value)
    metadata.update({f"{METRIC}{name}": repr(float(value)) for name, value in info.metrics.items()})
    return metadata


def parse_metadata(metadata: dict[str, str], source: str | Path) -> CheckpointInfo:
    """The one reader: a safetensors metadata map -> CheckpointInfo, every value validated.

    `source` names the file in messages. The overrides are checked against the architecture
    (known keys, bounds), the class names against num_classes.
    """
    values: dict[str, Any] = {"metrics": {}, "extra": {}}
    for key, text in metadata.items():
        name = _KEYS.get(key)
        try:
            if name is not None:
                values[name] = _FIELDS[name][2](text)
            elif key.startswith(METRIC):
                if not _METRIC_NAME.fullmatch(key[len(METRIC):]):
                    raise _Bad("names no metric")
                values["metrics"][key[len(METRIC):]] = _metric(text)
            else:
                values["extra"][key] = text
        except _Bad as problem:
            raise FinegrainError(f"{source}: metadata {_shown(key)} {problem}. {FIX}") from None
    info = CheckpointInfo(**values)
    _check_together(info, source)
    return info


def _shown(key: str) -> str:
    return key if len(key) <= 80 else key[:77] + "..."


def _check_together(info: CheckpointInfo, source: str | Path) -> None:
    """Fields that are valid alone but contradict each other."""
    if info.architecture is not None and info.overrides is not None:
        try:
            registry.check_overrides(info.architecture, info.overrides, info.num_classes)
        except FinegrainError as problem:
            raise FinegrainError(f"{source}: metadata {OVERRIDES} does not fit {ARCH} {info.architecture!r}: "
                                 f"{problem} {FIX}") from None
    if info.classes is not None and info.num_classes and len(info.classes) != info.num_classes:
        raise FinegrainError(f"{source}: metadata {CLASSES} lists {len(info.classes)} names but {NUM_CLASSES} is "
                             f"{info.num_classes}. {FIX}")


def require(info: CheckpointInfo, source: str | Path, *names: str) -> None:
    """Refuse a file that lacks fields the caller needs, naming the first missing key."""
    for name in names:
        if getattr(info, name) is None:
            raise FinegrainError(f"{source}: metadata {_FIELDS[name][0]} is missing. {FIX}")


def read_header(path: str | Path) -> SafetensorsHeader:
    """Metadata and tensor entries of a safetensors file, its header length checked against the
    file and the limit before anything is parsed; nothing is loaded."""
    path = Path(path)
    if not path.is_file():
        raise FinegrainError(f"Weights file {path} does not exist. Pass the path of a .safetensors or .pth file.")
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
        size = path.stat().st_size
    except OSError as error:
        raise FinegrainError(f"{path} cannot be read ({error.strerror}). Check its permissions.") from None
    if len(head) < 8:
        raise FinegrainError(f"{path} is too short to be a safetensors file ({size} bytes). {FIX}")
    (length,) = struct.unpack("<Q", head)
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise FinegrainError(f"{path}: its header claims {length} bytes, more than the file's {size} or the "
                             f"limit of {MAX_HEADER_BYTES}. {FIX}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {}
            for name in handle.keys():
                entry = handle.get_slice(name)
                tensors[name] = TensorEntry(str(entry.get_dtype()), tuple(int(n) for n in entry.get_shape()))
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise FinegrainError(f"{path} is not a readable safetensors file ({str(error)[:200]}). {FIX}") from None
    return SafetensorsHeader(path, metadata, tensors)


def read_info(path: str | Path) -> CheckpointInfo:
    """The validated CheckpointInfo of a safetensors file, from its header alone."""
    return parse_metadata(read_header(path).metadata, path)


# ------------------------------------------------------------------------------- class check
def check_classes(info: CheckpointInfo, classes: Sequence[str], who: str, data: str, fix: str) -> None:
    """Refuse data whose classes are not those `who` was made for: their count, then their names
    and order where it records them. A head's rows mean nothing on another class list.

    `who` names the file ("The teacher X"), `data` the data set ("the training data"), `fix`
    says what to do instead (one sentence).
    """
    ours = list(classes)
    if info.num_classes is not None and info.num_classes != len(ours):
        raise FinegrainError(f"{who} predicts {info.num_classes} classes, {data} has {len(ours)}. {fix}.")
    if info.classes is None or list(info.classes) == ours:
        return
    theirs = list(info.classes)
    position = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), None)
    if position is not None:
        detail = f"it has class {position} {theirs[position]!r} where {data} has {ours[position]!r}"
    elif len(theirs) > len(ours):
        detail = f"it also has {theirs[len(ours)]!r}"
    else:
        detail = f"{data} also has {ours[len(theirs)]!r}"
    raise FinegrainError(f"{who} was trained on {len(theirs)} classes that differ from the {len(ours)} classes "
                         f"of {data} ({detail}). {fix}.")
