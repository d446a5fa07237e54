"""Fuzz target: the MATLAB annotation files of Stanford Cars and Oxford Flowers (`finegrain.data`).

The first byte of an input picks the file (cars_annos.mat, imagelabels.mat or setid.mat); the
rest replaces it inside small valid fakes of the two data sets (tests/test_data.py's layouts,
with real demo photos), which are then read with `load_splits`: the structural walk of
`finegrain.data.matfile`, scipy's parser, and the readers' checks of types, ranges and paths.
MAT v5 has no checksums, so byte-level mutation reaches everything but compressed variables,
which the seeds hold uncompressed as well as compressed.

    pip install -e ".[fuzz]"
    python tests/fuzz/fuzz_matfile.py -atheris_runs=100000 -artifact_prefix=/tmp/fuzz/ /tmp/fuzz/corpus
    python tests/fuzz/fuzz_matfile.py --write-seeds            # rebuild the seed corpus
"""
from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the fakes of test_data

if __name__ == "__main__" and "--write-seeds" not in sys.argv:  # fuzzing: instrument our code only
    import atheris
    import scipy.io  # noqa: F401
    import torch  # noqa: F401  (test_data's import; far too large to instrument)

    with atheris.instrument_imports(include=["finegrain"]):
        import finegrain.data  # noqa: F401
        import test_data  # noqa: F401

from finegrain.data import load_splits  # noqa: E402
from finegrain.errors import FinegrainError  # noqa: E402

CORPUS = Path(__file__).parent / "corpus" / "matfile"
FILES = (("cars196", "cars", "cars_annos.mat"), ("flowers102", "flowers", "imagelabels.mat"),
         ("flowers102", "flowers", "setid.mat"))
_state: dict[str, object] = {}
# Writing a file per input is 10x faster in memory than on an overlay /tmp.
WORK = "/dev/shm" if Path("/dev/shm").is_dir() else None


def _root() -> Path:
    """A temporary folder with the fake Cars and Flowers data sets, built once per process."""
    if "root" not in _state:
        from test_data import _cars, _flowers

        root = Path(tempfile.mkdtemp(prefix="fuzz_matfile_", dir=WORK))
        atexit.register(shutil.rmtree, root, True)
        for name, build in (("cars", _cars), ("flowers", _flowers)):
            (root / name).mkdir()
            build(root / name)
        _state["root"], _state["originals"] = root, {f: (root / d / f).read_bytes() for _, d, f in FILES}
    return _state["root"]  # type: ignore[return-value]


def one_input(data: bytes) -> None:
    """Put data[1:] in place of the file data[0] picks and read that data set; only FinegrainError may escape."""
    root = _root()
    kind, folder, name = FILES[data[0] % len(FILES) if data else 0]
    last = _state.get("last")
    if last is not None and last != (folder, name):
        (root / last[0] / last[1]).write_bytes(_state["originals"][last[1]])  # type: ignore[index]
    _state["last"] = (folder, name)  # type: ignore[assignment]
    (root / folder / name).write_bytes(data[1:])
    try:
        load_splits(kind, root / folder)
        if kind == "cars196":
            load_splits("cars196_retrieval", root / folder)
    except FinegrainError:
        pass


def write_seeds() -> None:
    """The three valid files, plus cars_annos.mat compressed."""
    import scipy.io

    root = _root()
    CORPUS.mkdir(parents=True, exist_ok=True)
    for selector, (_, folder, name) in enumerate(FILES):
        (CORPUS / name).write_bytes(bytes([selector]) + (root / folder / name).read_bytes())
    content = scipy.io.loadmat(root / "cars" / "cars_annos.mat")
    compressed = root / "compressed.mat"
    scipy.io.savemat(compressed, {k: v for k, v in content.items() if not k.startswith("__")}, do_compression=True)
    (CORPUS / "cars_annos_compressed.mat").write_bytes(b"\0" + compressed.read_bytes())


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds()
        return
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
