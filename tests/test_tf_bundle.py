"""TensorBundle against checkpoints TensorFlow wrote (tests/fixtures/release) and against files
crafted by a minimal writer below, which builds what TF cannot be asked for here (TF2
object-based names, every dtype, several shards, small blocks, broken files)."""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np
import pytest

from finegrain.convert.tf_bundle import TensorBundle
from finegrain.errors import FinegrainError

RELEASE = Path(__file__).parent / "fixtures" / "release"
FIXTURES = ["assemble_r50_w16", "assemble_r50_ir_w8", "resnet50_v1_w16"]

# tensorflow/core/framework/types.proto, written out independently of the reader's table.
TF_DTYPE_OF = {
    "float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6,
    "complex64": 8, "int64": 9, "bool": 10, "uint16": 17, "complex128": 18, "float16": 19,
    "uint32": 22, "uint64": 23,
}
DT_STRING, DT_BFLOAT16 = 7, 14


# ---------------------------------------------------------------- minimal bundle writer
@dataclass(frozen=True)
class RawTensor:
    """A tensor given as TF dtype + bytes, for dtypes numpy lacks (bfloat16, string)."""

    tf_dtype: int
    shape: tuple[int, ...]
    data: bytes
    num_slices: int = 0


def varint(value: int) -> bytes:
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


