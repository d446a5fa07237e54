"""Read TF1 checkpoints (the "tensor bundle" format) without TensorFlow.

A checkpoint `PREFIX` is `PREFIX.index` plus `PREFIX.data-NNNNN-of-MMMMM` shards. The index is
a LevelDB-style sorted table: key "" holds a BundleHeaderProto and every other key is a tensor
name whose value is a BundleEntryProto saying where that tensor's raw bytes lie in which shard.
The index is small and parsed whole; tensors are read one at a time, so converting a
full-size checkpoint never holds more than one tensor in memory.

Layout references: tensorflow/core/lib/io/{format,block}.cc (table),
tensorflow/core/protobuf/tensor_bundle.proto (records), tensorflow/core/util/tensor_bundle/
tensor_bundle.cc (shard names, masked CRC32C of each tensor's bytes).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import crc32c
import numpy as np

from finegrain.errors import FinegrainError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two varint block handles padded to 40 bytes, then the 8-byte magic
BLOCK_TRAILER_SIZE = 5  # 1-byte compression type + 4-byte masked CRC32C
CRC_MASK_DELTA = 0xA282EAD8
TF2_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
TF2_ATTRIBUTES_MARK = "/.ATTRIBUTES/"
TF1_SAVE_HINT = (
    "Load the model in TensorFlow and write a TF1 name-based checkpoint with "
    "tf.compat.v1.train.Saver(var_list={graph_name: variable, ...}).save(None, PREFIX), "
    "using the release graph's variable names (e.g. 'resnet_model/stage0/conv2d/kernel')"
)

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
    20: "resource", 21: "variant",
}


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """LevelDB/TF CRC32C mask: stored checksums are rotated and offset so that a CRC of data
    that itself contains CRCs does not degenerate."""
    crc = crc32c.crc32c(data)  # any buffer, no copy; SSE4.2/ARMv8 instructions where present
    return (((crc >> 15) | (crc << 17)) + CRC_MASK_DELTA) & 0xFFFFFFFF


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at `pos`; returns (value, next position)."""
    value, shift = 0, 0
    while pos < len(buf) and shift < 70:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated or overlong varint")


def proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) of a serialized protobuf message: ints for varint/fixed
    wire types (varints as signed int64), bytes for length-delimited ones."""
    pos = 0
    while pos < len(buf):
        tag, pos = read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
            yield field, value - (1 << 64) if value >= 1 << 63 else value
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise ValueError("truncated fixed-width field")
            yield field, int.from_bytes(buf[pos:pos + width], "little")
            pos += width
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated length-delimited field")
            yield field, buf[pos:pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


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


def parse_entry(value: bytes) -> BundleEntry:
    """Decode a BundleEntryProto (fields: 1 dtype, 2 shape, 3 shard_id, 4 offset, 5 size,
    6 crc32c fixed32, 7 slices)."""
    fields: dict[int, int | bytes] = {}
    dims: list[int] = []
    num_slices = 0
    for field, field_value in proto_fields(value):
        if field == 2:  # TensorShapeProto: repeated Dim dim = 2 { int64 size = 1; string name = 2 }
            for shape_field, dim in proto_fields(field_value):
                if shape_field == 2:
                    dims.append(next((v for f, v in proto_fields(dim) if f == 1), 0))
        elif field == 7:
            num_slices += 1
        else:
            fields[field] = field_value
    return BundleEntry(
        tf_dtype=int(fields.get(1, 0)), shape=tuple(dims), shard_id=int(fields.get(3, 0)),
        offset=int(fields.get(4, 0)), size=int(fields.get(5, 0)), crc32c=int(fields.get(6, 0)),
        num_slices=num_slices,
    )


def read_table(data: bytes, verify_checksums: bool) -> Iterator[tuple[bytes, bytes]]:
    """Yield the (key, value) pairs of a LevelDB-style table in stored (sorted) order.

    Raises ValueError on any structural problem; the caller turns it into a FinegrainError.
    """
    if len(data) < FOOTER_SIZE or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise ValueError("bad table magic number")
    footer = data[-FOOTER_SIZE:]
    _, pos = read_varint(footer, 0)  # metaindex offset: TF writes no filters, nothing to read
    _, pos = read_varint(footer, pos)
    index_offset, pos = read_varint(footer, pos)
    index_size, _ = read_varint(footer, pos)
    index_block = _read_block(data, index_offset, index_size, verify_checksums)
    for _, handle in _block_items(index_block):
        offset, pos = read_varint(handle, 0)
        size, _ = read_varint(handle, pos)
        yield from _block_items(_read_block(data, offset, size, verify_checksums))


def _read_block(data: bytes, offset: int, size: int, verify_checksums: bool) -> bytes:
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(data) - FOOTER_SIZE:
        raise ValueError(f"block at byte {offset} runs past the end of the file")
    compression = data[end]
    if verify_checksums:
        stored = int.from_bytes(data[end + 1:end + BLOCK_TRAILER_SIZE], "little")
        if masked_crc32c(memoryview(data)[offset:end + 1]) != stored:
            raise ValueError(f"checksum mismatch in the block at byte {offset}")
    if compression != 0:
        raise ValueError(f"compressed block (type {compression}); TF writes bundles uncompressed")
    return data[offset:end]


def _block_items(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Entries are (shared key prefix length, unshared length, value length, key suffix,
    value); a trailing uint32 array of restart points (then their count) ends the block."""
    if len(block) < 4:
        raise ValueError("block too short")
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 * (num_restarts + 1)
    if limit < 0:
        raise ValueError("bad restart count in block")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        value_len, pos = read_varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise ValueError("block entry out of bounds")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


