"""TensorBundle against checkpoints TensorFlow wrote (tests/fixtures/release) and against files
crafted by a minimal independent writer (tests/fuzz/tf_bundle_codec.py), which builds what TF
cannot be asked for here (TF2 object-based names, every dtype, several shards, small blocks,
broken files). Hostile, CRC-correct indexes are in test_tf_bundle_hostile.py."""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from fuzz.tf_bundle_codec import (
    DT_BFLOAT16, DT_STRING, TF_DTYPE_OF, RawTensor, assemble_table, encode_block, encode_table, entry_proto,
    field_bytes, field_varint, frame, header_proto, masked, varint, wrap_blocks, write_bundle, write_table,
)

from finegrain.convert.tf_bundle import TensorBundle
from finegrain.errors import FinegrainError

RELEASE = Path(__file__).parent / "fixtures" / "release"
FIXTURES = ["assemble_r50_w16", "assemble_r50_ir_w8", "resnet50_v1_w16"]


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


# ---------------------------------------------------------------- hostile, CRC-correct indexes
# Each case writes PREFIX.index (valid checksums, so only the reader's own checks can stop it)
# and an 8-byte shard, and names what the refusal must say. All are opened in one child process
# whose address space may grow by at most BOUND_MB and each case by at most SECONDS.
BOUND_MB, SECONDS = 512, 20
DATA = np.arange(2, dtype=np.float32).tobytes()
GOOD = entry_proto(1, (2,), 0, 0, 8, masked(DATA))


def crafted(folder: Path, entries: list[tuple[bytes, bytes]], header: bytes = header_proto(),
            index: bytes | None = None) -> Path:
    folder.mkdir()
    (folder / "ckpt.index").write_bytes(index if index is not None else encode_table([(b"", header), *entries]))
    (folder / "ckpt.data-00000-of-00001").write_bytes(DATA)
    return folder / "ckpt"


def one_tensor(value: bytes) -> Callable[[Path], Path]:
    return lambda folder: crafted(folder, [(b"w", value)])


def with_header(header: bytes) -> Callable[[Path], Path]:
    return lambda folder: crafted(folder, [(b"w", GOOD)], header)


def many_names(count: int) -> list[tuple[bytes, bytes]]:
    return [(f"resnet_model/layer_{i:05d}/kernel".encode(), GOOD) for i in range(count)]


def growing_slice_keys(folder: Path) -> Path:
    """Slice keys (skipped by the reader) that each add one byte to the previous key: 20 KB
    of entries that prefix compression expands to 12 MB of keys, copied one by one."""
    block = bytearray(varint(0) + varint(0) + varint(len(header_proto())) + header_proto())
    for length in range(5000):
        block += varint(length) + varint(1) + varint(0) + (b"a" if length else b"\x00")
    return crafted(folder, [], index=wrap_blocks([bytes(block) + struct.pack("<2I", 0, 1)]))


def one_block_many_handles(folder: Path) -> Path:
    """An index block whose 2,000 handles all point at the same data block."""
    block = encode_block([(b"", header_proto()), *many_names(50)], 1)
    handle = varint(0) + varint(len(block))
    return crafted(folder, [], index=assemble_table(frame(block), [(b"k%05d" % i, handle) for i in range(2000)]))


def block_of_size(size: int) -> Callable[[Path], Path]:
    block = encode_block([(b"", header_proto())], 1)
    return lambda folder: crafted(folder, [], index=assemble_table(frame(block), [(b"k", varint(0) + varint(size))]))


HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    # The review's case: a 40 KB index whose header asks for 2**31 - 1 shard paths.
    "huge_shard_count": (lambda d: crafted(d, many_names(800), header_proto(2**31 - 1)),
                         r"header names 2147483647 data shards"),
    "negative_shard_count": (with_header(header_proto(-5)), r"header names -5 data shards"),
    "many_shards_missing": (with_header(header_proto(99_999)), r"ckpt\.data-00000-of-99999 is missing"),
    "int32_overflow": (with_header(field_varint(1, 1 << 40)), r"'num_shards' is 1099511627776, outside the int32"),
    "header_wire_type": (with_header(field_bytes(1, b"\x01")), r"'num_shards' has protobuf wire type 2"),
    "version_wire_type": (with_header(field_varint(1, 1) + field_varint(3, 1)), r"'version' has protobuf wire type 0"),
    "endianness": (with_header(field_varint(1, 1) + field_varint(2, 7)), r"endianness 7 is neither"),
    "newer_version": (with_header(field_varint(1, 1) + field_bytes(3, field_varint(2, 9))), r"version 9"),
    "wire_type_group": (with_header(varint(1 << 3 | 3)), r"unsupported protobuf wire type 3"),
    "field_number_0": (with_header(field_varint(0, 1)), r"field number 0"),
    "negative_dimension": (one_tensor(entry_proto(1, (-1, 2), 0, 0, 8, 0)), r"'w' has shape \[-1, 2\] with a negative"),
    "product_wraps_int64": (one_tensor(entry_proto(1, (1 << 32, 1 << 32), 0, 0, 0, 0)), r"more than 2\*\*40 elements"),
    "empty_but_huge": (one_tensor(entry_proto(1, (0, 1 << 62, 1 << 62), 0, 0, 0, 0)), r"more than 2\*\*40 elements"),
    "rank_33": (one_tensor(entry_proto(1, (1,) * 33, 0, 0, 4, 0)), r"33 dimensions, more than 32"),
    "unknown_rank": (one_tensor(field_varint(1, 1) + field_bytes(2, field_varint(3, 1))), r"unknown rank"),
    "size_not_shape": (one_tensor(entry_proto(1, (3,), 0, 0, 8, 0)), r"has 8 bytes but shape \[3\] of float32 needs 12"),
    "offset_past_eof": (one_tensor(entry_proto(1, (2,), 0, 1 << 62, 8, 0)), r"data-00000-of-00001 is truncated"),
    "negative_offset": (one_tensor(entry_proto(1, (2,), 0, -8, 8, 0)), r"offset -8 and size 8; neither may be negative"),
    "shard_out_of_range": (one_tensor(entry_proto(1, (2,), 3, 0, 8, 0)), r"names shard 3 of 1"),
    "unknown_dtype": (one_tensor(entry_proto(99, (2,), 0, 0, 8, 0)), r"'w' has unknown DataType 99"),
    "invalid_dtype": (one_tensor(entry_proto(0, (2,), 0, 0, 8, 0)), r"unknown DataType 0"),
    "string_bigger_than_bytes": (one_tensor(entry_proto(DT_STRING, (1000,), 0, 0, 8, 0)), r"more elements than its 8"),
    "partitioned_huge": (one_tensor(entry_proto(1, (1 << 20,), 0, 0, 0, 0, num_slices=2)), r"partitioned tensor 'w'"),
    "entry_wire_type": (one_tensor(field_varint(1, 1) + field_varint(6, 5)), r"'crc32c' has protobuf wire type 0"),
    "shape_wire_type": (one_tensor(field_varint(1, 1) + field_varint(2, 5)), r"'shape' has protobuf wire type 0"),
    "truncated_varint": (one_tensor(GOOD + b"\x80"), r"tensor 'w': truncated varint"),
    "overlong_varint": (one_tensor(b"\x08" + b"\xff" * 10 + b"\x01"), r"varint longer than 64 bits"),
    "length_past_message": (one_tensor(b"\x12\x7f\x00"), r"runs past its message"),
    "name_not_utf8": (lambda d: crafted(d, [(b"\xff\xfe", GOOD)]), r"can't decode|invalid start byte"),
    "duplicate_key": (lambda d: crafted(d, [(b"w", GOOD), (b"w", GOOD)]), r"duplicate key b'w'"),
    "unsorted_keys": (lambda d: crafted(d, [(b"w", GOOD), (b"v", GOOD)]), r"out-of-order key b'v'"),
    "no_header": (lambda d: crafted(d, [], index=encode_table([(b"w", GOOD)])), r"no tensor-bundle header"),
    "absurd_block_size": (block_of_size(1 << 40), r"block of 1099511627776 bytes at byte 0 does not fit"),
    "block_size_0": (block_of_size(0), r"block of 0 bytes"),
    "overlapping_blocks": (one_block_many_handles, r"data block at byte 0 overlaps"),
    "absurd_restart_count": (lambda d: crafted(d, [], index=wrap_blocks([b"\xff\xff\xff\x7f"])), r"restart points"),
    "compressed_block": (lambda d: crafted(d, [], index=wrap_blocks([encode_block([(b"", header_proto())], 1)],
                                                                     compression=1)), r"compressed block"),
    "growing_slice_keys": (growing_slice_keys, r"expand to far more bytes than the file holds"),
}

