"""MATLAB v5 annotation files (Stanford Cars, Oxford Flowers), checked before scipy reads them.

scipy.io.loadmat trusts the sizes a file declares: a 200-byte file that declares a cell array of
2^30 elements makes it allocate 8 GiB before it reads one element, a zlib stream can expand a
small file a thousandfold, and deep nesting recurses in C. So the element tree is walked first
(`check_mat`): every declared count is checked against the bytes that must hold it, compressed
variables are inflated with a cap, nesting and element counts are bounded. Only then does scipy
parse the same bytes, and the variables it returns are checked for type and shape by the readers.
"""
from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.data.lists import read_bounded
from finegrain.errors import FinegrainError

# The real files: cars_annos.mat about 2 MB (roughly 130,000 elements), the Flowers files < 100 KB.
MAX_MAT_BYTES = 64 << 20
MAX_INFLATED_BYTES = 256 << 20
MAX_ELEMENTS = 2_000_000
MAX_DEPTH = 16
_MAX_DIMS = 32

_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15
_MX_CELL, _MX_STRUCT, _MX_OBJECT, _MX_CHAR, _MX_UINT64 = 1, 2, 3, 4, 15
# Types a data part may have (ints, floats, UTF-8/16/32): scipy indexes a table with the type
# unchecked, so one flipped type byte would crash the interpreter.
_DATA_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 16, 17, 18})
_ORIGINAL = "Download the data set again; its original file is expected"


class _Malformed(Exception):
    """A structural problem found by the walk; turned into one FinegrainError naming the file."""