def resolve_prefix(path: str | Path) -> Path:
    """Accept what users naturally pass: the prefix, its .index or .data-* file, or a folder
    holding a TF `checkpoint` state file (which names the latest prefix)."""
    path = Path(path)
    state = path / "checkpoint"
    if path.is_dir() and state.is_file():
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"', state.read_text(), re.MULTILINE)
        if match:
            return path / match.group(1)  # an absolute stored path replaces `path`
    name = re.sub(r"\.(index|data-\d{5}-of-\d{5})$", "", path.name)
    return path.with_name(name) if name else path


def shard_path(prefix: Path, shard_id: int, num_shards: int) -> Path:
    """Data shard file name as tensor_bundle.cc's DataFilename writes it."""
    return Path(f"{prefix}.data-{shard_id:05d}-of-{num_shards:05d}")


class TensorBundle:
    """A TF1 checkpoint opened for streaming reads: metadata up front, tensors on demand.

    Opening validates everything that can be checked without reading tensor data (index
    checksums, shard files present, every entry inside its shard), so a broken checkpoint
    fails before a long conversion starts rather than halfway through it.
    """

    def __init__(self, prefix: str | Path, verify_checksums: bool = True):
        self.prefix = resolve_prefix(prefix)
        self.verify_checksums = verify_checksums
        index_path = Path(f"{self.prefix}.index")
        if not index_path.is_file():
            raise FinegrainError(
                f"No checkpoint index at {index_path}. Pass the checkpoint prefix (e.g. "
                "'model.ckpt-N' for model.ckpt-N.index + model.ckpt-N.data-00000-of-00001), "
                "the .index file, or the folder holding the 'checkpoint' file."
            )
        try:
            items = list(read_table(index_path.read_bytes(), verify_checksums))
            header_value = items[0][1] if items and items[0][0] == b"" else None
            self._entries = {
                key.decode("utf-8"): parse_entry(value)
                for key, value in items[1:] if not key.startswith(b"\x00")  # \x00: slice keys
            }
            header = dict(proto_fields(header_value)) if header_value is not None else None
        except (ValueError, TypeError, UnicodeDecodeError) as error:  # TypeError: wrong wire type
            raise FinegrainError(
                f"{index_path} is not a readable TensorFlow checkpoint index ({error}). Pass "
                "the index of a TF1 checkpoint written by tf.train.Saver; if it was copied, "
                "copy it again completely."
            ) from error
        if header is None:
            raise FinegrainError(
                f"{index_path} has no tensor-bundle header: it is not a TF1 V2-format "
                "checkpoint (maybe an old V1 '.ckpt' file). Re-save it with "
                "tf.compat.v1.train.Saver(write_version=tf.compat.v1.train.SaverDef.V2)."
            )
        self._check_not_object_based()
        if int(header.get(2, 0)) != 0:
            raise FinegrainError(
                f"{index_path} was written on a big-endian machine. Re-save the checkpoint "
                "with TensorFlow on a little-endian (x86/ARM) machine."
            )
        num_shards = int(header.get(1, 1))
        self._shard_paths = [shard_path(self.prefix, i, num_shards) for i in range(num_shards)]
        self._shards: dict[int, BinaryIO] = {}
        self._check_shards()

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
        for path in self._shard_paths:
            if not path.is_file():
                raise FinegrainError(
                    f"Checkpoint data shard {path.name} is missing (expected at {path}). "
                    f"Copy all {len(self._shard_paths)} '{self.prefix.name}.data-*' files "
                    "next to the .index file."
                )
        sizes = [path.stat().st_size for path in self._shard_paths]
        for name, entry in self._entries.items():
            if entry.num_slices:
                continue  # partitioned entries hold no data; read() reports them
            if not 0 <= entry.shard_id < len(sizes):
                raise FinegrainError(
                    f"Checkpoint index {self.prefix}.index is corrupt: tensor '{name}' names "
                    f"shard {entry.shard_id} of {len(sizes)}. Copy the checkpoint again."
                )
            if entry.offset < 0 or entry.offset + entry.size > sizes[entry.shard_id]:
                path = self._shard_paths[entry.shard_id]
                raise FinegrainError(
                    f"Checkpoint data shard {path} is truncated: tensor '{name}' needs bytes "
                    f"{entry.offset}..{entry.offset + entry.size} but the file has "
                    f"{sizes[entry.shard_id]}. Copy the checkpoint again completely."
                )

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

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        """The dtype read() returns (bfloat16 is upcast, exactly, to float32)."""
        entry = self._entry(name)
        stored = self._stored_dtype(name, entry)
        return np.dtype(np.float32) if entry.tf_dtype == DT_BFLOAT16 else stored

    def read(self, name: str) -> np.ndarray:
        """Read one tensor's bytes from its shard, check its CRC32C, return a writable array."""
        entry = self._entry(name)
        stored = self._stored_dtype(name, entry)
        if entry.num_slices:
            raise FinegrainError(
                f"Tensor '{name}' is a partitioned variable ({entry.num_slices} slices), which "
                "finegrain does not reassemble. Re-save the checkpoint with unpartitioned "
                "variables."
            )
        expected = int(np.prod(entry.shape, dtype=np.int64)) * stored.itemsize
        if entry.size != expected:
            raise FinegrainError(
                f"Tensor '{name}' has {entry.size} bytes in the index but shape {entry.shape} "
                f"of {stored} needs {expected}. The checkpoint index is corrupt; copy it again."
            )
        buffer = bytearray(entry.size)
        handle = self._shard(entry.shard_id)
        handle.seek(entry.offset)
        if handle.readinto(buffer) != entry.size:
            raise FinegrainError(
                f"Checkpoint data shard {self._shard_paths[entry.shard_id]} ended inside tensor "
                f"'{name}'. Copy the checkpoint again completely."
            )
        if self.verify_checksums and masked_crc32c(buffer) != entry.crc32c:
            raise FinegrainError(
                f"Checksum mismatch for tensor '{name}' in {self._shard_paths[entry.shard_id]}: "
                "the data file is corrupt. Copy or download the checkpoint again."
            )
        array = np.frombuffer(buffer, dtype=stored).reshape(entry.shape)
        if entry.tf_dtype == DT_BFLOAT16:
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def _entry(self, name: str) -> BundleEntry:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f"Close names: {', '.join(close)}" if close else "List them with names()"
            message = f"No tensor '{name}' in checkpoint {self.prefix}. {hint}."
            raise FinegrainError(message) from None

    def _stored_dtype(self, name: str, entry: BundleEntry) -> np.dtype:
        """The dtype of the bytes on disk (bfloat16 as its raw uint16 bit patterns)."""
        if entry.tf_dtype == DT_BFLOAT16:
            return np.dtype(np.uint16)
        if entry.tf_dtype in NUMPY_DTYPES:
            return NUMPY_DTYPES[entry.tf_dtype]
        kind = UNSUPPORTED_DTYPES.get(entry.tf_dtype, f"unknown DataType {entry.tf_dtype}")
        raise FinegrainError(
            f"Tensor '{name}' has dtype {kind}, which is not a numeric weight array. "
            "Skip it when converting (only numeric variables map to model parameters)."
        )

    def _shard(self, shard_id: int) -> BinaryIO:
        if shard_id not in self._shards:
            self._shards[shard_id] = open(self._shard_paths[shard_id], "rb")
        return self._shards[shard_id]
