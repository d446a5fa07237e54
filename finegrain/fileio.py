"""Atomic writes: a file or folder appears complete under its final name, or not at all."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def old_sibling(path: str | os.PathLike) -> Path:
    """Where the fallback folder swap parks the previous version for the moment between two renames."""
    final = Path(path)
    return final.with_name(f".{final.name}.old")


def recover_swap(path: str | os.PathLike) -> None:
    """Finish a folder swap that a crash interrupted (only the two-rename fallback can leave one).

    `path` missing with its `.NAME.old` present: the new version never arrived, so the previous
    one is put back. Both present: the swap was done but not cleaned up, so the old copy goes.
    """
    final, old = Path(path), old_sibling(path)
    if not old.is_dir() or old.is_symlink():
        return
    if not final.exists() and not final.is_symlink():
        os.replace(old, final)
    elif final.is_dir():
        shutil.rmtree(old, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:  # old kernel or a file system without exchange
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _replace_folder(new: Path, final: Path) -> None:
    """Put folder `new` at `final` so that `final` always holds a complete version.

    Exchanging the two leaves no moment without one; where the system cannot exchange, the old
    version is parked beside `final` for the moment between two renames, and `recover_swap`
    repairs an interruption there on the next run. The previous version ends up at `new`.
    """
    if _exchange(new, final):
        return
    old = old_sibling(final)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(new, final)
    os.replace(old, new)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; move it onto `path` only if the block succeeds.

    Works for files and folders: whatever the block writes at the yielded path replaces
    `path` in one rename (a folder: one exchange, see `_replace_folder`), so an interrupted
    write never leaves a half-written result and the previous version stays in place and
    loadable until the new one is complete.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_swap(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and target.is_dir():
            _replace_folder(target, final)
        else:
            os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