class _Walk:
    """Depth-first walk over the data elements of one buffer, counting elements against the bound."""

    def __init__(self, order: str) -> None:
        self.order = order
        self.elements = 0
        self._pair = struct.Struct(order + "II").unpack_from  # the walk visits every element: keep it lean
        self._dims = struct.Struct(order + "ii").unpack_from

    def tag(self, buf: bytes, pos: int, end: int) -> tuple[int, int, int, int]:
        """(type, byte count, data start, next element) of the element tag at `pos`."""
        if pos + 8 > end:
            raise _Malformed(f"an element tag at byte {pos} runs past the end")
        first, second = self._pair(buf, pos)
        if first >> 16:  # small data element: up to 4 bytes packed into the tag
            if first >> 16 > 4:
                raise _Malformed(f"a small element at byte {pos} declares {first >> 16} bytes (at most 4)")
            return first & 0xFFFF, first >> 16, pos + 4, pos + 8
        if second > end - pos - 8:
            raise _Malformed(f"an element at byte {pos} declares {second:,} bytes; only {end - pos - 8:,} follow")
        after = pos + 8 + second + (-second & 7)
        return first, second, pos + 8, after if after < end else end

    def matrix(self, buf: bytes, start: int, end: int, depth: int) -> None:
        """Check one miMATRIX body: flags, dimensions, name, then its class's content."""
        self.elements += 1
        if self.elements > MAX_ELEMENTS:
            raise _Malformed(f"more than {MAX_ELEMENTS:,} arrays")
        if depth > MAX_DEPTH:
            raise _Malformed(f"arrays nested more than {MAX_DEPTH} deep")
        if start == end:
            return  # an empty array
        kind, count, data, pos = self.tag(buf, start, end)
        if kind != _MI_UINT32 or count != 8:
            raise _Malformed(f"the array at byte {start} has no array-flags element")
        array_class = self._pair(buf, data)[0] & 0xFF
        kind, count, data, pos = self.tag(buf, pos, end)
        if kind != _MI_INT32 or count % 4 or not 8 <= count <= 4 * _MAX_DIMS:
            raise _Malformed(f"the array at byte {start} has no valid dimensions element")
        dims = self._dims(buf, data) if count == 8 else struct.unpack_from(f"{self.order}{count // 4}i", buf, data)
        if min(dims) < 0:
            raise _Malformed(f"the array at byte {start} has a negative dimension {min(dims)}")
        size = math.prod(dims)
        pos = self.text(buf, pos, end, start)  # the array's name
        if array_class in (_MX_STRUCT, _MX_OBJECT):
            if array_class == _MX_OBJECT:
                pos = self.text(buf, pos, end, start)  # the class name
            kind, count, data, pos = self.tag(buf, pos, end)
            if kind != _MI_INT32 or count != 4:
                raise _Malformed(f"the struct at byte {start} has no field-name length")
            name_length = struct.unpack_from(self.order + "i", buf, data)[0]
            kind, count, data, pos = self.tag(buf, pos, end)
            if kind != _MI_INT8 or name_length < 1 or count % name_length:
                raise _Malformed(f"the struct at byte {start} has malformed field names")
            self.children(buf, pos, end, size * (count // name_length), depth)
        elif array_class == _MX_CELL:
            self.children(buf, pos, end, size, depth)
        elif _MX_CHAR <= array_class <= _MX_UINT64:
            while pos < end:  # data parts (real, imaginary; sparse indices): each must fit
                kind, _, _, pos = self.tag(buf, pos, end)
                if kind not in _DATA_TYPES:
                    raise _Malformed(f"the array at byte {start} holds data of unknown type {kind}")
        else:
            raise _Malformed(f"the array at byte {start} is of MATLAB class {array_class} (function handles and "
                             f"objects are not data)")

    def text(self, buf: bytes, pos: int, end: int, start: int) -> int:
        """Skip an int8 text element (a name), returning the next position."""
        kind, _, _, after = self.tag(buf, pos, end)
        if kind != _MI_INT8:
            raise _Malformed(f"the array at byte {start} has a name of type {kind}, not int8 text")
        return after

    def children(self, buf: bytes, pos: int, end: int, count: int, depth: int) -> None:
        """`count` nested arrays (cells, struct fields), checked to fit before any is read."""
        if count * 8 > end - pos:
            raise _Malformed(f"a cell or struct array declares {count:,} elements; only {end - pos:,} bytes hold them")
        for _ in range(count):
            kind, size, data, pos = self.tag(buf, pos, end)
            if kind != _MI_MATRIX:
                raise _Malformed(f"an element of type {kind} where an array was expected")
            self.matrix(buf, data, data + size, depth + 1)


def _inflate(data: bytes, cap: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        inflated = inflater.decompress(data, cap + 1)
    except zlib.error as error:
        raise _Malformed(f"a compressed variable is corrupt ({error})") from None
    if len(inflated) > cap:
        raise _Malformed(f"compressed variables expand to more than {MAX_INFLATED_BYTES >> 20} MiB")
    return inflated


def check_mat(buf: bytes) -> None:
    """Walk a MATLAB v5 file's elements; raise _Malformed at the first size that does not fit."""
    if len(buf) < 128:
        raise _Malformed(f"{len(buf)} bytes is shorter than the 128-byte header")
    if buf[126:128] not in (b"IM", b"MI"):
        version = "v7.3 (HDF5)" if buf[:8].startswith(b"MATLAB 7.3") else "v4 or not MATLAB"
        raise _Malformed(f"it is not a MATLAB v5 file (looks like {version}); save it with -v7")
    walk = _Walk("<" if buf[126:128] == b"IM" else ">")
    if struct.unpack_from(walk.order + "H", buf, 124)[0] != 0x0100:
        raise _Malformed("its header does not give MATLAB v5 format (0x0100); v7.3 files are HDF5, save with -v7")
    pos, budget = 128, MAX_INFLATED_BYTES
    while pos < len(buf):
        kind, count, data, _ = walk.tag(buf, pos, len(buf))
        if count == 0:
            raise _Malformed(f"the variable at byte {pos} is empty")
        pos = data + count  # top-level variables are not padded
        body = buf
        if kind == _MI_COMPRESSED:
            body = _inflate(buf[data:pos], budget)
            budget -= len(body)
            kind, count, data, _ = walk.tag(body, 0, len(body))
        if kind != _MI_MATRIX:
            raise _Malformed(f"a top-level element of type {kind} is not a variable")
        walk.matrix(body, data, data + count, 0)


def load_mat(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The named variables of a MATLAB v5 file (structure checked first), squeezed, or one clear error."""
    buf = read_bounded(path, MAX_MAT_BYTES, "MATLAB annotation file")
    try:
        check_mat(buf)
    except _Malformed as problem:
        raise FinegrainError(f"Cannot read {path} as a MATLAB file: {problem}. {_ORIGINAL}.") from None
    try:
        from scipy.io import loadmat
    except ImportError:
        raise FinegrainError(f"Reading {path.name} needs scipy (it is a MATLAB file). "
                             f"Install it: pip install scipy.") from None
    try:
        content = loadmat(io.BytesIO(buf), squeeze_me=True)
    except Exception as error:  # noqa: BLE001 - any failure of scipy's parser on this untrusted file means "corrupt"
        raise FinegrainError(f"Cannot read {path} as a MATLAB file ({type(error).__name__}: {error}). "
                             f"{_ORIGINAL}.") from None
    missing = [key for key in keys if key not in content]
    if missing:
        raise FinegrainError(f"{path} lacks the variable(s) {', '.join(missing)}. {_ORIGINAL}.")
    return content


def _column(value: object) -> object:
    """A struct field across entries (an object vector of scalars) as one numeric or text vector."""
    if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 1:
        items = value.tolist()
        if not items:
            return np.zeros(0, dtype=np.int64)
        if all(isinstance(item, (int, float, np.number)) and not isinstance(item, bool) for item in items):
            return np.array(items)
    return value


def integers(value: object, path: Path, name: str) -> np.ndarray:
    """A MATLAB variable or struct field that must hold one integer or a vector of them, as int64."""
    value = _column(value)
    array = np.asarray(value) if isinstance(value, (np.ndarray, np.number, int, float)) else None
    if array is None or array.ndim > 1 or array.dtype.kind not in "iuf":
        shape = f"{type(value).__name__} of shape {np.shape(value)}"
        raise FinegrainError(f"{path}: {name} must be integers (one number or a vector), got a {shape}. {_ORIGINAL}.")
    if array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()
                                        and np.abs(array).max(initial=0) < 2 ** 53):
        raise FinegrainError(f"{path}: {name} must be whole numbers, found non-integer values. {_ORIGINAL}.")
    return np.atleast_1d(array).astype(np.int64)


def strings(value: object, path: Path, name: str) -> list[str]:
    """A MATLAB variable or struct field that must hold one string or a vector of strings."""
    items = [value] if isinstance(value, str) else (
        value.tolist() if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "OU" else None)
    if items is None or not all(isinstance(item, str) for item in items):
        raise FinegrainError(f"{path}: {name} must be text (one string or a vector of strings), got a "
                             f"{type(value).__name__} of shape {np.shape(value)}. {_ORIGINAL}.")
    return items
