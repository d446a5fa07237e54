"""Fuzz target: our safetensors checkpoints, through the metadata reader and the full loader.

Every input is a whole .safetensors file: `read_info` (header + validated metadata) and then
`load_model` (overrides bounded, the tensors the metadata implies compared with the header
before building, weights loaded and checked finite). Only FinegrainError may leave them.

The header is JSON whose metadata values are JSON again, behind an 8-byte length: byte
mutations would mostly break the length or the outer JSON. So the custom mutator decodes the
file and changes one thing: a metadata value's text (libFuzzer's mutations of it), a key, a
tensor entry (dtype, a dimension, the offsets, the name), the header's raw bytes (the length
kept right), a tensor's data (NaN, inf), or, now and then, the raw file.

    pip install -e ".[fuzz]"
    python tests/fuzz/fuzz_checkpoint.py -atheris_runs=100000 tests/fuzz/corpus/checkpoint
    python tests/fuzz/fuzz_checkpoint.py --write-seeds            # rebuild the seed corpus
    python tests/fuzz/fuzz_checkpoint.py --bit-flips 2000 FILE    # the single-bit-flip experiment
"""
from __future__ import annotations

import atexit
import json
import random
import re
import shutil
import struct
import sys
import tempfile
from collections import Counter
from pathlib import Path

try:
    import atheris
except ImportError:  # the replay test runs the corpus without it
    atheris = None

MODES = ("--write-seeds", "--bit-flips")  # the script's other uses, without fuzzing
if atheris is not None and __name__ == "__main__" and not set(MODES) & set(sys.argv):
    import safetensors.torch  # noqa: F401  (instrument our code, not torch)
    import torch  # noqa: F401

    with atheris.instrument_imports(include=["finegrain"]):
        from finegrain.models import load_model, read_info
else:
    from finegrain.models import load_model, read_info
from finegrain.errors import FinegrainError  # noqa: E402

CORPUS = Path(__file__).parent / "corpus" / "checkpoint"
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "I8", "XX"]
DIMS = [0, 1, 2, 3, 8, 16, 255, 1 << 16, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, -1]
# Numbers that a metadata value's digits become: edges of every bound, non-finite, huge, wrong type.
NUMBERS = ["0", "-1", "1", "2", "7", "8", "64", "100", "101", "1024", "1025", "65537", "1000001", "0.0", "-0.0",
           "1e-9", "0.001", "1e308", "1e999", "-1e999", "NaN", "Infinity", "1" + "0" * 400, "true", "null", '"3"',
           "[]", "{}", "[" * 2000 + "]" * 2000]
NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_workdir: list[Path] = []
fuzzing = False  # atheris.Mutate works only inside atheris.Fuzz()


def one_input(data: bytes) -> None:
    """Read `data` as a checkpoint, metadata first, then the whole model; only FinegrainError may escape."""
    if not _workdir:
        _workdir.append(Path(tempfile.mkdtemp(prefix="fuzz_checkpoint_")))
        atexit.register(shutil.rmtree, _workdir[0], True)
    path = _workdir[0] / "input.safetensors"
    path.write_bytes(data)
    try:
        read_info(path)
        load_model(path)
    except FinegrainError:
        pass


# ---------------------------------------------------------------- structure-aware mutator
def split(data: bytes) -> tuple[dict, bytes] | None:
    """(header JSON, tensor bytes) of a well-formed file, else None."""
    if len(data) < 8:
        return None
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        return None
    try:
        header = json.loads(data[8:8 + length])
    except (ValueError, RecursionError):
        return None
    return (header, data[8 + length:]) if isinstance(header, dict) else None


