"""Fuzz target: the TF1 checkpoint reader (finegrain.convert.tf_bundle) on whole .index files.

Every input is a complete .index file, opened next to fixed, sparse data shards (1 to 3 of
them) and, when it opens, its first tensors are read. A plain byte mutator almost never gets
past the masked CRC32C of every table block, so the custom mutator decodes the table, changes
it at one level (an entry's or the header's protobuf fields, keys and their order, the raw
bytes of a block or of a value, the block handles, the table layout) and re-encodes it with
valid checksums; a few mutations in a hundred stay raw bytes so that the checksum, footer and
magic checks stay covered. Odd-length inputs are opened without checksum verification, so raw
mutations reach the parsers as well.

    pip install -e ".[fuzz]"
    python tests/fuzz/fuzz_tf_bundle.py -atheris_runs=100000 tests/fuzz/corpus/tf_bundle

Only FinegrainError may leave the reader; anything else is a bug (see tests/fuzz/README.md).
"""
from __future__ import annotations

import atexit
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fuzz.tf_bundle_codec
from fuzz import tf_bundle_codec as codec  # noqa: E402

try:
    import atheris
except ImportError:  # the replay test runs the corpus without it
    atheris = None

if atheris is not None and __name__ == "__main__":
    with atheris.instrument_imports(include=["finegrain"]):
        from finegrain.convert.tf_bundle import TensorBundle
else:
    from finegrain.convert.tf_bundle import TensorBundle
from finegrain.errors import FinegrainError  # noqa: E402

SHARD_BYTES = 16 << 20  # sparse; covers the offsets of the fixtures' indexes in the seed corpus
MAX_LEN = 64 << 10  # libFuzzer would cap inputs at the largest seed, too tight for re-encoding
MAX_READS = 8  # tensors read per input that opens: enough to reach read(), cheap enough for speed
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 33, 63, 64, 100, 127, 128, 255, 256, 1000, 1 << 15,
               1 << 16, 99_999, 100_000, (1 << 31) - 1, 1 << 31, 1 << 32, 1 << 40, 1 << 53, 1 << 62,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -1, -2, -8, -(1 << 31), -(1 << 63)]
_workdir: Path | None = None
fuzzing = False  # atheris.Mutate works only inside atheris.Fuzz()


def workdir() -> Path:
    """A temporary folder with empty (sparse) data shards for 1, 2 and 3-shard checkpoints."""
    global _workdir
    if _workdir is None:
        _workdir = Path(tempfile.mkdtemp(prefix="fuzz_tf_bundle_"))
        atexit.register(shutil.rmtree, _workdir, True)
        for count in (1, 2, 3):
            for shard in range(count):
                with open(_workdir / f"ckpt.data-{shard:05d}-of-{count:05d}", "wb") as handle:
                    handle.truncate(SHARD_BYTES)
    return _workdir


def one_input(data: bytes) -> None:
    """Open `data` as a checkpoint index and read what it lists; only FinegrainError may escape."""
    folder = workdir()
    (folder / "ckpt.index").write_bytes(data)
    try:
        with TensorBundle(folder / "ckpt", verify_checksums=len(data) % 2 == 0) as bundle:
            for name in bundle.names()[:MAX_READS]:
                bundle.shape(name)
                try:
                    bundle.dtype(name)
                    bundle.read(name)
                except FinegrainError:
                    pass
    except FinegrainError:
        pass


# ---------------------------------------------------------------- structure-aware mutator
Blocks = list[codec.Items]


def number(rng: random.Random) -> int:
    return rng.choice(INTERESTING) if rng.random() < 0.7 else rng.randrange(-300, 1 << 20)


def mutate_bytes(data: bytes, rng: random.Random, max_size: int) -> bytes:
    """libFuzzer's own byte mutations while fuzzing; a random byte otherwise (trying the mutator out)."""
    if fuzzing:
        return atheris.Mutate(data, max(max_size, 1))
    out = bytearray(data or b"\x00")
    out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def mutate_message(value: bytes, rng: random.Random, depth: int = 0) -> bytes:
    """Change one protobuf field: its value, wire type, presence or count; nested messages
    (shape, dim, version) recursively."""
    fields = codec.decode_fields(value)
    if fields is None or (not fields and rng.random() < 0.5):
        return mutate_bytes(value, rng, 2 * len(value) + 16)
    choice = rng.choices(range(7), weights=[1, 1, 1, 1, 2, 1, 5])[0]
    if choice == 0 or not fields:  # add a field
        fields.insert(rng.randrange(len(fields) + 1), (rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 15]),
                                                       rng.choice([0, 0, 1, 2, 5, 3, 4, 6, 7]), number(rng)))
        return codec.encode_fields(fields)
    index = rng.randrange(len(fields))
    field, wire, current = fields[index]
    if choice == 1:
        del fields[index]
    elif choice == 2:
        fields.insert(index, fields[index])
    elif choice == 3:  # the wrong wire type for the value
        fields[index] = (field, rng.choice([0, 1, 2, 5, 3, 4, 6, 7]), current)
    elif choice == 4 and isinstance(current, bytes) and depth < 3:
        fields[index] = (field, wire, mutate_message(current, rng, depth + 1))
    elif choice == 5:
        fields[index] = (rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 9, 1 << 20]), wire, current)
    else:
        fields[index] = (field, wire, mutate_bytes(current, rng, 64) if isinstance(current, bytes) else number(rng))
    return codec.encode_fields(fields)


def random_shape(rng: random.Random) -> bytes:
    """A TensorShapeProto of odd rank and dims (huge, negative, zero), now and then of unknown rank."""
    rank = rng.choice([0, 1, 2, 4, rng.randrange(64)])
    shape = codec.shape_proto(tuple(number(rng) if rng.random() < 0.5 else rng.randrange(8) for _ in range(rank)))
    return shape + (codec.field_varint(3, 1) if rng.random() < 0.1 else b"")


