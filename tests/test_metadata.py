"""Checkpoint metadata: one typed record read and written one way, hostile files refused with one
clear message before any model is built, weights checked finite, and the frictions of issue 12
(architecture from the file, data set recorded, files 0644, the random-init banner)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import finegrain
from finegrain.cli import eval as eval_cli
from finegrain.cli import fgvc as fgvc_cli
from finegrain.cli import robustness as robustness_cli
from finegrain.data import DEMO_ROOT, load_splits
from finegrain.errors import FinegrainError
from finegrain.models import CheckpointInfo, DataRecord, check_classes, check_overrides, read_info, save_model
from finegrain.models.factory import warm_start_architecture
from finegrain.models.metadata import parse_metadata, to_metadata
from finegrain.preprocessing import Preprocessing
from test_trainer import make_tiny_folder

APP = typer.Typer()
APP.command("fgvc")(fgvc_cli.fgvc)
APP.command("robustness")(robustness_cli.robustness)
TINY = ["--set", "model.overrides.base_width=4", "--set", "data.train_size=32", "--set", "data.eval_resize=32",
        "--set", "data.eval_crop=32", "--set", "train.batch_size=8", "--set", "train.epochs=1", "--quiet"]


@pytest.fixture(scope="module")
def demo_classes() -> list[str]:
    return load_splits("folder", DEMO_ROOT)["test"].classes


@pytest.fixture()
def checkpoint(tmp_path: Path, demo_classes: list[str]) -> Path:
    """A small classifier of the demo classes, as `finegrain fgvc` writes them."""
    model = finegrain.create_model("resnet50", num_classes=len(demo_classes), base_width=4, layers=[1, 1, 1, 1])
    model.preprocessing = Preprocessing(resize=37, crop=32)
    return save_model(model, tmp_path / "model.safetensors", classes=tuple(demo_classes), task="fgvc", epoch=2,
                      recipe="fgvc/demo", metrics={"top1": 0.5}, data=DataRecord("folder", str(DEMO_ROOT)))


def rewrite(path: Path, out: Path, metadata: dict[str, str] | None = None,
            tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of a checkpoint with some metadata values or tensors replaced, as an editor would."""
    with safe_open(str(path), framework="pt") as handle:
        state = {name: handle.get_tensor(name) for name in handle.keys()}
        original = handle.metadata()
    save_file({**state, **(tensors or {})}, str(out), metadata={**original, **(metadata or {})})
    return out


def test_round_trip_keeps_every_field(checkpoint: Path, demo_classes: list[str]) -> None:
    info = read_info(checkpoint)
    assert (info.architecture, info.num_classes, info.overrides) == ("resnet50", 16, {"base_width": 4,
                                                                                    "layers": [1, 1, 1, 1]})
    assert info.classes == tuple(demo_classes) and info.task == "fgvc" and info.epoch == 2
    assert info.data == DataRecord("folder", str(DEMO_ROOT)) and info.metrics == {"top1": 0.5}
    assert info.preprocessing == Preprocessing(resize=37, crop=32) and info.version == finegrain.__version__
    assert to_metadata(parse_metadata(to_metadata(info), "x")) == to_metadata(info)
    model = finegrain.load_model(checkpoint)
    assert model.info == info and model.arch == "resnet50"


def test_files_written_with_the_historical_keys_still_load(tmp_path: Path) -> None:
    """The key vocabulary is the one finegrain always wrote: a file of an earlier version loads."""
    model = finegrain.create_model("mobilenet_v1", num_classes=2, base_width=8).eval()
    metadata = {"format": "pt", "finegrain.arch": "mobilenet_v1", "finegrain.num_classes": "2",
                "finegrain.overrides": '{"base_width": 8}', "finegrain.preprocessing": Preprocessing().to_json(),
                "finegrain.version": "0.1.0", "finegrain.classes": '["a", "b"]', "finegrain.epoch": "1",
                "finegrain.recipe": "fgvc/demo", "finegrain.metric.top1": "0.5", "finegrain.task": "backbone",
                "finegrain.data": json.dumps({"kind": "folder", "root": "/data/x", "options": {}})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata=metadata)
    loaded = finegrain.load_model(tmp_path / "old.safetensors").eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x), model(x)) and loaded.info.classes == ("a", "b")


