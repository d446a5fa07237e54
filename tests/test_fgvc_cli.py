"""`finegrain fgvc`, `finegrain eval` and `finegrain recipes` end to end on real demo photos."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import pytest
import torch
import typer
from typer.testing import CliRunner, Result

import finegrain
from finegrain.cli import eval as eval_cli
from finegrain.cli import fgvc as fgvc_cli
from finegrain.cli import recipes as recipes_cli
from finegrain.errors import FinegrainError
from finegrain.eval.classification import topk_accuracy
from finegrain.train import report
from finegrain.train.pretrained import convert_efficientnet_lite0, state_dict_by_key_order
from test_trainer import make_tiny_folder

app = typer.Typer()
app.command("fgvc")(fgvc_cli.fgvc)
app.command("eval")(eval_cli.evaluate)
app.add_typer(recipes_cli.app, name="recipes")
# A reduced, fast version of the demo recipe for the wiring tests.
TINY = ["--set", "model.overrides.base_width=4", "--set", "data.train_size=32", "--set", "data.eval_resize=32",
        "--set", "data.eval_crop=32", "--set", "train.batch_size=8", "--set", "train.epochs=1", "--quiet"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """See test_trainer.one_thread: one intra-op thread is 5-40x faster on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"))


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def fails_with(result: Result, pattern: str) -> None:
    assert isinstance(result.exception, FinegrainError), result.output
    assert re.search(pattern, str(result.exception)), str(result.exception)


def test_fgvc_trains_and_eval_reproduces_its_top1(tiny_data: Path, tmp_path: Path) -> None:
    result = run("fgvc", "--recipe", "demo", "--data", tiny_data, "--out", tmp_path / "run", *TINY)
    assert result.exit_code == 0, result.output
    # The demo starts from scratch on purpose: no loud warning; a recipe that expects weights warns.
    assert "RANDOM INITIALISATION" not in result.output and "best checkpoint" in result.output
    expecting = run("fgvc", "--recipe", "demo", "--data", tiny_data, "--out", tmp_path / "expecting", *TINY,
                    "--set", "model.expects_weights=true")
    assert expecting.exit_code == 0 and "RANDOM INITIALISATION" in expecting.output, expecting.output
    rows = report.read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1] and 0.0 <= rows[0]["val_top1"] <= 1.0  # the demo selects on val
    assert finegrain.load_model(tmp_path / "run" / "best.safetensors").arch == "assemble_resnet50"
    evaluated = run("eval", "--weights", tmp_path / "run" / "best.safetensors", "--data", tiny_data, "--json",
                    "--workers", "0", "--quiet")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["images"] == 12
    assert metrics["top1"] == pytest.approx(rows[0]["test_top1"])
    assert metrics["top5"] == pytest.approx(rows[0]["test_top5"])
    # Resuming a finished run from its directory alone (its own recipe.yaml) changes nothing.
    before = finegrain.load_model(tmp_path / "run" / "last.safetensors").state_dict()
    assert run("fgvc", "--resume", "--out", tmp_path / "run", "--quiet").exit_code == 0
    after = finegrain.load_model(tmp_path / "run" / "last.safetensors").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fails_with(run("fgvc", "--resume", "--out", tmp_path / "run", "--set", "optim.lr=0.5"),
               "started with optim.lr=0.1, now 0.5")
    fails_with(run("fgvc", "--recipe", "demo", "--data", tiny_data, "--out", tmp_path / "run", *TINY),
               "already holds a run.*--resume")


def test_eval_refuses_data_with_other_classes(tiny_data: Path, tmp_path: Path) -> None:
    assert run("fgvc", "--recipe", "demo", "--data", tiny_data, "--out", tmp_path / "run", *TINY).exit_code == 0
    other = make_tiny_folder(tmp_path / "other", first_class=3)
    fails_with(run("eval", "--weights", tmp_path / "run" / "last.safetensors", "--data", other, "--workers", "0"),
               "trained on 3 classes")


