"""Read TF1 checkpoints (the "tensor bundle" format) without TensorFlow.

A checkpoint `PREFIX` is `PREFIX.index` plus `PREFIX.data-NNNNN-of-MMMMM` shards. The index is
a LevelDB-style sorted table: key "" holds a BundleHeaderProto and every other key is a tensor
name whose value is a BundleEntryProto saying where that tensor's raw bytes lie in which shard.
The index is small and parsed whole; tensors are read one at a time, so converting a
full-size checkpoint never holds more than one tensor in memory.

Checkpoints come from strangers, so nothing in the index is trusted: the header, every entry's
dtype, shape, shard, offset and size are checked against sane limits and the shards' real
lengths while the index is parsed, before anything is allocated on their word.

Layout references: tensorflow/core/protobuf/tensor_bundle.proto (records),
tensorflow/core/util/tensor_bundle/tensor_bundle.cc (shard names, masked CRC32C of each
tensor's bytes); the table itself is decoded by finegrain.convert.sstable.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from finegrain.convert.sstable import (
    WIRE_BYTES, WIRE_FIXED32, WIRE_VARINT, FormatError, decode_message, int32_field, masked_crc32c,
    read_table,
)
from finegrain.errors import FinegrainError

TF2_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
TF2_ATTRIBUTES_MARK = "/.ATTRIBUTES/"
TF1_SAVE_HINT = (
    "Load the model in TensorFlow and write a TF1 name-based checkpoint with "
    "tf.compat.v1.train.Saver(var_list={graph_name: variable, ...}).save(None, PREFIX), "
    "using the release graph's variable names (e.g. 'resnet_model/stage0/conv2d/kernel')"
)
# Sane limits, far above any real checkpoint (the index of 100,000 variables is ~6 MB).
MAX_INDEX_BYTES = 16 << 20
MAX_SHARDS = 99_999  # DataFilename writes the shard count with five digits
MAX_RANK = 32  # numpy's oldest supported limit; TF weights have rank <= 5
MAX_ELEMENTS = 1 << 40  # per tensor, counting empty dimensions as 1
MAX_STATE_FILE_BYTES = 1 << 20  # the `checkpoint` text file names a few paths
TENSOR_BUNDLE_VERSION = 1  # tensor_bundle.h kTensorBundleVersion

# tensorflow/core/framework/types.proto DataType values that are plain numpy arrays.
NUMPY_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.float64),
    3: np.dtype(np.int32),
    4: np.dtype(np.uint8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int8),
    8: np.dtype(np.complex64),
    9: np.dtype(np.int64),
    10: np.dtype(np.bool_),
    17: np.dtype(np.uint16),
    18: np.dtype(np.complex128),
    19: np.dtype(np.float16),
    22: np.dtype(np.uint32),
    23: np.dtype(np.uint64),
}
DT_BFLOAT16 = 14  # stored as the top 16 bits of a float32; read() upcasts exactly to float32
UNSUPPORTED_DTYPES = {
    7: "string", 11: "qint8", 12: "quint8", 13: "qint32", 15: "qint16", 16: "quint16",
    20: "resource", 21: "variant", 24: "float8_e5m2", 25: "float8_e4m3fn", 26: "float8_e4m3fnuz",
    27: "float8_e4m3b11fnuz", 28: "float8_e5m2fnuz", 29: "int4", 30: "uint4", 31: "int2", 32: "uint2",
}
KNOWN_DTYPES = {*NUMPY_DTYPES, DT_BFLOAT16, *UNSUPPORTED_DTYPES}
# Each element takes at least a byte on disk (strings a length byte), which bounds every shape.
MIN_BYTES_PER_ELEMENT = 1

HEADER_SCHEMA = {1: ("num_shards", WIRE_VARINT, False), 2: ("endianness", WIRE_VARINT, False),
                 3: ("version", WIRE_BYTES, False)}
VERSION_SCHEMA = {1: ("producer", WIRE_VARINT, False), 2: ("min_consumer", WIRE_VARINT, False)}
ENTRY_SCHEMA = {1: ("dtype", WIRE_VARINT, False), 2: ("shape", WIRE_BYTES, False),
                3: ("shard_id", WIRE_VARINT, False), 4: ("offset", WIRE_VARINT, False),
                5: ("size", WIRE_VARINT, False), 6: ("crc32c", WIRE_FIXED32, False),
                7: ("slices", WIRE_BYTES, True)}
SHAPE_SCHEMA = {2: ("dim", WIRE_BYTES, True), 3: ("unknown_rank", WIRE_VARINT, False)}
DIM_SCHEMA = {1: ("size", WIRE_VARINT, False)}


def dtype_name(tf_dtype: int) -> str:
    """The TF name of a DataType value ('float32', 'bfloat16', 'string', ...)."""
    if tf_dtype == DT_BFLOAT16:
        return "bfloat16"
    if tf_dtype in NUMPY_DTYPES:
        return NUMPY_DTYPES[tf_dtype].name
    return UNSUPPORTED_DTYPES.get(tf_dtype, f"unknown DataType {tf_dtype}")


@dataclass(frozen=True)
class BundleEntry:
    """One BundleEntryProto: where a tensor's bytes are and how to check them."""

    tf_dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked CRC32C of the tensor's bytes, as TF stores it
    num_slices: int  # > 0 for a partitioned variable (its data lives under slice keys)

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


