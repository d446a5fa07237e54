"""The release converter against logits TensorFlow computed with the authors' own graph code."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import finegrain
from finegrain.cli import app
from finegrain.convert.release import convert_release
from finegrain.errors import FinegrainError
from finegrain.fileio import sha256_file
from finegrain.preprocessing import RELEASE_BL

FIXTURES = Path(__file__).parent / "fixtures" / "release"
CASES = [
    ("assemble_r50_w16", "assemble_resnet50", [("input", "logits"), ("input_96", "logits_96")]),
    ("resnet50_v1_w16", "resnet50", [("input", "logits")]),
    ("assemble_r50_ir_w8", "assemble_resnet50", [("input", "logits")]),
]


def nchw(name: str, fixture: str) -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / fixture / f"{name}.npy")).permute(0, 3, 1, 2)


def assert_matches(ours: torch.Tensor, reference: np.ndarray) -> None:
    tolerance = 1e-4 * max(1.0, float(np.abs(reference).max()))
    assert float(np.abs(ours.detach().numpy() - reference).max()) <= tolerance


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each fixture converted through the CLI, as a user runs it, then rebuilt by load_model."""
    out = tmp_path_factory.mktemp("converted")
    runner = CliRunner()
    paths = {}
    for fixture, arch, _ in CASES:
        path = out / f"{fixture}.safetensors"
        result = runner.invoke(app, ["convert", str(FIXTURES / fixture / "model.ckpt"), "--arch", arch, "--out", str(path)])
        assert result.exit_code == 0, result.output
        paths[fixture] = path
    return paths


@pytest.mark.parametrize("fixture, arch, pairs", CASES)
def test_converted_checkpoint_reproduces_tf_logits(converted, fixture, arch, pairs):
    model = finegrain.load_model(converted[fixture]).eval()
    with torch.no_grad():
        for inputs, logits in pairs:
            assert_matches(model(nchw(inputs, fixture)), np.load(FIXTURES / fixture / f"{logits}.npy"))


def test_retrieval_fixture_embedding_and_pooling(converted):
    fixture = "assemble_r50_ir_w8"
    model = finegrain.load_model(converted[fixture]).eval()
    x = nchw("input", fixture)
    with torch.no_grad():
        features = model.forward_features(x)
        assert_matches(model.pool(features), np.load(FIXTURES / fixture / "pooled.npy"))
        assert_matches(model.forward_head(features, pre_logits=True), np.load(FIXTURES / fixture / "embedding.npy"))
        unit = model.forward_embedding(x)
    reference = np.load(FIXTURES / fixture / "embedding.npy")
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert_matches(unit, reference)


def test_metadata_rebuilds_model_and_records_release_preprocessing(converted):
    model = finegrain.load_model(converted["assemble_r50_w16"])
    meta = model.metadata
    assert meta["finegrain.arch"] == "assemble_resnet50"
    assert json.loads(meta["finegrain.overrides"])["base_width"] == 16
    assert meta["finegrain.num_classes"] == "1001"
    assert meta["finegrain.source_sha256"] == sha256_file(FIXTURES / "assemble_r50_w16" / "model.ckpt.index")
    assert model.preprocessing == RELEASE_BL
    v1 = finegrain.load_model(converted["resnet50_v1_w16"])
    assert json.loads(v1.metadata["finegrain.overrides"])["maxpool_padding"] == "tf_same"
    # create_model accepts the converted file too.
    again = finegrain.create_model("assemble_resnet50", num_classes=1001, base_width=16, weights=str(converted["assemble_r50_w16"]))
    assert again.preprocessing == RELEASE_BL


def test_torch_max_pool_padding_would_not_match():
    """The release's TF-SAME pool is a real difference, not a convention we could drop."""
    fixture = "resnet50_v1_w16"
    model = convert_release(FIXTURES / fixture / "model.ckpt", "resnet50")
    model.maxpool = torch.nn.MaxPool2d(3, 2, 1)
    with torch.no_grad():
        diff = (model(nchw("input", fixture)) - torch.from_numpy(np.load(FIXTURES / fixture / "logits.npy"))).abs().max()
    assert diff > 1e-2