def pick(blocks: Blocks, rng: random.Random) -> tuple[int, int]:
    filled = [b for b, items in enumerate(blocks) if items]
    block = rng.choice(filled)
    return block, rng.randrange(len(blocks[block]))


def mutate_record(blocks: Blocks, rng: random.Random, max_size: int) -> bytes:
    block, item = pick(blocks, rng)
    key, value = blocks[block][item]
    blocks[block][item] = (key, mutate_message(value, rng))
    return encode(blocks, rng)


def mutate_shape(blocks: Blocks, rng: random.Random, max_size: int) -> bytes:
    """Give an entry a new shape, keeping the rest of its record."""
    block, item = pick(blocks, rng)
    key, value = blocks[block][item]
    fields = [f for f in codec.decode_fields(value) or [] if f[0] != 2]
    fields.insert(rng.randrange(len(fields) + 1), (2, 2, random_shape(rng)))
    blocks[block][item] = (key, codec.encode_fields(fields))
    return encode(blocks, rng)


def mutate_value_bytes(blocks: Blocks, rng: random.Random, max_size: int) -> bytes:
    block, item = pick(blocks, rng)
    key, value = blocks[block][item]
    blocks[block][item] = (key, mutate_bytes(value, rng, 2 * len(value) + 16))
    return encode(blocks, rng)


def mutate_keys(blocks: Blocks, rng: random.Random, max_size: int) -> bytes:
    """Edit, duplicate, drop, swap or reorder keys (the header's "" included)."""
    block, item = pick(blocks, rng)
    items = blocks[block]
    key, value = items[item]
    choice = rng.randrange(6)
    if choice == 0:
        items[item] = (mutate_bytes(key, rng, len(key) + 16), value)
    elif choice == 1:
        items.insert(item, items[item])
    elif choice == 2:
        del items[item]
    elif choice == 3 and item + 1 < len(items):
        items[item], items[item + 1] = items[item + 1], items[item]
    elif choice == 4:
        items[item] = (rng.choice([b"", b"\x00", b"\x00" + key, key + b"/.ATTRIBUTES/VARIABLE_VALUE",
                                   b"_CHECKPOINTABLE_OBJECT_GRAPH", key + b"\xff"]), value)
    else:
        blocks.insert(rng.randrange(len(blocks) + 1), [items.pop(item)] if len(items) > 1 else [])
    return encode(blocks, rng)


def mutate_block_bytes(blocks: Blocks, rng: random.Random, max_size: int) -> bytes:
    """Byte-level mutation of one block's contents, re-framed with a valid checksum."""
    contents = [codec.encode_block(items, rng.choice([1, 3, 16])) for items in blocks]
    target = rng.randrange(len(contents))
    contents[target] = mutate_bytes(contents[target], rng, 2 * len(contents[target]) + 16)
    return codec.wrap_blocks(contents, compression=0 if rng.random() < 0.95 else rng.randrange(1, 256))


def mutate_handles(blocks: Blocks, rng: random.Random, max_size: int) -> bytes:
    """Point index entries anywhere: odd offsets and sizes, repeats, overlaps."""
    region, handles = bytearray(), []
    for items in blocks:
        block = codec.encode_block(items, 3)
        handles.append([len(region), len(block)])
        region += codec.frame(block)
    if handles:
        chosen = handles[rng.randrange(len(handles))]
        if rng.random() < 0.3:
            handles.insert(rng.randrange(len(handles) + 1), list(chosen))
        else:
            chosen[rng.randrange(2)] = number(rng) if rng.random() < 0.5 else chosen[rng.randrange(2)] + rng.randint(-9, 9)
    index = [(b"k%06d" % i, codec.varint(offset) + codec.varint(size)) for i, (offset, size) in enumerate(handles)]
    return codec.assemble_table(bytes(region), index)


def relayout(blocks: Blocks, rng: random.Random, max_size: int) -> bytes:
    items = [item for block in blocks for item in block]
    return codec.encode_table(items, rng.choice([1, 2, 5, 16, 64, 1000]), rng.choice([1, 2, 3, 16]))


def encode(blocks: Blocks, rng: random.Random) -> bytes:
    return codec.wrap_blocks([codec.encode_block(items, rng.choice([1, 3, 16, 16, 16])) for items in blocks])


MUTATIONS: list[Callable[[Blocks, random.Random, int], bytes]] = [
    mutate_record, mutate_record, mutate_record, mutate_shape, mutate_value_bytes, mutate_keys, mutate_keys,
    mutate_block_bytes, mutate_block_bytes, mutate_handles, relayout,
]


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """atheris custom mutator: decode, change one thing, re-encode with valid checksums."""
    rng = random.Random(seed)
    blocks = codec.decode_blocks(data)
    if not blocks or not any(blocks) or rng.random() < 0.04:
        return mutate_bytes(data, rng, max_size)
    out = rng.choice(MUTATIONS)(blocks, rng, max_size)
    return out if len(out) <= max_size else mutate_bytes(data, rng, max_size)


def main() -> None:
    if atheris is None:
        sys.exit('atheris is not installed: pip install -e ".[fuzz]" (tests/test_fuzz_replay.py replays '
                 "the corpus without it).")
    global fuzzing
    fuzzing = True
    if not any(arg.startswith("-max_len=") for arg in sys.argv):  # room for re-encoded seeds to grow
        sys.argv.append(f"-max_len={MAX_LEN}")
    atheris.Setup(sys.argv, one_input, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
