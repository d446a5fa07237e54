"""A minimal, independent writer (and lenient decoder) of TF tensor bundles, for tests and fuzzing.

It builds what TensorFlow cannot be asked for here: TF2 object-based names, every dtype,
several shards, small blocks, and CRC-correct but hostile files (wrong wire types, negative or
overflowing dimensions, huge shard counts, duplicate keys). The decoder reads a table back
without judging it, so that the fuzzer's mutator can edit a file's records and re-encode it
with valid checksums. Written from the format description, not from finegrain's reader.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np

TABLE_MAGIC = struct.pack("<Q", 0xDB4775248B80FB57)
# tensorflow/core/framework/types.proto, written out independently of the reader's table.
TF_DTYPE_OF = {
    "float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6,
    "complex64": 8, "int64": 9, "bool": 10, "uint16": 17, "complex128": 18, "float16": 19,
    "uint32": 22, "uint64": 23,
}
DT_STRING, DT_BFLOAT16 = 7, 14
Items = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class RawTensor:
    """A tensor given as TF dtype + bytes, for dtypes numpy lacks (bfloat16, string)."""

    tf_dtype: int
    shape: tuple[int, ...]
    data: bytes
    num_slices: int = 0


# ---------------------------------------------------------------- protobuf
def varint(value: int) -> bytes:
    """Base-128 varint; negative numbers as protobuf writes int64 (ten bytes, two's complement)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def field_fixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<I", value & 0xFFFFFFFF)


def header_proto(num_shards: int = 1, endianness: int = 0) -> bytes:
    return field_varint(1, num_shards) + field_varint(2, endianness) + field_bytes(3, field_varint(1, 1))


def shape_proto(shape: tuple[int, ...]) -> bytes:
    return b"".join(field_bytes(2, field_varint(1, d)) for d in shape)


def entry_proto(tf_dtype: int, shape: tuple[int, ...], shard: int, offset: int, size: int, crc: int,
                num_slices: int = 0) -> bytes:
    return (field_varint(1, tf_dtype) + field_bytes(2, shape_proto(shape)) + field_varint(3, shard)
            + field_varint(4, offset) + field_varint(5, size) + field_fixed32(6, crc)
            + b"".join(field_bytes(7, b"") for _ in range(num_slices)))


def decode_fields(buf: bytes) -> list[tuple[int, int, int | bytes]] | None:
    """(field number, wire type, value) of every field, or None if `buf` is no message at all."""
    fields, pos = [], 0
    try:
        while pos < len(buf):
            tag, pos = _varint_at(buf, pos)
            wire = tag & 7
            if wire == 0:
                value, pos = _varint_at(buf, pos)
            elif wire in (1, 5):
                width = 8 if wire == 1 else 4
                value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
            elif wire == 2:
                length, pos = _varint_at(buf, pos)
                value, pos = buf[pos:pos + length], pos + length
            else:
                return None
            if pos > len(buf):
                return None
            fields.append((tag >> 3, wire, value))
    except IndexError:
        return None
    return fields


def encode_fields(fields: list[tuple[int, int, int | bytes]]) -> bytes:
    """Inverse of decode_fields; a value that does not suit its wire type is written anyway
    (bytes length-delimited, ints as varint or fixed width), which is how hostile files are made."""
    out = bytearray()
    for number, wire, value in fields:
        out += varint(number << 3 | wire)
        if isinstance(value, bytes):
            out += varint(len(value)) + value
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            out += (value % (1 << 8 * width)).to_bytes(width, "little")
        else:
            out += varint(value)
    return bytes(out)


def _varint_at(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80 or shift > 70:
            return value, pos
        shift += 7


# ---------------------------------------------------------------- LevelDB table
def masked(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def encode_block(items: Items, restart_interval: int) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value))
        out += key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f"<{len(restarts) + 1}I", *restarts, len(restarts))


def frame(block: bytes, compression: int = 0) -> bytes:
    """A block as stored: contents, compression type, masked CRC32C of both."""
    stored = block + bytes([compression])
    return stored + struct.pack("<I", masked(stored))