HOSTILE = [
    ("finegrain.overrides", '{"base_width": 4, "layers": [1, 1, 1, 1]', "not valid JSON"),
    ("finegrain.overrides", '{"layers": [3, 4, 200000, 3]}', "layers.*integers in \\[1, 100\\]"),
    ("finegrain.overrides", '{"base_width": 100000}', "base_width.*integer in \\[2, 1024\\]"),
    ("finegrain.overrides", '{"base_width": 0}', "base_width.*integer in \\[2, 1024\\]"),
    ("finegrain.overrides", '{"base_widht": 4}', "Unknown override.*base_widht"),
    ("finegrain.overrides", '[1, 2]', "must be a JSON object"),
    ("finegrain.num_classes", "1b", "num_classes must be a whole number"),
    ("finegrain.num_classes", "99999999", "num_classes must be at most"),
    ("finegrain.num_classes", "17", "lists 16 names but finegrain.num_classes is 17"),
    ("finegrain.arch", "resnet5O", "finegrain.arch names no known model"),
    ("finegrain.preprocessing", '{"mean": [0, 0, 0], "std": [0, 1, 1], "train_size": 32, "resize": 37, "crop": 32}',
     "std must be a finite number"),
    ("finegrain.preprocessing", '{"mean": [0, 0, 0], "std": [NaN, 1, 1], "train_size": 32, "resize": 37, "crop": 32}',
     "std must be a finite number"),
    ("finegrain.preprocessing", '{"mean": [0, 0, 0], "std": [1, 1, 1], "train_size": 32, "resize": 37, "crop": 0}',
     "crop must be an integer"),
    ("finegrain.preprocessing", '{"mean": [0, 0, 0], "std": [1, 1, 1]}', "exactly the keys"),
    ("finegrain.classes", '"apple"', "list of class names"),
    ("finegrain.classes", json.dumps(["a"] * 16), "distinct names"),
    ("finegrain.data", '{"kind": "folder", "root": 3}', "root must be a folder path"),
    ("finegrain.data", '{"kind": "folder", "rootz": "/x"}', "JSON object"),
    ("finegrain.epoch", "three", "epoch must be a whole number"),
    ("finegrain.task", "fgvd", "task must be one of"),
    ("finegrain.metric.top1", "0.5x", "top1 must be a number"),
    ("finegrain.recall_ks", "[0, 1]", "recall_ks must be a JSON list"),
    ("finegrain.source_sha256", "abc", "64 lowercase hexadecimal"),
    ("finegrain.overrides", "[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ("finegrain.overrides", '{"layers": [1, 1, 1, 1], "gem_p": 1' + "0" * 400 + "}", "gem_p.*must be a number"),
    ("finegrain.preprocessing", '{"mean": [1' + "0" * 400 + ', 0, 0], "std": [1, 1, 1], "train_size": 32, '
     '"resize": 37, "crop": 32}', "mean must be a finite number"),
    ("finegrain.preprocessing", '{"mean": [' + "[" * 900 + "]" * 900 + ', 0, 0], "std": [1, 1, 1], "train_size": 32, '
     '"resize": 37, "crop": 32}', "mean must be a finite number"),
]


@pytest.mark.parametrize("key, value, message", HOSTILE)
def test_each_damaged_value_gives_one_error_naming_file_and_key(checkpoint: Path, tmp_path: Path, key: str,
                                                                 value: str, message: str) -> None:
    bad = rewrite(checkpoint, tmp_path / "bad.safetensors", {key: value})
    for read in (read_info, finegrain.load_model):
        with pytest.raises(FinegrainError, match=message) as caught:
            read(bad)
        assert str(bad) in str(caught.value) and "re-create it" in str(caught.value)