def masked(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def encode_block(items: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
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


def write_table(path: Path, items: list[tuple[bytes, bytes]], block_items: int = 7,
                restart_interval: int = 3) -> None:
    """LevelDB table: data blocks, metaindex, index (last key -> handle), footer + magic."""
    out, index = bytearray(), []

    def put_block(contents: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(contents))
        out.extend(contents + b"\x00" + struct.pack("<I", masked(contents + b"\x00")))
        return handle

    for start in range(0, len(items), block_items):
        chunk = items[start:start + block_items]
        index.append((chunk[-1][0], put_block(encode_block(chunk, restart_interval))))
    metaindex = put_block(encode_block([], restart_interval))
    index_handle = put_block(encode_block(index, 1))
    footer = (metaindex + index_handle).ljust(40, b"\x00")
    path.write_bytes(bytes(out) + footer + struct.pack("<Q", 0xDB4775248B80FB57))


def write_bundle(prefix: Path, tensors: dict[str, np.ndarray | RawTensor], num_shards: int = 1,
                 endianness: int = 0) -> None:
    """Tensors go round-robin to the shards; entries are keyed by name, header under ""."""
    shards = [bytearray() for _ in range(num_shards)]
    items = [(b"", field_varint(1, num_shards) + field_varint(2, endianness)
              + field_bytes(3, field_varint(1, 1)))]
    for i, name in enumerate(sorted(tensors, key=str.encode)):
        tensor = tensors[name]
        if isinstance(tensor, np.ndarray):
            tensor = RawTensor(TF_DTYPE_OF[tensor.dtype.name], tensor.shape, tensor.tobytes())
        shard = i % num_shards
        dims = b"".join(field_bytes(2, field_varint(1, d)) for d in tensor.shape)
        entry = (field_varint(1, tensor.tf_dtype) + field_bytes(2, dims)
                 + field_varint(3, shard) + field_varint(4, len(shards[shard]))
                 + field_varint(5, len(tensor.data))
                 + varint(6 << 3 | 5) + struct.pack("<I", masked(tensor.data))
                 + b"".join(field_bytes(7, b"") for _ in range(tensor.num_slices)))
        shards[shard] += tensor.data
        items.append((name.encode(), entry))
    write_table(Path(f"{prefix}.index"), items)
    for shard, data in enumerate(shards):
        Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}").write_bytes(bytes(data))


def copy_fixture(name: str, tmp_path: Path) -> Path:
    for path in (RELEASE / name).glob("model.ckpt.*"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / "model.ckpt"


# ---------------------------------------------------------------- real TF checkpoints
@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixture_names_shapes_dtypes_match_variables_txt(fixture: str) -> None:
    expected = (RELEASE / fixture / "variables.txt").read_text().splitlines()
    with TensorBundle(RELEASE / fixture / "model.ckpt") as bundle:
        listed = [f"{n} [{','.join(map(str, bundle.shape(n)))}] {bundle.dtype(n)}"
                  for n in bundle.names()]
    assert listed == expected


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixture_reads_every_tensor_with_checksums(fixture: str) -> None:
    config = json.loads((RELEASE / fixture / "config.json").read_text())
    with TensorBundle(RELEASE / fixture / "model.ckpt") as bundle:
        arrays = {name: bundle.read(name) for name in bundle.names()}
        step = bundle.read("global_step")
        assert step.dtype == np.int64 and step.shape == ()
        assert int(step) == config["global_step"] == 123456
        total = sum(a.nbytes for a in arrays.values())
        assert total == (RELEASE / fixture / "model.ckpt.data-00000-of-00001").stat().st_size
        for slot in config["momentum_slots_in_ckpt"]:
            assert slot in bundle
            assert arrays[slot].shape == bundle.shape(slot.removesuffix("/Momentum"))
    # The README's draws: gamma ~ U(0.5, 1.5), variances > 0; a wrong dtype or offset breaks both.
    def values_of(suffix: str) -> np.ndarray:
        return np.concatenate([a.ravel() for n, a in arrays.items() if n.endswith(suffix)])

    gammas, variances = values_of("/gamma"), values_of("/moving_variance")
    assert gammas.min() >= 0.5 and gammas.max() <= 1.5 and variances.min() > 0
    kernel = next(a for n, a in arrays.items() if n.endswith("/kernel"))
    kernel[...] = 0  # read() returns an array the converter may modify in place


@pytest.mark.parametrize("given", ["model.ckpt.index", "model.ckpt.data-00000-of-00001", "."])
def test_prefix_resolved_from_index_data_file_or_folder(given: str) -> None:
    with TensorBundle(RELEASE / "resnet50_v1_w16" / given) as bundle:
        assert bundle.prefix == RELEASE / "resnet50_v1_w16" / "model.ckpt"
        assert len(bundle.names()) == 271


# ---------------------------------------------------------------- round trip through the writer
def test_round_trip_every_dtype_across_shards_and_blocks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray | RawTensor] = {}
    shapes = [(), (0, 3), (5,), (2, 3, 4, 5)]
    for dtype_name in TF_DTYPE_OF:
        for i, shape in enumerate(shapes):
            values = rng.normal(size=shape) * 100
            if dtype_name.startswith("complex"):
                values = values + 1j * rng.normal(size=shape)
            array = values > 0 if dtype_name == "bool" else values.astype(dtype_name)
            tensors[f"scope/{dtype_name}/layer_{i}/kernel"] = np.asarray(array)
    bf16_source = rng.normal(size=(3, 7)).astype(np.float32)
    bf16_bits = (bf16_source.view(np.uint32) >> 16).astype(np.uint16)
    tensors["scope/bfloat16/kernel"] = RawTensor(DT_BFLOAT16, (3, 7), bf16_bits.tobytes())
    write_bundle(tmp_path / "ckpt", tensors, num_shards=3)

    with TensorBundle(tmp_path / "ckpt") as bundle:
        assert bundle.names() == sorted(tensors, key=str.encode)
        for name, expected in tensors.items():
            got = bundle.read(name)
            if isinstance(expected, RawTensor):  # bfloat16 -> exact float32 upcast
                expected = (bf16_bits.astype(np.uint32) << 16).view(np.float32)
                assert np.allclose(got, bf16_source, rtol=2**-7)
            assert bundle.dtype(name) == got.dtype == expected.dtype
            assert bundle.shape(name) == got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
            assert got.flags.writeable


# ---------------------------------------------------------------- clear errors
def test_missing_index(tmp_path: Path) -> None:
    with pytest.raises(FinegrainError, match=r"No checkpoint index at .*nothing\.index.*prefix"):
        TensorBundle(tmp_path / "nothing")


def test_missing_data_shard_is_named(tmp_path: Path) -> None:
    prefix = copy_fixture("assemble_r50_ir_w8", tmp_path)
    Path(f"{prefix}.data-00000-of-00001").unlink()
    with pytest.raises(FinegrainError, match=r"shard model\.ckpt\.data-00000-of-00001 is missing"):
        TensorBundle(prefix)


def test_missing_second_of_three_shards(tmp_path: Path) -> None:
    tensors = {f"v{i}": np.ones(3, np.float32) for i in range(5)}
    write_bundle(tmp_path / "ckpt", tensors, num_shards=3)
    (tmp_path / "ckpt.data-00001-of-00003").unlink()
    with pytest.raises(FinegrainError, match=r"ckpt\.data-00001-of-00003 is missing.*all 3"):
        TensorBundle(tmp_path / "ckpt")


def test_truncated_data_file(tmp_path: Path) -> None:
    prefix = copy_fixture("assemble_r50_ir_w8", tmp_path)
    data = Path(f"{prefix}.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(FinegrainError, match=r"data-00000-of-00001 is truncated: tensor '.+' needs"):
        TensorBundle(prefix)


def test_corrupted_byte_names_the_tensor(tmp_path: Path) -> None:
    prefix = copy_fixture("assemble_r50_ir_w8", tmp_path)
    name = "resnet_model/dense/kernel"
    with TensorBundle(prefix) as bundle:
        original = bundle.read(name)
        other = bundle.read("resnet_model/dense/bias")
    data_path = Path(f"{prefix}.data-00000-of-00001")
    data = bytearray(data_path.read_bytes())
    start = bytes(data).find(original.tobytes())
    data[start + original.nbytes // 2] ^= 0x40
    data_path.write_bytes(bytes(data))

    with TensorBundle(prefix) as bundle:
        np.testing.assert_array_equal(bundle.read("resnet_model/dense/bias"), other)
        with pytest.raises(FinegrainError, match=rf"Checksum mismatch for tensor '{name}'.*corrupt"):
            bundle.read(name)
    with TensorBundle(prefix, verify_checksums=False) as bundle:
        assert (bundle.read(name) != original).sum() == 1


def test_corrupted_index_block(tmp_path: Path) -> None:
    prefix = copy_fixture("resnet50_v1_w16", tmp_path)
    index = Path(f"{prefix}.index")
    data = bytearray(index.read_bytes())
    data[100] ^= 0x01
    index.write_bytes(bytes(data))
    with pytest.raises(FinegrainError, match=r"not a readable TensorFlow checkpoint index \(checksum"):
        TensorBundle(prefix)


@pytest.mark.parametrize("content", [b"not a checkpoint", bytes(range(256)) * 4])
def test_not_a_bundle_index(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "weights.index").write_bytes(content)
    (tmp_path / "weights.data-00000-of-00001").write_bytes(b"")
    match = r"not a readable TensorFlow checkpoint index \(bad table magic"
    with pytest.raises(FinegrainError, match=match):
        TensorBundle(tmp_path / "weights")


def test_table_without_bundle_header(tmp_path: Path) -> None:
    write_table(tmp_path / "old.index", [(b"conv/kernel", b"\x08\x01")])
    with pytest.raises(FinegrainError, match=r"no tensor-bundle header.*Re-save"):
        TensorBundle(tmp_path / "old")


@pytest.mark.parametrize("with_object_graph", [True, False])
def test_tf2_object_based_checkpoint(tmp_path: Path, with_object_graph: bool) -> None:
    tensors: dict[str, np.ndarray | RawTensor] = {
        "model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE": np.ones((3, 3), np.float32),
        "model/layer_with_weights-0/bias/.ATTRIBUTES/VARIABLE_VALUE": np.zeros(3, np.float32),
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE": np.array(1, np.int64),
    }
    if with_object_graph:
        graph = RawTensor(DT_STRING, (), b"\x05\x00\x00\x00\x00graph")
        tensors["_CHECKPOINTABLE_OBJECT_GRAPH"] = graph
    write_bundle(tmp_path / "ckpt-1", tensors)
    match = r"TensorFlow 2 object-based.*\.ATTRIBUTES/VARIABLE_VALUE.*tf\.compat\.v1\.train\.Saver\("
    with pytest.raises(FinegrainError, match=match):
        TensorBundle(tmp_path / "ckpt-1")


def test_string_partitioned_and_unknown_tensors(tmp_path: Path) -> None:
    write_bundle(tmp_path / "ckpt", {
        "labels": RawTensor(DT_STRING, (), b"\x03\x00\x00\x00\x00abc"),
        "big/kernel": RawTensor(1, (4, 2), b"", num_slices=2),
        "conv/kernel": np.ones((1, 1, 2, 2), np.float32),
    })
    with TensorBundle(tmp_path / "ckpt") as bundle:
        assert bundle.read("conv/kernel").sum() == 4
        with pytest.raises(FinegrainError, match=r"Tensor 'labels' has dtype string.*Skip it"):
            bundle.read("labels")
        with pytest.raises(FinegrainError, match=r"'big/kernel' is a partitioned variable \(2 slices\)"):
            bundle.read("big/kernel")
        with pytest.raises(FinegrainError, match=r"No tensor 'conv/kernal'.*Close names: conv/kernel"):
            bundle.read("conv/kernal")
        assert "conv/kernal" not in bundle


def test_big_endian_bundle_refused(tmp_path: Path) -> None:
    write_bundle(tmp_path / "ckpt", {"v": np.ones(2, np.float32)}, endianness=1)
    with pytest.raises(FinegrainError, match=r"big-endian.*Re-save"):
        TensorBundle(tmp_path / "ckpt")