CHILD = r"""
import json, resource, signal, sys, time
from finegrain.convert.tf_bundle import TensorBundle
from finegrain.errors import FinegrainError

def timeout(*_):
    raise TimeoutError
signal.signal(signal.SIGALRM, timeout)
vm_bytes = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize:")).split()[1]) * 1024
limit = vm_bytes + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
results = {}
for prefix in sys.argv[3:]:
    start = time.monotonic()
    signal.alarm(int(sys.argv[2]))
    try:
        TensorBundle(prefix).close()
        outcome = ("opened", "")
    except FinegrainError as error:
        outcome = ("FinegrainError", str(error))
    except BaseException as error:
        outcome = (type(error).__name__, repr(error))
    signal.alarm(0)
    results[prefix] = [*outcome, time.monotonic() - start]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hostile_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """Every HOSTILE case opened in one child process with bounded memory and time per case."""
    root = tmp_path_factory.mktemp("hostile")
    prefixes = {case: str(build(root / case)) for case, (build, _) in HOSTILE.items()}
    result = subprocess.run([sys.executable, "-c", CHILD, str(BOUND_MB), str(SECONDS), *prefixes.values()],
                            capture_output=True, text=True, timeout=SECONDS * len(HOSTILE) + 60)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout)
    return {case: outcomes[prefix] for case, prefix in prefixes.items()}


@pytest.mark.skipif(sys.platform != "linux", reason="the memory bound reads /proc and sets RLIMIT_AS")
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_index_refused_in_bounded_time_and_memory(hostile_outcomes: dict[str, list], case: str) -> None:
    kind, message, seconds = hostile_outcomes[case]
    assert kind == "FinegrainError", f"{case}: {kind} {message} after {seconds:.1f}s"
    assert re.search(HOSTILE[case][1], message), message
    assert f"{case}/ckpt" in message  # names the file
    assert re.search(r"(?i)copy|pass|re-save", message)  # and the fix


def test_crafted_index_is_still_valid_apart_from_the_defect(tmp_path: Path) -> None:
    """The hostile cases differ from a readable index only by their defect."""
    prefix = crafted(tmp_path / "good", [(b"w", GOOD)])
    with TensorBundle(prefix) as bundle:
        np.testing.assert_array_equal(bundle.read("w"), [0, 1])
    with TensorBundle(one_tensor(entry_proto(DT_STRING, (8,), 0, 0, 8, 0))(tmp_path / "strings")) as bundle:
        assert bundle.shape("w") == (8,)


def test_index_larger_than_any_real_one_is_refused_unread(tmp_path: Path) -> None:
    with open(tmp_path / "ckpt.index", "wb") as handle:
        handle.truncate(65 << 20)  # sparse: costs no disk
    with pytest.raises(FinegrainError, match=r"ckpt\.index is 68157440 bytes, more than any TF checkpoint index"):
        TensorBundle(tmp_path / "ckpt")


@pytest.mark.parametrize("state, match", [
    (None, r"folder without a TF 'checkpoint' file.*This folder holds: model\.ckpt"),
    (b"all_model_checkpoint_paths: \"x\"\n", r"names no checkpoint.*Pass the checkpoint prefix"),
    (b"\xff\xfe" * 1000 + b"\nmodel_checkpoint_path: \"model.ckpt\"\n", None),
])
def test_checkpoint_state_file_problems(tmp_path: Path, state: bytes | None, match: str | None) -> None:
    copy_fixture("resnet50_v1_w16", tmp_path)
    if state is not None:
        (tmp_path / "checkpoint").write_bytes(state)
    if match is None:  # undecodable bytes around the one line that matters are no obstacle
        assert len(TensorBundle(tmp_path).names()) == 271
    else:
        with pytest.raises(FinegrainError, match=match):
            TensorBundle(tmp_path)
