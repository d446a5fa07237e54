"""Fuzz target: readers of embeddings and query/gallery layouts that come from outside.

The first byte of an input picks the file the rest becomes: 0 a `.npy` of embeddings and 1 the
ids/metadata CSV beside a valid one (`finegrain.index.embeddings.read_external`: the .npy header,
dtype, shape and size checks, NaN/zero rows, the CSV's size, UTF-8, columns and unique ids),
2 DeepFashion In-Shop's list_eval_partition.txt and 3 a data set CSV (path, label, split, is_query,
is_gallery), read with `load_splits` over three real demo photos.

    pip install -e ".[fuzz]"
    python tests/fuzz/fuzz_embeddings.py -atheris_runs=100000 -artifact_prefix=/tmp/fuzz/ /tmp/fuzz/corpus
    python tests/fuzz/fuzz_embeddings.py --write-seeds            # rebuild the seed corpus
"""
from __future__ import annotations

import atexit
import io
import shutil
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__" and "--write-seeds" not in sys.argv:  # fuzzing: instrument our code only
    import atheris
    import numpy  # noqa: F401
    import torch  # noqa: F401  (finegrain.index's import; far too large to instrument)

    with atheris.instrument_imports(include=["finegrain"]):
        import finegrain.data  # noqa: F401
        import finegrain.index.embeddings  # noqa: F401

import numpy as np  # noqa: E402

from finegrain.data import demo_root, load_splits  # noqa: E402
from finegrain.errors import FinegrainError  # noqa: E402
from finegrain.index.embeddings import read_external  # noqa: E402

CORPUS = Path(__file__).parent / "corpus" / "embeddings"
INSHOP_LIST = "Eval/list_eval_partition.txt"
WORK = "/dev/shm" if Path("/dev/shm").is_dir() else None  # a file per input: much faster in memory
_state: dict[str, Path] = {}


def _root() -> Path:
    """A folder with a valid .npy, three demo photos (In-Shop and CSV layouts point at them), built once."""
    if "root" not in _state:
        root = Path(tempfile.mkdtemp(prefix="fuzz_embeddings_", dir=WORK))
        atexit.register(shutil.rmtree, root, True)
        np.save(root / "vectors.npy", np.arange(1, 13, dtype=np.float32).reshape(3, 4))
        photos = sorted((demo_root() / "test").rglob("*.jpg"))[:3]
        for number, photo in enumerate(photos):
            target = root / "img" / f"id_0{number}" / f"{number}.jpg"
            target.parent.mkdir(parents=True)
            shutil.copy(photo, target)
        (root / "Eval").mkdir()
        _state["root"] = root
    return _state["root"]


def one_input(data: bytes) -> None:
    """Write data[1:] as the file data[0] picks and read it; only FinegrainError may escape."""
    root = _root()
    selector, body = (data[0] % 4, data[1:]) if data else (0, b"")
    try:
        if selector == 0:
            (root / "input.npy").write_bytes(body)
            read_external(root / "input.npy")
        elif selector == 1:
            (root / "ids.csv").write_bytes(body)
            read_external(root / "vectors.npy", root / "ids.csv")
        elif selector == 2:
            (root / INSHOP_LIST).write_bytes(body)
            load_splits("inshop", root)
        else:
            (root / "dataset.csv").write_bytes(body)
            load_splits("csv", root)
    except FinegrainError:
        pass


def write_seeds() -> None:
    """A valid file of each kind behind its selector byte."""
    CORPUS.mkdir(parents=True, exist_ok=True)
    npy = io.BytesIO()
    np.save(npy, np.eye(3, 8, dtype=np.float32))
    seeds = {
        "npy": b"\x00" + npy.getvalue(),
        "ids.csv": b"\x01id,label,path\nsku-1,shirt,a.jpg\nsku-2,shirt,b.jpg\n\"sku,3\",dress,c.jpg\n",
        "list_eval_partition.txt": b"\x02" + b"3\nimage_name item_id evaluation_status\n"
                                   b"img/id_00/0.jpg id_00 train\nimg/id_01/1.jpg id_01 query\n"
                                   b"img/id_02/2.jpg id_01 gallery\n",
        "dataset.csv": b"\x03path,label,split,is_query,is_gallery\nimg/id_00/0.jpg,a,train,0,0\n"
                       b"img/id_01/1.jpg,b,test,1,0\nimg/id_02/2.jpg,b,test,0,1\n",
    }
    for name, seed in seeds.items():
        (CORPUS / name).write_bytes(seed)


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds()
        return
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