def test_missing_keys_and_damaged_headers(checkpoint: Path, tmp_path: Path) -> None:
    data = checkpoint.read_bytes()
    cases = {"short": data[:5], "huge_length": (2**40).to_bytes(8, "little") + data[8:], "truncated": data[:-100],
             "not_json": data[:8] + b"x" * (len(data) - 8)}
    for name, content in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        with pytest.raises(FinegrainError, match="re-create it"):
            finegrain.load_model(tmp_path / f"{name}.safetensors")
    with safe_open(str(checkpoint), framework="pt") as handle:
        state, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    del metadata["finegrain.preprocessing"]
    save_file(state, str(tmp_path / "partial.safetensors"), metadata=metadata)
    with pytest.raises(FinegrainError, match="finegrain.preprocessing is missing"):
        finegrain.load_model(tmp_path / "partial.safetensors")


def test_shapes_are_checked_before_the_model_is_built(checkpoint: Path, tmp_path: Path) -> None:
    """Metadata promising a 2 GB network around a 0.1 MB file fails from the header alone: the
    loading process grows by far less than the network's size (it would by 2 GB if it built it)."""
    big = rewrite(checkpoint, tmp_path / "big.safetensors",
                  {"finegrain.overrides": '{"base_width": 512, "layers": [1, 1, 1, 1]}'})
    script = ("import resource, sys, finegrain, finegrain.models\n"
              "from finegrain.errors import FinegrainError\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "try:\n    finegrain.load_model(sys.argv[1])\nexcept FinegrainError as error:\n    print(error)\n"
              "print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    done = subprocess.run([sys.executable, "-c", script, str(big)], capture_output=True, text=True, timeout=300)
    assert "shape conv1.weight: file (4, 3, 7, 7) vs model (512, 3, 7, 7)" in done.stdout, done.stdout + done.stderr
    assert int(done.stdout.split("grew_kb")[1]) < 200_000


def test_non_finite_weights_are_refused_unless_asked(checkpoint: Path, tmp_path: Path) -> None:
    with safe_open(str(checkpoint), framework="pt") as handle:
        weight = handle.get_tensor("layer2.0.conv2.weight")
    weight.view(-1)[3] = float("nan")
    nan = rewrite(checkpoint, tmp_path / "nan.safetensors", tensors={"layer2.0.conv2.weight": weight})
    with pytest.raises(FinegrainError, match="tensor layer2.0.conv2.weight holds 1 non-finite value"):
        finegrain.load_model(nan)
    assert torch.isnan(finegrain.load_model(nan, allow_non_finite=True).layer2[0].conv2.weight).any()
    # `finegrain eval` fails with that message (exit 2, no traceback), and evaluates with the opt-out.
    command = [sys.executable, "-m", "finegrain", "eval", "--weights", str(nan), "--data", str(DEMO_ROOT),
               "--workers", "0", "--quiet", "--json"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "non-finite" in refused.stderr and "Traceback" not in refused.stderr
    app = typer.Typer()
    app.command()(eval_cli.evaluate)
    allowed = CliRunner().invoke(app, command[4:] + ["--allow-non-finite"])
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["images"] == len(load_splits("folder", DEMO_ROOT)["test"])
    # and nothing non-finite is ever written
    model = finegrain.load_model(nan, allow_non_finite=True)
    with pytest.raises(FinegrainError, match="Not written"):
        save_model(model, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_check_classes_by_count_then_by_name() -> None:
    info = CheckpointInfo(num_classes=3, classes=("a", "b", "c"))
    check_classes(info, ["a", "b", "c"], "W", "D", "Fix it")
    with pytest.raises(FinegrainError, match="W predicts 3 classes, D has 4. Fix it."):
        check_classes(info, ["a", "b", "c", "d"], "W", "D", "Fix it")
    with pytest.raises(FinegrainError, match="trained on 3 classes.*it has class 1 'b' where D has 'c'"):
        check_classes(info, ["a", "c", "b"], "W", "D", "Fix it")
    check_classes(CheckpointInfo(num_classes=2), ["x", "y"], "W", "D", "Fix it")  # names not recorded: count only


def test_override_validation_for_recipes() -> None:
    assert check_overrides("resnet50", {"layers": [2, 2, 2, 2], "base_width": 16}) == {"layers": (2, 2, 2, 2),
                                                                                       "base_width": 16}
    for overrides, message in (({"base_width": True}, "base_width"), ({"gem_p": float("nan")}, "gem_p"),
                               ({"num_classes": 5}, "num_classes is not an override"),
                               ({"layers": [3, 1, 2, 3], "biglittle": [2, 4]}, "at least 2 blocks")):
        with pytest.raises(FinegrainError, match=message):
            check_overrides("resnet50", overrides)
    with pytest.raises(FinegrainError, match="drop_rate"):
        check_overrides("timm/resnet10t", {"layers": [1, 1, 1, 1]})


def test_embedder_call_gives_unit_vectors() -> None:
    embedder = finegrain.create_embedder("r50d_sk", embedding_size=8, base_width=4, layers=[1, 1, 1, 1]).eval()
    x = torch.randn(3, 3, 64, 64)
    out = embedder(x)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5) and torch.equal(out, embedder.forward_embedding(x))


def test_checkpoints_are_world_readable(checkpoint: Path) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    assert checkpoint.stat().st_mode & 0o777 == 0o666 & ~mask


def test_warm_start_uses_the_architecture_the_file_records(tmp_path: Path) -> None:
    """A file converted as resnet50 fine-tunes as resnet50 under a recipe whose model is assemble_resnet50."""
    converted = finegrain.create_model("resnet50", num_classes=10, base_width=4)
    path = save_model(converted, tmp_path / "r50.safetensors", source="r50.pth", source_kind="torchvision")
    name, overrides, note = warm_start_architecture("assemble_resnet50", {"base_width": 8}, path)
    assert (name, overrides) == ("resnet50", {"base_width": 4}) and "as recorded in" in note
    assert warm_start_architecture("resnet50", {"base_width": 4}, path) == ("resnet50", {"base_width": 4}, None)


def test_fgvc_from_converted_file_records_its_data_and_robustness_reads_it(tmp_path: Path) -> None:
    data = make_tiny_folder(tmp_path / "tiny")
    converted = finegrain.create_model("resnet50", num_classes=1000, base_width=4)
    weights = save_model(converted, tmp_path / "r50.safetensors", source="r50.pth", source_kind="torchvision")
    run = tmp_path / "run"
    result = CliRunner().invoke(APP, ["fgvc", "--recipe", "demo", "--data", str(data), "--weights", str(weights),
                                      "--out", str(run), *TINY])
    assert result.exit_code == 0, result.output
    assert "resnet50" in result.output and "as recorded in" in result.output
    assert "RANDOM INITIALISATION" not in result.output
    info = read_info(run / "last.safetensors")
    assert info.architecture == "resnet50" and info.data == DataRecord("folder", str(data.resolve()))
    assert info.classes == tuple(load_splits("folder", data)["train"].classes) and info.task == "fgvc"
    for name in ("last.safetensors", "best.safetensors"):
        assert (run / name).stat().st_mode & 0o777 == 0o644 & ~_umask()
    quick = ["--corruptions", "gaussian_noise", "--severities", "1", "--frames", "0", "--max-images", "1",
             "--throughput-iters", "0", "--workers", "0", "--device", "cpu", "--cache", str(tmp_path / "cache")]
    measured = CliRunner().invoke(APP, ["robustness", "--weights", str(run / "last.safetensors"), *quick])
    assert measured.exit_code == 0, measured.output
    written = json.loads((run / "last.robustness.json").read_text())
    assert written["data"]["root"] == str(data.resolve()) and "recorded in the weights" in measured.output
    moved = tmp_path / "moved"
    data.rename(moved)
    refused = CliRunner().invoke(APP, ["robustness", "--weights", str(run / "last.safetensors"), *quick])
    assert isinstance(refused.exception, FinegrainError) and "Pass --data DIR" in str(refused.exception)


def test_fgvc_demo_from_scratch_does_not_shout(tmp_path: Path) -> None:
    result = CliRunner().invoke(APP, ["fgvc", "--recipe", "demo", "--data", str(make_tiny_folder(tmp_path / "t")),
                                      "--out", str(tmp_path / "run"), *TINY])
    assert result.exit_code == 0, result.output
    assert "RANDOM INITIALISATION" not in result.output


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
