"""Fuzz target: the list files of the public data sets (split lists, class lists) in `finegrain.data`.

The first byte of an input picks one of the 13 list files of Food-101, Oxford Pets, SOP, CUB-200
and FGVC-Aircraft; the rest replaces it inside small valid fakes of those data sets
(tests/test_data.py's layouts, with real demo photos), which is then read with `load_splits`:
the bounded UTF-8 reading, field parsing, path, range and duplicate checks of every reader.

    pip install -e ".[fuzz]"
    python tests/fuzz/fuzz_split_lists.py -atheris_runs=100000 -artifact_prefix=/tmp/fuzz/ /tmp/fuzz/corpus
    python tests/fuzz/fuzz_split_lists.py --write-seeds            # rebuild the seed corpus
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

CORPUS = Path(__file__).parent / "corpus" / "split_lists"
FILES = (("food101", "meta/train.txt"), ("food101", "meta/test.txt"), ("food101", "meta/classes.txt"),
         ("pets", "annotations/trainval.txt"), ("pets", "annotations/test.txt"),
         ("sop", "Ebay_train.txt"), ("sop", "Ebay_test.txt"),
         ("cub200", "images.txt"), ("cub200", "image_class_labels.txt"), ("cub200", "classes.txt"),
         ("aircraft", "data/images_variant_trainval.txt"), ("aircraft", "data/images_variant_test.txt"),
         ("aircraft", "data/variants.txt"))
_state: dict[str, object] = {}
# Writing a file per input is 10x faster in memory than on an overlay /tmp.
WORK = "/dev/shm" if Path("/dev/shm").is_dir() else None


def _root() -> Path:
    """A temporary folder with a fake of each data set, built once per process."""
    if "root" not in _state:
        from test_data import _aircraft, _cub, _food101, _pets, _sop

        root = Path(tempfile.mkdtemp(prefix="fuzz_split_lists_", dir=WORK))
        atexit.register(shutil.rmtree, root, True)
        for kind, build in (("food101", _food101), ("pets", _pets), ("sop", _sop), ("cub200", _cub),
                            ("aircraft", _aircraft)):
            (root / kind).mkdir()
            build(root / kind)
        _state["root"] = root
        _state["originals"] = {(kind, name): (root / kind / name).read_bytes() for kind, name in FILES}
    return _state["root"]  # type: ignore[return-value]


def one_input(data: bytes) -> None:
    """Put data[1:] in place of the list file data[0] picks and read its data set; only FinegrainError may escape."""
    root = _root()
    kind, name = FILES[data[0] % len(FILES) if data else 0]
    last = _state.get("last")
    if last is not None and last != (kind, name):
        (root / last[0] / last[1]).write_bytes(_state["originals"][last])  # type: ignore[index]
    _state["last"] = (kind, name)
    (root / kind / name).write_bytes(data[1:])
    try:
        load_splits(kind, root / kind)
    except FinegrainError:
        pass


def write_seeds() -> None:
    """Each valid list file behind its selector byte."""
    root = _root()
    CORPUS.mkdir(parents=True, exist_ok=True)
    for selector, (kind, name) in enumerate(FILES):
        (CORPUS / f"{kind}-{Path(name).name}").write_bytes(bytes([selector]) + (root / kind / name).read_bytes())


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds()
        return
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