def parse_entry(value: bytes) -> BundleEntry:
    """Decode a BundleEntryProto; a merged repeated `shape` field concatenates dims, as in TF."""
    fields = decode_message(value, ENTRY_SCHEMA)
    shape = decode_message(fields.get("shape", b""), SHAPE_SCHEMA)
    if shape.get("unknown_rank"):
        raise FormatError("shape of unknown rank")
    if len(shape["dim"]) > MAX_RANK:
        raise FormatError(f"shape with {len(shape['dim'])} dimensions, more than {MAX_RANK}")
    return BundleEntry(
        tf_dtype=int32_field(fields, "dtype"),
        shape=tuple(decode_message(dim, DIM_SCHEMA).get("size", 0) for dim in shape["dim"]),
        shard_id=int32_field(fields, "shard_id"), offset=fields.get("offset", 0), size=fields.get("size", 0),
        crc32c=fields.get("crc32c", 0), num_slices=len(fields["slices"]),
    )


def entry_problem(entry: BundleEntry, num_shards: int) -> str | None:
    """What makes an entry impossible, judged without the shards; None if nothing does."""
    if entry.tf_dtype not in KNOWN_DTYPES:
        return f"has {dtype_name(entry.tf_dtype)}"
    if any(dim < 0 for dim in entry.shape):
        return f"has shape {list(entry.shape)} with a negative dimension"
    if math.prod(max(dim, 1) for dim in entry.shape) > MAX_ELEMENTS:
        return f"has shape {list(entry.shape)}, more than 2**40 elements"
    if entry.offset < 0 or entry.size < 0:
        return f"has offset {entry.offset} and size {entry.size}; neither may be negative"
    if entry.num_slices:
        return None  # a partitioned variable's entry holds no bytes; its shape is checked later
    if not 0 <= entry.shard_id < num_shards:
        return f"names shard {entry.shard_id} of {num_shards}"
    if entry.tf_dtype == DT_BFLOAT16 or entry.tf_dtype in NUMPY_DTYPES:
        itemsize = 2 if entry.tf_dtype == DT_BFLOAT16 else NUMPY_DTYPES[entry.tf_dtype].itemsize
        if entry.size != entry.num_elements * itemsize:
            return (f"has {entry.size} bytes but shape {list(entry.shape)} of {dtype_name(entry.tf_dtype)} "
                    f"needs {entry.num_elements * itemsize}")
    elif entry.num_elements * MIN_BYTES_PER_ELEMENT > entry.size:
        return f"has shape {list(entry.shape)}, more elements than its {entry.size} bytes can hold"
    return None


def resolve_prefix(path: str | Path) -> Path:
    """Accept what users naturally pass: the prefix, its .index or .data-* file, or a folder
    holding a TF `checkpoint` state file (which names the latest prefix)."""
    path = Path(path)
    if path.is_dir():
        return _prefix_from_folder(path)
    name = re.sub(r"\.(index|data-\d{5}-of-\d{5})$", "", path.name)
    return path.with_name(name) if name else path


def _prefix_from_folder(folder: Path) -> Path:
    state = folder / "checkpoint"
    if state.is_file():
        with open(state, "rb") as handle:
            text = handle.read(MAX_STATE_FILE_BYTES).decode("utf-8", errors="replace")
        match = re.search(r'^model_checkpoint_path:\s*"([^"\n]+)"', text, re.MULTILINE)
        if match:
            return folder / match.group(1)  # an absolute stored path replaces `folder`
        raise FinegrainError(
            f"{state} names no checkpoint (no 'model_checkpoint_path: \"...\"' line). Pass the "
            "checkpoint prefix instead (e.g. FOLDER/model.ckpt-N)."
        )
    found = sorted(p.name.removesuffix(".index") for p in folder.glob("*.index"))[:5]
    hint = f" This folder holds: {', '.join(found)}." if found else ""
    raise FinegrainError(
        f"{folder} is a folder without a TF 'checkpoint' file. Pass the checkpoint prefix "
        f"(e.g. {folder}/model.ckpt-N for model.ckpt-N.index + its .data-* files).{hint}"
    )