def test_drop_background_gives_1000_classes(tmp_path):
    out = tmp_path / "bg.safetensors"
    result = CliRunner().invoke(app, ["convert", str(FIXTURES / "assemble_r50_w16" / "model.ckpt"), "--arch",
                                      "assemble_resnet50", "--out", str(out), "--drop-background"])
    assert result.exit_code == 0, result.output
    model = finegrain.load_model(out).eval()
    x = nchw("input", "assemble_r50_w16")
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 1000)
    assert_matches(logits, np.load(FIXTURES / "assemble_r50_w16" / "logits.npy")[:, 1:])


def test_checkpoint_of_another_architecture_is_refused():
    with pytest.raises(FinegrainError, match="does not fit 'resnet101'|does not look like"):
        convert_release(FIXTURES / "resnet50_v1_w16" / "model.ckpt", "resnet101")
    with pytest.raises(FinegrainError, match="does not look like the release graph of 'resnet50'"):
        convert_release(FIXTURES / "assemble_r50_w16" / "model.ckpt", "resnet50")


def test_corrupted_byte_and_missing_shard_are_refused(tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "resnet50_v1_w16", copy)
    data = copy / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(FinegrainError, match="(?i)checksum|crc"):
        convert_release(copy / "model.ckpt", "resnet50")
    data.unlink()
    with pytest.raises(FinegrainError, match="missing"):
        convert_release(copy / "model.ckpt", "resnet50")


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "finegrain", "convert", str(tmp_path / "nope"), "--arch",
                             "assemble_resnet50", "--out", str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "No checkpoint index" in result.stderr


