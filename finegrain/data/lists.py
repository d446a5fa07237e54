"""Reading the list files of the public data sets (split lists, class lists) as untrusted input.

A list file comes from a download or a colleague: it is read only up to a size bound, must be
UTF-8, and every field taken from it is checked where it is parsed, so an error can point at
the file and line to fix (`Line.where`) instead of surfacing later as a wrong label.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from finegrain.errors import FinegrainError

# Far above the largest list of the supported data sets (SOP's Ebay_test.txt: 60,502 lines,
# 3.6 MB), low enough that parsing stays within a few hundred MB of memory.
MAX_LIST_BYTES = 64 << 20
MAX_LIST_LINES = 2_000_000
_MAX_INT_DIGITS = 9
_ORIGINAL = "Use the unmodified file from the data set's download"


@dataclass(frozen=True)
class Line:
    """A non-empty, stripped line of a list file and where it is (1-based line number)."""

    path: Path
    number: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.number}"

    def error(self, problem: str, fix: str = _ORIGINAL) -> FinegrainError:
        """An error naming this file and line, quoting the line."""
        shown = self.text if len(self.text) <= 120 else self.text[:117] + "..."
        return FinegrainError(f"{self.where} ({shown!r}): {problem}. {fix}.")


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of `path`, refusing (before reading it all) a file over `limit` bytes."""
    try:
        with path.open("rb") as stream:
            data = stream.read(limit + 1)
    except OSError as error:
        raise FinegrainError(f"Cannot read {path} ({error.strerror or error}). Check that the file is "
                             f"readable.") from None
    if len(data) > limit:
        size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit:,} bytes"
        raise FinegrainError(f"{path} is larger than {size}, far beyond any {what} of the supported data sets. "
                             f"{_ORIGINAL}.")
    return data


def csv_rows(path: Path, limit: int, what: str) -> Iterator[list[str]]:
    """The rows of a UTF-8 CSV file (header first), bounded like `read_bounded`; malformed quoting
    surfaces as csv.Error from the iterator, for the caller to name the line."""
    data = read_bounded(path, limit, what)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise FinegrainError(f"{path}: not UTF-8 text (byte {error.start}). Save the file as UTF-8.") from None
    return csv.reader(io.StringIO(text, newline=""), strict=True)


def read_lines(path: Path) -> list[Line]:
    """The non-empty lines of a list file, stripped, without '#' comment lines."""
    data = read_bounded(path, MAX_LIST_BYTES, "list file")
    if data.count(b"\n") >= MAX_LIST_LINES:
        raise FinegrainError(f"{path} has more than {MAX_LIST_LINES:,} lines, far beyond any list of the supported "
                             f"data sets. {_ORIGINAL}.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise FinegrainError(f"{path}, line {line}: not UTF-8 text (byte {data[error.start]:#04x}). Save the file as "
                             f"UTF-8, or {_ORIGINAL[0].lower()}{_ORIGINAL[1:]}.") from None
    stripped = ((number, raw.strip()) for number, raw in enumerate(text.split("\n"), 1))
    return [Line(path, number, line) for number, line in stripped if line and not line.startswith("#")]


def fields(line: Line, count: int, layout: str) -> list[str]:
    """The whitespace-separated fields of `line`, exactly `count` of them."""
    parts = line.text.split()
    if len(parts) != count:
        raise line.error(f"expected {count} fields ({layout}), found {len(parts)}")
    return parts


def key_and_rest(line: Line, layout: str) -> tuple[str, str]:
    """'key value with spaces' -> ('key', 'value with spaces'); both must be present."""
    key, _, rest = line.text.partition(" ")
    if not rest.strip():
        raise line.error(f"expected two fields ({layout}), found one")
    return key, rest.strip()


def positive_int(text: str, line: Line, what: str) -> int:
    """A field that must be an integer >= 1 (ids and class numbers), in plain ASCII digits."""
    if not (text.isascii() and text.isdigit() and len(text) <= _MAX_INT_DIGITS) or int(text) < 1:
        raise line.error(f"{what} must be a whole number from 1 to {10 ** _MAX_INT_DIGITS - 1:,}, got {text!r}")
    return int(text)


_SEPARATORS = re.compile(r"[\\/]")


def relative_path(text: str, where: str, single_name: bool = False) -> str:
    """`text` as a path below the data folder: no absolute path, drive, '..' or control characters
    (which would read files outside it); with `single_name`, no folder separators either."""
    parts = _SEPARATORS.split(text)
    escapes = (not text or text[0] in "/\\" or re.match(r"^[A-Za-z]:", text) is not None or ".." in parts
               or any(ord(char) < 32 or ord(char) == 127 for char in text))
    if escapes or (single_name and len(parts) > 1):
        expected = "a file name without folders" if single_name else "a relative path below the data folder"
        raise FinegrainError(f"{where}: {text!r} is not {expected}; it could read files outside the data set. "
                             f"{_ORIGINAL}.")
    return text


def check_unique(keys: Iterable[tuple[str, str]], what: str) -> None:
    """Refuse a repeated key: `keys` are (key, where it is listed) pairs, e.g. image paths and lines."""
    first: dict[str, str] = {}
    for key, where in keys:
        if key in first:
            raise FinegrainError(f"{where}: {what} {key!r} is listed again (first at {first[key]}). Each {what} may "
                                 f"appear once in a data set, or images would be counted twice or leak from train "
                                 f"into test. {_ORIGINAL}.")
        first[key] = where


def class_list(path: Path, labels: Iterable[str], what: str) -> list[str]:
    """The classes named one a line in `path` (their order is the label order), or, where the
    data set ships no such file, the sorted labels its split lists use."""
    if not path.is_file():
        return sorted(set(labels))
    lines = read_lines(path)
    check_unique(((line.text, line.where) for line in lines), what)
    return [line.text for line in lines]
