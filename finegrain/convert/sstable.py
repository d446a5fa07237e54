"""Bounded decoders for the two encodings a TF checkpoint index is made of: LevelDB-style sorted
tables and protobuf messages.

Every length, count and offset read from the file is checked against the bytes actually there
before it is used, so a crafted file costs time and memory in proportion to its own size: data
blocks may not overlap (an index block cannot make us parse one block many times), keys must
strictly increase (no duplicates, no keys that only repeat a shared prefix), and the keys that
prefix compression expands are held to a budget proportional to the file.

Layout references: leveldb table/{format,block}.cc, table_format.md; protobuf encoding guide.
"""
from __future__ import annotations

from typing import Any, Iterator

import crc32c

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two varint block handles padded to 40 bytes, then the 8-byte magic
BLOCK_TRAILER_SIZE = 5  # 1-byte compression type + 4-byte masked CRC32C
MIN_BLOCK_SIZE = 4  # the restart count alone
CRC_MASK_DELTA = 0xA282EAD8
# Prefix compression lets a few bytes stand for a long key; more expanded key bytes than this
# (times the file size) is no real index (real ones stay under 4x) but a memory bomb.
KEY_EXPANSION_LIMIT = 16
KEY_BYTES_ALLOWANCE = 1 << 20

WIRE_VARINT, WIRE_FIXED64, WIRE_BYTES, WIRE_FIXED32 = 0, 1, 2, 5
INT32_RANGE = range(-(1 << 31), 1 << 31)


class FormatError(Exception):
    """Malformed bytes; the reader that knows the file's name turns it into a FinegrainError."""


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """LevelDB/TF CRC32C mask: stored checksums are rotated and offset so that a CRC of data
    that itself contains CRCs does not degenerate."""
    crc = crc32c.crc32c(data)  # any buffer, no copy; SSE4.2/ARMv8 instructions where present
    return (((crc >> 15) | (crc << 17)) + CRC_MASK_DELTA) & 0xFFFFFFFF


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint of at most 64 bits at `pos`; returns (value, next position)."""
    if pos < len(buf) and buf[pos] < 0x80:  # one byte: most tags, lengths and small numbers
        return buf[pos], pos + 1
    value = 0
    for shift in range(0, 64, 7):
        if pos >= len(buf):
            raise FormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 64:
                break
            return value, pos
    raise FormatError("varint longer than 64 bits")


def decode_message(buf: bytes, schema: dict[int, tuple[str, int, bool]]) -> dict[str, Any]:
    """Decode a protobuf message whose fields are `schema`: number -> (name, wire type, repeated).

    Varints come back as signed int64 (how protobuf stores int32/int64/enum), fixed32 as an
    unsigned int, length-delimited fields as bytes; repeated fields as lists. A known field with
    the wrong wire type is an error; unknown fields are skipped, as protobuf does.
    """
    values: dict[str, Any] = {name: [] for name, _, repeated in schema.values() if repeated}
    pos = 0
    while pos < len(buf):
        tag, pos = read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise FormatError("protobuf field number 0")
        if wire == WIRE_VARINT:
            value, pos = read_varint(buf, pos)
            value = value - (1 << 64) if value >> 63 else value
        elif wire in (WIRE_FIXED64, WIRE_FIXED32):
            width = 8 if wire == WIRE_FIXED64 else 4
            if pos + width > len(buf):
                raise FormatError("truncated fixed-width protobuf field")
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        elif wire == WIRE_BYTES:
            length, pos = read_varint(buf, pos)
            if length > len(buf) - pos:
                raise FormatError("length-delimited protobuf field runs past its message")
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise FormatError(f"unsupported protobuf wire type {wire}")
        if number not in schema:
            continue
        name, expected_wire, repeated = schema[number]
        if wire != expected_wire:
            raise FormatError(f"field '{name}' has protobuf wire type {wire}, expected {expected_wire}")
        if repeated:
            values[name].append(value)
        else:
            values[name] = value  # proto3: the last occurrence wins
    return values


def int32_field(message: dict[str, Any], name: str, default: int = 0) -> int:
    """An int32/enum field: protobuf truncates wider varints, a valid writer never sends them."""
    value = message.get(name, default)
    if value not in INT32_RANGE:
        raise FormatError(f"field '{name}' is {value}, outside the int32 range")
    return value


class _KeyBudget:
    """Bytes that prefix-compressed keys may still expand to, shared by every block of a table."""

    def __init__(self, file_size: int):
        self.left = KEY_EXPANSION_LIMIT * file_size + KEY_BYTES_ALLOWANCE

    def spend(self, key_length: int) -> None:
        self.left -= key_length
        if self.left < 0:
            raise FormatError("prefix-compressed keys expand to far more bytes than the file holds")


def read_table(data: bytes, verify_checksums: bool) -> Iterator[tuple[bytes, bytes]]:
    """Yield the (key, value) pairs of a LevelDB-style table in stored order, checking that keys
    strictly increase; raises FormatError on any structural problem."""
    if len(data) < FOOTER_SIZE or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise FormatError("bad table magic number")
    footer = data[-FOOTER_SIZE:-8]
    _, pos = read_varint(footer, 0)  # metaindex offset: TF writes no filters, nothing to read
    _, pos = read_varint(footer, pos)
    index_offset, pos = read_varint(footer, pos)
    index_size, _ = read_varint(footer, pos)
    budget = _KeyBudget(len(data))
    index_block = _read_block(data, index_offset, index_size, verify_checksums)
    next_free, previous = 0, None
    for _, handle in _block_items(index_block, budget):
        offset, pos = read_varint(handle, 0)
        size, _ = read_varint(handle, pos)
        if offset < next_free:
            raise FormatError(f"data block at byte {offset} overlaps the block before it")
        next_free = offset + size + BLOCK_TRAILER_SIZE
        for key, value in _block_items(_read_block(data, offset, size, verify_checksums), budget):
            if previous is not None and key <= previous:
                kind = "duplicate" if key == previous else "out-of-order"
                raise FormatError(f"{kind} key {key[:80]!r}: table keys must strictly increase")
            previous = key
            yield key, value


def _read_block(data: bytes, offset: int, size: int, verify_checksums: bool) -> bytes:
    end = offset + size
    if size < MIN_BLOCK_SIZE or end + BLOCK_TRAILER_SIZE > len(data) - FOOTER_SIZE:
        raise FormatError(f"block of {size} bytes at byte {offset} does not fit in the file")
    compression = data[end]
    if verify_checksums:
        stored = int.from_bytes(data[end + 1:end + BLOCK_TRAILER_SIZE], "little")
        if masked_crc32c(memoryview(data)[offset:end + 1]) != stored:
            raise FormatError(f"checksum mismatch in the block at byte {offset}")
    if compression != 0:
        raise FormatError(f"compressed block (type {compression}); TF writes bundles uncompressed")
    return data[offset:end]


def _block_items(block: bytes, budget: _KeyBudget) -> Iterator[tuple[bytes, bytes]]:
    """Entries are (shared key prefix length, unshared length, value length, key suffix,
    value); a trailing uint32 array of restart points (then their count) ends the block."""
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 * (num_restarts + 1)
    if limit < 0:
        raise FormatError(f"block claims {num_restarts} restart points, more than it can hold")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        value_len, pos = read_varint(block, pos)
        if shared > len(key) or unshared > limit - pos or value_len > limit - pos - unshared:
            raise FormatError("block entry runs past the end of its block")
        budget.spend(shared + unshared)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len