def shard_path(prefix: Path, shard_id: int, num_shards: int) -> Path:
    """Data shard file name as tensor_bundle.cc's DataFilename writes it."""
    return Path(f"{prefix}.data-{shard_id:05d}-of-{num_shards:05d}")


class TensorBundle:
    """A TF1 checkpoint opened for streaming reads: metadata up front, tensors on demand.

    Opening validates everything that can be checked without reading tensor data (index
    structure and checksums, every entry against the limits, shard files present, every entry
    inside its shard), so a broken checkpoint fails before a long conversion starts rather than
    halfway through it, and a crafted one before it costs memory.
    """

    def __init__(self, prefix: str | Path, verify_checksums: bool = True):
        self.prefix = resolve_prefix(prefix)
        self.verify_checksums = verify_checksums
        self.index_path = Path(f"{self.prefix}.index")
        if not self.index_path.is_file():
            raise FinegrainError(
                f"No checkpoint index at {self.index_path}. Pass the checkpoint prefix (e.g. "
                "'model.ckpt-N' for model.ckpt-N.index + model.ckpt-N.data-00000-of-00001), "
                "the .index file, or the folder holding the 'checkpoint' file."
            )
        if self.index_path.stat().st_size > MAX_INDEX_BYTES:
            raise FinegrainError(
                f"{self.index_path} is {self.index_path.stat().st_size} bytes, more than any TF checkpoint "
                f"index ({MAX_INDEX_BYTES >> 20} MiB). Pass the small .index file of a TF1 checkpoint."
            )
        self._entries: dict[str, BundleEntry] = {}
        self.num_shards = self._parse_index(self.index_path.read_bytes())
        self._check_not_object_based()
        self._shards: dict[int, BinaryIO] = {}
        self._check_shards()

    def _parse_index(self, data: bytes) -> int:
        """Fill self._entries from the index, checking each entry as it comes; returns the shard count."""
        name = ""
        try:
            items = read_table(data, self.verify_checksums)
            key, header_value = next(items, (None, b""))
            if key != b"":
                raise FinegrainError(
                    f"{self.index_path} has no tensor-bundle header: it is not a TF1 V2-format "
                    "checkpoint (maybe an old V1 '.ckpt' file). Re-save it with "
                    "tf.compat.v1.train.Saver(write_version=tf.compat.v1.train.SaverDef.V2)."
                )
            num_shards = self._check_header(decode_message(header_value, HEADER_SCHEMA))
            for key, value in items:
                if key.startswith(b"\x00"):
                    continue  # slice keys of partitioned variables, which read() refuses
                name = key.decode("utf-8")
                entry = parse_entry(value)
                problem = entry_problem(entry, num_shards)
                if problem:
                    raise FinegrainError(
                        f"Checkpoint index {self.index_path} is corrupt: tensor '{name}' {problem}. "
                        "Copy or download the checkpoint again completely."
                    )
                self._entries[name] = entry
                name = ""
        except (FormatError, UnicodeDecodeError) as error:
            where = f"tensor '{name}': " if name else ""
            raise FinegrainError(
                f"{self.index_path} is not a readable TensorFlow checkpoint index ({where}{error}). "
                "Pass the index of a TF1 checkpoint written by tf.train.Saver; if it was copied or "
                "downloaded, copy it again completely."
            ) from None
        return num_shards

    def _check_header(self, header: dict[str, Any]) -> int:
        num_shards = int32_field(header, "num_shards", default=1)
        if not 1 <= num_shards <= MAX_SHARDS:
            raise FormatError(f"header names {num_shards} data shards; TF writes 1 to {MAX_SHARDS}")
        endianness = int32_field(header, "endianness")
        if endianness == 1:
            raise FinegrainError(
                f"{self.index_path} was written on a big-endian machine. Re-save the checkpoint "
                "with TensorFlow on a little-endian (x86/ARM) machine."
            )
        if endianness != 0:
            raise FormatError(f"header endianness {endianness} is neither little (0) nor big (1)")
        version = decode_message(header.get("version", b""), VERSION_SCHEMA)
        if int32_field(version, "min_consumer") > TENSOR_BUNDLE_VERSION:
            raise FinegrainError(
                f"{self.index_path} needs a tensor-bundle reader of version "
                f"{version['min_consumer']}; finegrain reads version {TENSOR_BUNDLE_VERSION}. Re-save "
                "the checkpoint with tf.compat.v1.train.Saver in TensorFlow 1.x or 2.x."
            )
        return num_shards

    def _check_not_object_based(self) -> None:
        object_names = [n for n in self._entries if TF2_ATTRIBUTES_MARK in n]
        if TF2_OBJECT_GRAPH_KEY in self._entries or object_names:
            example = object_names[0] if object_names else TF2_OBJECT_GRAPH_KEY
            raise FinegrainError(
                f"{self.prefix} is a TensorFlow 2 object-based checkpoint (tf.train.Checkpoint / "
                f"Keras, names like '{example}'), not a TF1 name-based one, so its variable "
                f"names do not follow the release graph. {TF1_SAVE_HINT}."
            )

    def _check_shards(self) -> None:
        sizes = []
        for shard_id in range(self.num_shards):  # stops at the first missing file
            path = self.shard_path(shard_id)
            if not path.is_file():
                raise FinegrainError(
                    f"Checkpoint data shard {path.name} is missing (expected at {path}). "
                    f"Copy all {self.num_shards} '{self.prefix.name}.data-*' files "
                    "next to the .index file."
                )
            sizes.append(path.stat().st_size)
        for name, entry in self._entries.items():
            if entry.num_slices:
                if entry.num_elements * MIN_BYTES_PER_ELEMENT > sum(sizes):
                    raise FinegrainError(
                        f"Checkpoint index {self.index_path} is corrupt: partitioned tensor '{name}' has "
                        f"shape {list(entry.shape)}, more elements than all data shards hold. "
                        "Copy or download the checkpoint again completely."
                    )
            elif entry.offset + entry.size > sizes[entry.shard_id]:
                raise FinegrainError(
                    f"Checkpoint data shard {self.shard_path(entry.shard_id)} is truncated: tensor "
                    f"'{name}' needs bytes {entry.offset}..{entry.offset + entry.size} but the file "
                    f"has {sizes[entry.shard_id]}. Copy the checkpoint again completely."
                )

    def shard_path(self, shard_id: int) -> Path:
        return shard_path(self.prefix, shard_id, self.num_shards)

    def __enter__(self) -> TensorBundle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the shard files opened by read()."""
        for handle in self._shards.values():
            handle.close()
        self._shards.clear()

    def names(self) -> list[str]:
        """Every tensor name, in the index's (byte-sorted) order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> BundleEntry:
        """The validated index record of `name` (dtype, shape, slices), or a clear error."""
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f"Close names: {', '.join(close)}" if close else "List them with names()"
            message = f"No tensor '{name}' in checkpoint {self.prefix}. {hint}."
            raise FinegrainError(message) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        """The dtype read() returns (bfloat16 is upcast, exactly, to float32)."""
        entry = self.entry(name)
        stored = self._stored_dtype(name, entry)
        return np.dtype(np.float32) if entry.tf_dtype == DT_BFLOAT16 else stored

    def read(self, name: str) -> np.ndarray:
        """Read one tensor's bytes from its shard, check its CRC32C, return a writable array."""
        entry = self.entry(name)
        stored = self._stored_dtype(name, entry)
        if entry.num_slices:
            raise FinegrainError(
                f"Tensor '{name}' is a partitioned variable ({entry.num_slices} slices), which "
                "finegrain does not reassemble. Re-save the checkpoint with unpartitioned "
                "variables."
            )
        buffer = bytearray(entry.size)  # opening checked size == shape x itemsize <= the shard's length
        handle = self._shard(entry.shard_id)
        handle.seek(entry.offset)
        if handle.readinto(buffer) != entry.size:
            raise FinegrainError(
                f"Checkpoint data shard {self.shard_path(entry.shard_id)} ended inside tensor "
                f"'{name}'. Copy the checkpoint again completely."
            )
        if self.verify_checksums and masked_crc32c(buffer) != entry.crc32c:
            raise FinegrainError(
                f"Checksum mismatch for tensor '{name}' in {self.shard_path(entry.shard_id)}: "
                "the data file is corrupt. Copy or download the checkpoint again."
            )
        array = np.frombuffer(buffer, dtype=stored).reshape(entry.shape)
        if entry.tf_dtype == DT_BFLOAT16:
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def _stored_dtype(self, name: str, entry: BundleEntry) -> np.dtype:
        """The dtype of the bytes on disk (bfloat16 as its raw uint16 bit patterns)."""
        if entry.tf_dtype == DT_BFLOAT16:
            return np.dtype(np.uint16)
        if entry.tf_dtype in NUMPY_DTYPES:
            return NUMPY_DTYPES[entry.tf_dtype]
        raise FinegrainError(
            f"Tensor '{name}' has dtype {dtype_name(entry.tf_dtype)}, which is not a numeric weight "
            "array. Skip it when converting (only numeric variables map to model parameters)."
        )

    def _shard(self, shard_id: int) -> BinaryIO:
        if shard_id not in self._shards:
            self._shards[shard_id] = open(self.shard_path(shard_id), "rb")
        return self._shards[shard_id]