def test_bad_input_gets_one_clear_message(tiny_data: Path, tmp_path: Path) -> None:
    fails_with(run("fgvc", "--recipe", "food101", "--out", tmp_path / "a"), "No data folder given.*--data")
    fails_with(run("fgvc", "--recipe", "demo", "--data", tmp_path / "missing", "--out", tmp_path / "b"),
               "does not exist")
    fails_with(run("fgvc"), "No recipe given")
    fails_with(run("fgvc", "--recipe", "demo", "--set", "optim.lr=fast", "--out", tmp_path / "c"),
               "'optim.lr' must be a number")
    fails_with(run("fgvc", "--resume", "--out", tmp_path / "nothing"), "holds no recipe.yaml")
    # A plain state dict records no architecture: weights of another one are refused, naming it.
    other_arch = finegrain.create_model("resnet50", num_classes=3, base_width=4)
    torch.save(other_arch.state_dict(), tmp_path / "r50.pth")
    fails_with(run("fgvc", "--recipe", "demo", "--data", tiny_data, "--weights", tmp_path / "r50.pth",
                   "--out", tmp_path / "d", *TINY), "do not fit 'assemble_resnet50'")


def test_topk_accuracy_is_an_exact_fraction() -> None:
    """144 of 160 right is 0.9 exactly: counted in integers, divided in float64 (a float32 mean
    reports 0.8999999761581421, below a 90% promise it meets)."""
    labels = torch.arange(160) % 16
    logits = torch.nn.functional.one_hot(labels, 16).float()
    logits[:16] = torch.nn.functional.one_hot((labels[:16] + 1) % 16, 16).float()  # 16 wrong at top-1
    logits[:8] += torch.nn.functional.one_hot(labels[:8], 16) * 0.5  # 8 of them right at top-2
    logits[8:16] -= torch.nn.functional.one_hot(labels[8:16], 16) * 0.5  # 8 wrong at top-2 too
    accuracy = topk_accuracy(logits, labels, ks=(1, 2, 20))
    assert accuracy == {"top1": 0.9, "top2": 152 / 160, "top20": 1.0}
    assert all(type(value) is float for value in accuracy.values())


def test_recipes_list_and_show() -> None:
    listed = run("recipes")
    assert listed.exit_code == 0 and "fgvc/food101" in listed.output and "fgvc/demo" in listed.output
    shown = run("recipes", "show", "pets", "--json", "--set", "train.epochs=7")
    assert shown.exit_code == 0, shown.output
    resolved = json.loads(shown.stdout)
    assert resolved["name"] == "fgvc/pets" and resolved["train"]["epochs"] == 7
    assert resolved["regularization"]["dropblock"] == {"start": 0.9, "end": 0.7}
    as_yaml = run("recipes", "show", "fgvc/demo")
    assert as_yaml.exit_code == 0 and "base_width: 8" in as_yaml.stdout
    fails_with(run("recipes", "show", "pets", "--set", "train.epoch=3"), "Unknown recipe key 'train.epoch'")


def test_lite0_package_weights_load_by_key_order(tmp_path: Path) -> None:
    """The packaged EfficientNet-Lite0 maps onto timm's tf_efficientnet_lite0 tensor by tensor."""
    path = convert_efficientnet_lite0(tmp_path / "lite0.safetensors")
    model = finegrain.load_model(path)
    assert model.arch == "timm/tf_efficientnet_lite0" and model.preprocessing.mean == (127.5, 127.5, 127.5)
    with pytest.raises(FinegrainError, match="does not fit"):
        state_dict_by_key_order(dict(reversed(list(model.state_dict().items()))), model)


@pytest.mark.slow
def test_pretrained_lite0_fine_tunes_better_than_random_init(tmp_path: Path) -> None:
    """Transfer learning works: ImageNet EfficientNet-Lite0 beats the same network from scratch
    on the demo split with the same small budget (2 epochs, ~50 s each). A relative test: over
    seeds 0-3 pretrained ends at 39-55% top-1 and random init at 6-15%, 32-48 points apart
    (benchmarks/RESULTS_fgvc.md); 20 points leaves room for another CPU's rounding."""
    weights = convert_efficientnet_lite0(tmp_path / "lite0.safetensors")
    budget = ["--set", "model.name=timm/tf_efficientnet_lite0", "--set", "model.overrides={}",
              "--set", "model.reset_bn_stats=false", "--set", "train.epochs=2", "--set", "train.batch_size=16",
              "--set", "optim.lr=0.05", "--set", "eval.select_on=test", "--quiet"]  # as measured: best on test
    top1 = {}
    for name, extra in (("pretrained", ["--weights", weights]), ("random", [])):
        result = run("fgvc", "--recipe", "demo", "--out", tmp_path / name, *budget, *extra)
        assert result.exit_code == 0, result.output
        top1[name] = max(r["test_top1"] for r in report.read_metrics(tmp_path / name))
    assert top1["pretrained"] >= top1["random"] + 0.2, top1