def test_torchvision_state_dict_converts_with_metadata(tmp_path):
    import torchvision

    reference = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    out = tmp_path / "tv.safetensors"
    result = CliRunner().invoke(app, ["convert", str(path), "--from", "torchvision", "--arch", "resnet50", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = finegrain.load_model(out).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() < 1e-4
    assert model.metadata["finegrain.source_kind"] == "torchvision"


# ---------------------------------------------------------------- every way of naming the checkpoint
@pytest.mark.parametrize("given", [".", "model.ckpt.index", "model.ckpt.data-00000-of-00001"])
def test_cli_accepts_folder_index_and_data_file(converted, tmp_path, given):
    """The folder (with its `checkpoint` file), the .index and a .data-* file convert exactly as the prefix does."""
    out = tmp_path / "out.safetensors"
    source = FIXTURES / "resnet50_v1_w16" / given
    result = CliRunner().invoke(app, ["convert", str(source), "--arch", "resnet50", "--out", str(out)])
    assert result.exit_code == 0, result.output
    ours, reference = finegrain.load_model(out), finegrain.load_model(converted["resnet50_v1_w16"])
    assert ours.metadata == reference.metadata  # source "model.ckpt", the index's sha256, ...
    assert ours.metadata["finegrain.source"] == "model.ckpt"
    for (name, value), (_, expected) in zip(ours.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(value, expected), name


# ---------------------------------------------------------------- crafted but valid-looking checkpoints
def rewritten(tmp_path, change):
    """The resnet50_v1_w16 fixture re-written (valid checksums throughout) after `change(tensors)`."""
    from fuzz.tf_bundle_codec import write_bundle

    from finegrain.convert.tf_bundle import TensorBundle

    with TensorBundle(FIXTURES / "resnet50_v1_w16" / "model.ckpt") as bundle:
        tensors = {name: bundle.read(name) for name in bundle.names()}
    change(tensors)
    write_bundle(tmp_path / "model.ckpt", tensors)
    return tmp_path / "model.ckpt"


KERNEL = "resnet_model/conv2d_5/kernel"


def _set(name, value):
    return lambda tensors: tensors.__setitem__(name, value(tensors[name]))


@pytest.mark.parametrize("change, use_ema, match", [
    (lambda t: t.pop(KERNEL), False, rf"variables the model needs but the checkpoint lacks: {KERNEL}"),
    (_set(KERNEL, lambda a: a.transpose(3, 2, 0, 1).copy()), False, rf"shape mismatches: {KERNEL} \[16, 64, 1, 1\]"),
    (_set(KERNEL, lambda a: a.reshape(2, -1).copy()), False, rf"shape mismatches: {KERNEL} \[2, 512\]"),
    (_set(KERNEL, lambda a: a.astype(np.int32)), False, rf"not float arrays: {KERNEL} \(int32\)"),
    (_set(KERNEL, lambda a: np.where(a > 0, np.nan, a)), False, rf"{KERNEL} in .* holds NaN or infinite"),
    (lambda t: t.__setitem__(f"{KERNEL}/Momentum", np.arange(3)), False, None),  # optimizer slots are not read
    (lambda t: t.__setitem__(f"{KERNEL}/ExponentialMovingAverage", t[KERNEL][..., :1].copy()), True,
     rf"shape mismatches: {KERNEL}/ExponentialMovingAverage \[1, 1, 64, 1\]"),
    (_set("resnet_model/conv2d/kernel", lambda a: a.reshape(-1, 16)), False,
     r"conv2d/kernel in .* has shape \[147, 16\], but the release graph of 'resnet50' has a non-empty 4-D"),
    (_set("resnet_model/dense/bias", lambda a: a[:0]), False, r"dense/bias .* has shape \[0\]"),
])
def test_crafted_checkpoint_fails_clearly(tmp_path, change, use_ema, match):
    prefix = rewritten(tmp_path, change)
    if match is None:
        assert convert_release(prefix, "resnet50") is not None
        return
    with pytest.raises(FinegrainError, match=match):
        convert_release(prefix, "resnet50", use_ema=use_ema)


def test_crafted_width_is_refused_before_the_model_is_built(tmp_path):
    """A stem claiming base width 1024 (a 6-billion-parameter resnet50) fails on shapes, with
    the child's address space held to 2 GiB more than after its imports."""
    stem = "resnet_model/conv2d/kernel"
    prefix = rewritten(tmp_path, _set(stem, lambda a: np.zeros((7, 7, 3, 1024), np.float32)))
    child = (
        "import resource, sys\n"
        "from finegrain.convert.release import convert_release\n"
        "from finegrain.errors import FinegrainError\n"
        "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize:')).split()[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**31, vm + 2**31))\n"
        "try:\n"
        "    convert_release(sys.argv[1], 'resnet50')\n"
        "except FinegrainError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", child, str(prefix)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"does not fit 'resnet50'\. \d+ shape mismatches: .* -> bn1\.weight \[1024\]", result.stdout)


def test_cli_refuses_hostile_index_in_one_line(tmp_path):
    """The review's case through the command: a CRC-correct index asking for 2**31 - 1 shards."""
    from fuzz.tf_bundle_codec import encode_table, entry_proto, header_proto

    entries = [(f"resnet_model/layer_{i:05d}/kernel".encode(), entry_proto(1, (2,), 0, 0, 8, 0)) for i in range(800)]
    (tmp_path / "model.ckpt.index").write_bytes(encode_table([(b"", header_proto(2**31 - 1)), *entries]))
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    result = subprocess.run([sys.executable, "-m", "finegrain", "convert", str(tmp_path), "--arch", "resnet50",
                             "--out", str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert re.search(r"model\.ckpt\.index is not a readable TensorFlow checkpoint index \(header names 2147483647",
                     " ".join(result.stderr.split()))
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("change, match", [
    (lambda state: {"fc.weight": torch.tensor(1.0)}, r"has no 2-D fc\.weight"),
    (lambda state: {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}, r"missing layer1\.0\.conv1\.weight"),
    (lambda state: {**state, "layer1.0.conv3.weight": state["layer1.0.conv3.weight"].transpose(0, 1)},
     r"shape layer1\.0\.conv3\.weight"),
    (lambda state: {**state, "fc.bias": torch.full_like(state["fc.bias"], float("nan"))}, r"(?i)fc\.bias.*(nan|finite)"),
])
def test_crafted_torchvision_state_dict_fails_clearly(tmp_path, change, match):
    import torchvision

    path = tmp_path / "tv.pth"
    torch.save(change(torchvision.models.resnet50(weights=None).state_dict()), path)
    result = CliRunner().invoke(app, ["convert", str(path), "--from", "torchvision", "--arch", "resnet50",
                                      "--out", str(tmp_path / "out.safetensors")])
    assert result.exit_code != 0 and isinstance(result.exception, FinegrainError), result.output
    assert re.search(match, str(result.exception)), result.exception
    assert not (tmp_path / "out.safetensors").exists()


def test_state_dict_without_from_is_pointed_to_it(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save({"fc.weight": torch.zeros(2, 3)}, path)
    result = CliRunner().invoke(app, ["convert", str(path), "--arch", "resnet50", "--out", str(tmp_path / "o.safetensors")])
    assert isinstance(result.exception, FinegrainError)
    assert re.search(r"tv\.pth looks like a PyTorch state dict.*--from torchvision", str(result.exception))