def join(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def mutate_text(text: str, rng: random.Random) -> str:
    """libFuzzer's mutations of a text while fuzzing; one random character otherwise."""
    raw = text.encode()
    if fuzzing:
        raw = atheris.Mutate(raw, len(raw) + 64)
    elif raw:
        chars = bytearray(raw)
        chars[rng.randrange(len(chars))] = rng.randrange(32, 127)
        raw = bytes(chars)
    return raw.decode("utf-8", "replace")


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """One structured change to a well-formed file (19 in 20), else libFuzzer's raw mutations."""
    rng = random.Random(seed)
    parts = split(data)
    if parts is not None and rng.randrange(20):
        try:
            return mutate_structure(*parts, rng, max_size)
        except (KeyError, TypeError, IndexError, AttributeError):  # a header already mutated out of shape
            pass
    return atheris.Mutate(data, max_size) if fuzzing else data


def mutate_structure(header: dict, body: bytes, rng: random.Random, max_size: int) -> bytes:
    choice = rng.randrange(1, 20)
    metadata = header.setdefault("__metadata__", {})
    tensors = [name for name in header if name != "__metadata__"]
    if choice < 7 and metadata:  # a metadata value
        key = rng.choice(sorted(metadata))
        metadata[key] = mutate_text(str(metadata[key]), rng)
    elif choice < 10 and metadata:  # one number inside a value becomes an edge case
        key = rng.choice(sorted(metadata))
        spans = [m.span() for m in NUMBER.finditer(str(metadata[key]))]
        start, end = rng.choice(spans) if spans else (0, len(str(metadata[key])))
        metadata[key] = str(metadata[key])[:start] + rng.choice(NUMBERS) + str(metadata[key])[end:]
    elif choice < 12 and metadata:  # a key: renamed, dropped, or a value moved to another key
        key = rng.choice(sorted(metadata))
        value = metadata.pop(key)
        if rng.random() < 0.7:
            metadata[mutate_text(key, rng) if rng.random() < 0.5 else rng.choice(sorted(metadata) or [key])] = value
    elif choice < 16 and tensors:  # a tensor entry
        name = rng.choice(tensors)
        entry, what = header[name], rng.randrange(4)
        if what == 0:
            entry["dtype"] = rng.choice(DTYPES)
        elif what == 1 and entry.get("shape"):
            entry["shape"][rng.randrange(len(entry["shape"]))] = rng.choice(DIMS)
        elif what == 2:
            entry["data_offsets"][rng.randrange(2)] += rng.choice([-4, -1, 1, 4, 1 << 20])
        else:
            header[mutate_text(name, rng)] = header.pop(name)
    elif choice < 18:  # the header's raw text, its length kept right
        text = json.dumps(header).encode()
        return join(atheris.Mutate(text, len(text) + 256) if fuzzing else text, body)[:max_size]
    elif body:  # a weight becomes NaN / inf / huge
        out = bytearray(body)
        at = rng.randrange(0, max(len(out) - 4, 1), 4)
        out[at:at + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -float("inf"), 3e38]))
        body = bytes(out)
    return join(json.dumps(header).encode(), body)[:max_size]


# ---------------------------------------------------------------- seeds and experiments
def write_seeds() -> None:
    """Small real checkpoints (each < 100 KB) with every metadata field finegrain writes."""
    import finegrain
    from finegrain.models import DataRecord, save_model

    CORPUS.mkdir(parents=True, exist_ok=True)
    common = dict(classes=("apple", "banana", "cherry"), epoch=3, recipe="fgvc/demo", metrics={"top1": 0.75},
                  data=DataRecord("folder", "/data/fruits", {"test_fraction": 0.2}))
    mobilenet = finegrain.create_model("mobilenet_v1", num_classes=3, base_width=1)
    save_model(mobilenet, CORPUS / "mobilenet_w1.safetensors", task="fgvc", **common)
    resnet = finegrain.create_model("resnet50d", num_classes=3, base_width=2, layers=[1, 1, 1, 1])
    save_model(resnet, CORPUS / "resnet50d_w2.safetensors", task="backbone", kd_teacher="sha256:" + "0" * 64,
               source="model.ckpt-1", source_kind="release", source_sha256="0" * 64, **common)
    embedder = finegrain.create_embedder("r50d_sk", embedding_size=4, base_width=2, layers=[1, 1, 1, 1])
    save_model(embedder, CORPUS / "r50d_sk_embedder.safetensors", task="retrieval", recall_ks=(1, 2, 4),
               data=DataRecord("cub200", "/data/CUB_200_2011"), epoch=1, recipe="retrieval/demo")
    for path in sorted(CORPUS.iterdir()):
        print(f"{path.name}: {path.stat().st_size} bytes")


def bit_flips(path: Path, trials: int, seed: int = 0) -> Counter:
    """Flip one random bit of the header (length prefix included) per trial and load the file:
    count how each ends (loaded, FinegrainError, or any other exception: a traceback)."""
    data = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    rng, outcomes = random.Random(seed), Counter()
    work = Path(tempfile.mkdtemp(prefix="bit_flips_"))
    try:
        for _ in range(trials):
            at = rng.randrange(header_end)
            flipped = bytearray(data)
            flipped[at] ^= 1 << rng.randrange(8)
            (work / "flipped.safetensors").write_bytes(bytes(flipped))
            try:
                load_model(work / "flipped.safetensors")
                outcomes["loaded"] += 1
            except FinegrainError:
                outcomes["FinegrainError"] += 1
            except Exception as error:  # noqa: BLE001 - the experiment counts exactly these
                outcomes[f"traceback {type(error).__name__}"] += 1
                print(f"byte {at}: {type(error).__name__}: {error}"[:300])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return outcomes


def main() -> None:
    global fuzzing
    if "--write-seeds" in sys.argv:
        write_seeds()
    elif "--bit-flips" in sys.argv:
        trials, file = int(sys.argv[sys.argv.index("--bit-flips") + 1]), Path(sys.argv[-1])
        print(dict(bit_flips(file, trials)))
    elif atheris is None:
        sys.exit('atheris is not installed: pip install -e ".[fuzz]" (tests/test_fuzz_replay.py replays the '
                 "corpus without it).")
    else:
        fuzzing = True
        atheris.Setup(sys.argv, one_input, custom_mutator=mutate)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
