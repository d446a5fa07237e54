"""The release converter against logits TensorFlow computed with the authors' own graph code."""
import json
import shutil
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
    import subprocess
    import sys

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