def assemble_table(region: bytes, index_items: Items) -> bytes:
    """Framed data blocks (`region`), then the metaindex, an index block of the given
    (key, handle) items, taken as they are, and the footer."""
    metaindex, index = encode_block([], 1), encode_block(index_items, 1)
    handles = varint(len(region)) + varint(len(metaindex))
    handles += varint(len(region) + len(metaindex) + 5) + varint(len(index))
    return region + frame(metaindex) + frame(index) + handles.ljust(40, b"\x00") + TABLE_MAGIC


def wrap_blocks(contents: list[bytes], index_keys: list[bytes] | None = None, compression: int = 0) -> bytes:
    """A table from raw data-block contents, each framed with a valid CRC and named in the index."""
    region, index = bytearray(), []
    for i, block in enumerate(contents):
        key = index_keys[i] if index_keys else b"\xff" * (i + 1)
        index.append((key, varint(len(region)) + varint(len(block))))
        region += frame(block, compression)
    return assemble_table(bytes(region), index)


def encode_table(items: Items, block_items: int = 7, restart_interval: int = 3) -> bytes:
    """LevelDB table: data blocks of `block_items` entries, metaindex, index, footer + magic."""
    chunks = [items[start:start + block_items] for start in range(0, len(items), max(block_items, 1))]
    return wrap_blocks([encode_block(chunk, restart_interval) for chunk in chunks], [c[-1][0] for c in chunks])


def write_table(path: Path, items: Items, block_items: int = 7, restart_interval: int = 3) -> None:
    path.write_bytes(encode_table(items, block_items, restart_interval))


def decode_blocks(data: bytes) -> list[Items] | None:
    """The items of every data block, unjudged (no checksum, order or budget checks); None if
    the bytes are not even shaped like a table."""
    try:
        if len(data) < 48 or data[-8:] != TABLE_MAGIC:
            return None
        footer = data[-48:-8]
        _, pos = _varint_at(footer, 0)
        _, pos = _varint_at(footer, pos)
        index_offset, pos = _varint_at(footer, pos)
        index_size, _ = _varint_at(footer, pos)
        blocks = []
        for _, handle in _items(data[index_offset:index_offset + index_size]):
            offset, pos = _varint_at(handle, 0)
            size, _ = _varint_at(handle, pos)
            blocks.append(_items(data[offset:offset + size]))
        return blocks
    except (IndexError, ValueError):
        return None


def _items(block: bytes) -> Items:
    if len(block) < 4:
        raise ValueError("short block")
    limit = len(block) - 4 * (int.from_bytes(block[-4:], "little") + 1)
    items, pos, key = [], 0, b""
    while 0 <= pos < limit and len(items) < 100_000:
        shared, pos = _varint_at(block, pos)
        unshared, pos = _varint_at(block, pos)
        value_len, pos = _varint_at(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        items.append((key, block[pos:pos + value_len]))
        pos += value_len
    return items


# ---------------------------------------------------------------- whole bundles
def write_bundle(prefix: Path, tensors: dict[str, np.ndarray | RawTensor], num_shards: int = 1,
                 endianness: int = 0) -> None:
    """Tensors go round-robin to the shards; entries are keyed by name, header under ""."""
    shards = [bytearray() for _ in range(num_shards)]
    items = [(b"", header_proto(num_shards, endianness))]
    for i, name in enumerate(sorted(tensors, key=str.encode)):
        tensor = tensors[name]
        if isinstance(tensor, np.ndarray):
            tensor = RawTensor(TF_DTYPE_OF[tensor.dtype.name], tensor.shape, tensor.tobytes())
        shard = i % num_shards
        items.append((name.encode(), entry_proto(tensor.tf_dtype, tensor.shape, shard, len(shards[shard]),
                                                 len(tensor.data), masked(tensor.data), tensor.num_slices)))
        shards[shard] += tensor.data
    write_table(Path(f"{prefix}.index"), items)
    for shard, data in enumerate(shards):
        Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}").write_bytes(bytes(data))
