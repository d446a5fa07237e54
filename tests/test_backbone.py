"""Backbone pretraining (`finegrain backbone train`), its recipes, and offline KD teacher logits."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import finegrain
from finegrain.data import DEMO_ROOT, ImageDataset, load_splits
from finegrain.data.transforms import eval_transform
from finegrain.errors import FinegrainError
from finegrain.fileio import sha256_file
from finegrain.recipes import BackboneRecipe, list_recipes, load_recipe
from finegrain.train.backbone import BackboneTask, build_backbone_model, run_backbone
from finegrain.train.distill import teacher_logits_for_split
from finegrain.train.fgvc import build_fgvc_model, run_fgvc
from finegrain.train.teacher_logits import write_teacher_logits
from finegrain.train.trainer import TrainBatch

CPU = torch.device("cpu")
# Tiny widths, 64 px, 3 classes x 8 photos, batch 8: a few seconds per run.
TINY = ["model.overrides={base_width: 8}", "data.train_size=64", "data.eval_resize=72", "data.eval_crop=64",
        "train.batch_size=8", "train.epochs=2", "train.workers=0", "schedule.warmup_epochs=1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against other processes
    (a tiny step goes from ~0.3 s to ~3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def copy_demo(root: Path, classes: int = 3, train: int = 8, test: int = 4) -> Path:
    """A demo subset in the ImageNet layout (train/<class>/*, val/<class>/*)."""
    for split, target, count in (("train", "train", train), ("test", "val", test)):
        for name in sorted(p.name for p in (DEMO_ROOT / "train").iterdir())[:classes]:
            (root / target / name).mkdir(parents=True)
            for path in sorted((DEMO_ROOT / split / name).iterdir())[:count]:
                shutil.copyfile(path, root / target / name / path.name)
    return root


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_demo(tmp_path_factory.mktemp("tiny"))


def tiny_recipe(root: Path, *extra: str) -> BackboneRecipe:
    return load_recipe("demo", [*TINY, f"data.root={json.dumps(str(root))}", *extra], group="backbone",
                       schema=BackboneRecipe)


@pytest.fixture(scope="module")
def pretrained(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-epoch pretraining run through the CLI (LS + Mixup type 1 + DropBlock, as the demo)."""
    from finegrain.cli.backbone import app

    run = tmp_path_factory.mktemp("runs") / "pretrain"
    result = CliRunner().invoke(app, ["train", "--recipe", "demo", "--data", str(tiny_root), "--out", str(run),
                                      "--quiet", *[a for item in TINY for a in ("--set", item)]])
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output and "best.safetensors" in result.output
    return run


# ------------------------------------------------------------------------------------ recipes
# (model, epochs, label smoothing, Mixup type, DropBlock end keep_prob, KD, AutoAugment, eval resize, eval crop)
PAPER = {
    "e0_r50": ("resnet50", 120, 0.0, None, 1.0, False, None, 256, 224),  # Table 7 E0
    "e3_r50d": ("resnet50d", 200, 0.1, 1, 1.0, False, None, 256, 224),  # E3
    "e5_r50d_se": ("r50d_se", 270, 0.1, 1, 0.9, False, None, 256, 224),  # E5
    "e7_r50d_sk": ("r50d_sk", 270, 0.1, 1, 0.9, True, None, 256, 224),  # E7
    "assemble_resnet50": ("assemble_resnet50", 600, 0.1, 1, 0.9, True, "release_imagenet", 292, 256),  # E11
    "assemble_resnet152": ("assemble_resnet152", 600, 0.1, 1, 0.9, True, "release_imagenet", 257, 256),  # E12
    "mobilenet_v1_m0": ("mobilenet_v1", 120, 0.0, None, 1.0, False, None, 256, 224),  # Table 9 M0
    "mobilenet_v1_m5": ("mobilenet_v1", 360, 0.1, 1, 1.0, True, None, 256, 224),  # M5
    "se_mobilenet_v1_m8": ("se_mobilenet_v1_r2", 900, 0.1, 1, 0.95, True, None, 256, 224),  # M8
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_backbone_recipes_mirror_tables_7_and_9(name: str) -> None:
    recipe = load_recipe(name, group="backbone", schema=BackboneRecipe)
    model, epochs, smoothing, mixup, keep_end, kd, autoaugment, resize, crop = PAPER[name]
    reg = recipe.regularization
    assert (recipe.model.name, recipe.train.epochs, recipe.model.weights) == (model, epochs, None)
    assert (reg.label_smoothing, reg.mixup.type, reg.mixup.alpha) == (smoothing, mixup, 0.2)
    assert (reg.dropblock.start, reg.dropblock.end, recipe.kd_required, reg.kd.temperature) == (1.0, keep_end, kd, 1.0)
    assert (reg.autoaugment, reg.kd.logits) == (autoaugment, None)
    assert (recipe.data.train_size, recipe.data.eval_resize, recipe.data.eval_crop) == (224, resize, crop)
    optim = recipe.optim
    assert (optim.lr, recipe.train.batch_size, optim.weight_decay, optim.momentum) == (0.4, 1024, 1e-4, 0.9)
    assert (recipe.schedule.warmup_epochs, recipe.schedule.final_lr) == (5.0, 0.0)
    assert (recipe.train.bn_momentum_rule, recipe.train.bn_momentum) == (False, 0.997)  # the release's, TF terms
    assert recipe.effective_lr() == 0.4
    smaller = load_recipe(name, ["train.batch_size=256"], group="backbone", schema=BackboneRecipe)
    assert smaller.effective_lr() == pytest.approx(0.1)  # He et al.: 0.1 x 256 / 256


def test_every_backbone_recipe_validates_with_its_schema() -> None:
    names = [n for n in list_recipes() if n.startswith("backbone/")]
    assert {f"backbone/{n}" for n in [*PAPER, "demo"]} <= set(names)  # the other rows: tests/test_paper_rows.py
    for name in names:
        assert type(load_recipe(name, schema=BackboneRecipe)) is BackboneRecipe


def test_kd_recipe_refuses_to_start_without_teacher_logits(tiny_root: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_root, "kd_required=true")
    with pytest.raises(FinegrainError, match="distils from a teacher.*regularization.kd.logits is not set"):
        run_backbone(recipe, tmp_path, device=CPU, progress=False, echo=lambda m: None)


# --------------------------------------------------------------------------- pretrain -> fgvc
def test_two_epoch_pretraining_run_directory(pretrained: Path) -> None:
    assert {"recipe.yaml", "metrics.jsonl", "curves.png", "last.safetensors", "best.safetensors",
            "resume_state.pt"} <= {p.name for p in pretrained.iterdir()}
    rows = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(0.0 <= r["val_top1"] <= 1.0 for r in rows)  # the demo: val
    assert 0.0 <= rows[-1]["test_top1"] <= 1.0  # the held-out split, evaluated once at the end
    model = finegrain.load_model(pretrained / "best.safetensors")
    assert model.metadata["finegrain.task"] == "backbone" and "finegrain.kd_teacher" not in model.metadata
    assert model.metadata["finegrain.recipe"] == "backbone/demo"
    pre = model.preprocessing  # the preprocessing it was trained with travels with the weights
    assert (pre.train_size, pre.resize, pre.crop) == (64, 72, 64)
    assert model.overrides == {"base_width": 8}
    assert {m.keep_prob for m in model.modules() if type(m).__name__ == "DropBlock2d"}  # DropBlock layers present


def test_pretrained_checkpoint_warm_starts_fgvc_and_retrieval(pretrained: Path, tiny_root: Path,
                                                               tmp_path: Path) -> None:
    weights = pretrained / "best.safetensors"
    backbone = finegrain.load_model(weights).state_dict()
    recipe = load_recipe("demo", group="fgvc", overrides=[
        *TINY, "train.epochs=1", f"data.root={json.dumps(str(tiny_root))}",
        f"model.weights={json.dumps(str(weights))}"])
    messages: list[str] = []
    fgvc_model = build_fgvc_model(recipe, 3, messages.append)
    assert "warm start from" in messages[0] and "skipped" in messages[0]
    stem = next(k for k in backbone if k.endswith("weight") and backbone[k].ndim == 4)
    assert torch.equal(fgvc_model.state_dict()[stem], backbone[stem])
    assert fgvc_model.preprocessing.train_size == 64
    summary = run_fgvc(recipe, tmp_path / "fgvc", device=CPU, progress=False, echo=lambda m: None)
    assert summary["last"]["epoch"] == 1 and summary["last"]["loss"] > 0
    embedder = finegrain.create_embedder("assemble_resnet50", embedding_size=16, base_width=8, weights=weights)
    assert torch.equal(embedder.state_dict()[stem], backbone[stem])


def test_resume_after_kill_gives_identical_weights(tiny_root: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_root)
    run_backbone(recipe, tmp_path / "a", device=CPU, progress=False, echo=lambda m: None)

    def kill_at_end_of_epoch_two(message: str) -> None:
        if message.startswith("epoch 2,"):  # epoch 2's row is being logged; its resume state is not saved yet
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_backbone(recipe, tmp_path / "b", device=CPU, progress=False, echo=kill_at_end_of_epoch_two)
    with pytest.raises(FinegrainError, match="already holds a run"):
        run_backbone(recipe, tmp_path / "b", device=CPU, progress=False, echo=lambda m: None)
    for name in ("last.safetensors", "best.safetensors"):  # so only the resumed epoch 2 can write them
        (tmp_path / "b" / name).unlink()
    torch.manual_seed(12345)  # a new process: its RNG state is whatever it is
    run_backbone(recipe, tmp_path / "b", resume=True, device=CPU, progress=False, echo=lambda m: None)
    a = finegrain.load_model(tmp_path / "a" / "last.safetensors")
    b = finegrain.load_model(tmp_path / "b" / "last.safetensors")
    assert b.metadata["finegrain.epoch"] == "2"
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys() and all(torch.equal(a_state[k], b_state[k]) for k in a_state)
    strip = lambda run: [{k: v for k, v in json.loads(line).items() if k not in ("time", "images_per_s")}  # noqa: E731
                         for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert strip("a") == strip("b") and len(strip("a")) == 2


# ------------------------------------------------------------------------------ teacher logits
@pytest.fixture(scope="module")
def logits_file(pretrained: Path, tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kd") / "teacher.safetensors"
    summary = write_teacher_logits(pretrained / "best.safetensors", tiny_root, out, workers=0, device=CPU,
                                   progress=False, echo=lambda m: None)
    assert (summary["images"], summary["classes"]) == (24, 3) and 0.0 <= summary["teacher_top1"] <= 1.0
    return out


def test_teacher_logits_are_the_teachers_eval_outputs_keyed_by_relative_path(
        logits_file: Path, pretrained: Path, tiny_root: Path) -> None:
    teacher = finegrain.load_model(pretrained / "best.safetensors").eval()
    train = load_splits("folder", tiny_root)["train"]
    with safe_open(str(logits_file), framework="pt") as handle:
        metadata, logits = handle.metadata(), handle.get_tensor("logits")
    paths = json.loads(metadata["finegrain.paths"])
    assert paths[0] == f"train/{train.classes[0]}/{Path(train.samples[0].path).name}"
    assert len(paths) == logits.shape[0] == 24 and logits.shape[1] == 3
    assert metadata["finegrain.teacher"] == f"sha256:{sha256_file(pretrained / 'best.safetensors')}"
    assert json.loads(metadata["finegrain.classes"]) == train.classes
    # un-augmented: the eval transform at the teacher's own preprocessing (72 -> 64)
    dataset = ImageDataset(train.samples, eval_transform(teacher.preprocessing))
    with torch.no_grad():
        expected = teacher(torch.stack([dataset[i][0] for i in (0, 13)]))
    assert torch.allclose(logits[[0, 13]], expected, atol=1e-5)


def test_logits_survive_a_moved_data_folder(logits_file: Path, tiny_root: Path, tmp_path: Path) -> None:
    moved = shutil.copytree(tiny_root, tmp_path / "elsewhere")
    split = load_splits("folder", moved)["train"]
    logits, _ = teacher_logits_for_split(logits_file, split, moved)
    with safe_open(str(logits_file), framework="pt") as handle:
        assert torch.equal(logits, handle.get_tensor("logits"))


def test_kd_pretraining_records_its_teacher(logits_file: Path, tiny_root: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_root, "train.epochs=1", "kd_required=true",
                         f"regularization.kd.logits={json.dumps(str(logits_file))}")
    with_kd = run_backbone(recipe, tmp_path / "kd", device=CPU, progress=False, echo=lambda m: None)
    plain = run_backbone(tiny_recipe(tiny_root, "train.epochs=1"), tmp_path / "plain", device=CPU, progress=False,
                         echo=lambda m: None)
    assert with_kd["last"]["loss"] > plain["last"]["loss"]  # the same CE plus a positive T^2 CE
    metadata = finegrain.load_model(tmp_path / "kd" / "last.safetensors").metadata
    with safe_open(str(logits_file), framework="pt") as handle:
        assert metadata["finegrain.kd_teacher"] == handle.metadata()["finegrain.teacher"]


def refusal(data: Path, logits: Path, tmp_path: Path) -> str:
    recipe = tiny_recipe(data, f"regularization.kd.logits={json.dumps(str(logits))}")
    with pytest.raises(FinegrainError) as error:
        run_backbone(recipe, tmp_path / "refused", device=CPU, progress=False, echo=lambda m: None)
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    return str(error.value)


def test_mismatched_logits_are_refused_naming_what_differs(logits_file: Path, tiny_root: Path, tmp_path: Path) -> None:
    train_dir = tiny_root / "train"
    first_class = sorted(p.name for p in train_dir.iterdir())[0]
    # one more image: the count differs
    more = shutil.copytree(tiny_root, tmp_path / "more")
    image = sorted((more / "train" / first_class).iterdir())[0]
    shutil.copyfile(image, image.with_name("extra_" + image.name))
    assert "hold 24 images, the training split has 25" in refusal(more, logits_file, tmp_path)
    # same count, one image renamed: the paths differ
    renamed = shutil.copytree(tiny_root, tmp_path / "renamed")
    image = sorted((renamed / "train" / first_class).iterdir())[0]
    image.rename(image.with_name("renamed_" + image.name))
    message = refusal(renamed, logits_file, tmp_path)
    assert f"lack 1 training image(s), e.g. train/{first_class}/renamed_{image.name}" in message
    # another class count
    with safe_open(str(logits_file), framework="pt") as handle:
        metadata, logits = handle.metadata(), handle.get_tensor("logits")
    four = tmp_path / "four_classes.safetensors"
    save_file({"logits": torch.cat([logits, logits[:, :1]], dim=1)}, str(four),
              metadata={**metadata, "finegrain.num_classes": "4"})
    assert "have 4 classes, the training data has 3" in refusal(tiny_root, four, tmp_path)
    # same count, other class names (a teacher fine-tuned on other classes)
    classes = json.loads(metadata["finegrain.classes"])
    other = tmp_path / "other_classes.safetensors"
    save_file({"logits": logits}, str(other), metadata={**metadata, "finegrain.classes": json.dumps(classes[::-1])})
    assert f"has class 0 {classes[2]!r} where the training data has {classes[0]!r}" in \
        refusal(tiny_root, other, tmp_path)


def test_teacher_for_other_classes_is_refused_before_inference(pretrained: Path, tmp_path: Path) -> None:
    four = copy_demo(tmp_path / "four", classes=4, train=2, test=1)
    with pytest.raises(FinegrainError, match="predicts 3 classes, the training data has 4"):
        write_teacher_logits(pretrained / "best.safetensors", four, tmp_path / "t.safetensors", device=CPU)
    plain = tmp_path / "plain.safetensors"
    state = finegrain.load_model(pretrained / "best.safetensors").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(plain))
    with pytest.raises(FinegrainError, match="plain state dict.*--arch"):
        write_teacher_logits(plain, four, tmp_path / "t.safetensors", device=CPU)
    assert not (tmp_path / "t.safetensors").exists()


def test_teacher_logits_cli_with_plain_timm_state_dicts(tiny_root: Path, tmp_path: Path) -> None:
    """A timm teacher from a local weights file: by tensor name, or by position (the Lite0 package)."""
    import timm
    import typer

    from finegrain.cli.backbone import teacher_logits
    from finegrain.train.pretrained import efficientnet_lite0_package_file

    app = typer.Typer()
    app.command()(teacher_logits)
    weights = tmp_path / "resnet10t.safetensors"
    network = timm.create_model("resnet10t", num_classes=3)
    save_file(network.state_dict(), str(weights))
    out = tmp_path / "logits.safetensors"
    result = CliRunner().invoke(app, ["--weights", str(weights), "--data", str(tiny_root), "--out", str(out),
                                      "--arch", "timm/resnet10t", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "24 images x 3 classes" in result.output
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        assert handle.get_tensor("logits").shape == (24, 3)
    assert metadata["finegrain.teacher_arch"] == "timm/resnet10t"
    assert json.loads(metadata["finegrain.preprocessing"])["crop"] == network.pretrained_cfg["input_size"][-1]
    # the Lite0 package's file loads into timm by position; an ImageNet head does not fit 3 classes
    lite0 = str(efficientnet_lite0_package_file())
    result = CliRunner().invoke(app, ["--weights", lite0, "--data", str(tiny_root), "--out",
                                      str(tmp_path / "t.safetensors"), "--arch", "timm/tf_efficientnet_lite0"])
    assert isinstance(result.exception, FinegrainError)
    assert "predicts 1000 classes, the training data has 3" in str(result.exception)


# ------------------------------------------------------------------------------- the KD loss
class Passthrough(nn.Module):
    """A 'network' whose logits are its input: the loss can then be checked by hand."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_task_distils_from_teacher_rows_of_both_mixup_partners(temperature: float) -> None:
    """test_trainer checks the loss formula; this checks the task feeds it the right teacher rows:
    loss = CE(smoothed mixed labels) + T^2 * CE(student / T, lam p(t_i) + (1 - lam) p(t_j)),
    with rows looked up by dataset index (i: the sample, j: its Mixup partner)."""
    teacher_table = torch.tensor([[0.0, 0.0, 0.0], [3.0, -1.0, 0.5], [0.2, 2.0, -0.7], [9.0, 9.0, 9.0]])
    student = [[1.0, -0.5, 0.25]]
    lam, label, partner_label, smoothing = 0.7, 2, 0, 0.1
    task = BackboneTask(["a", "b", "c"], smoothing, temperature, teacher_table, teacher="sha256:x")
    batch = TrainBatch(torch.tensor(student).view(1, 3, 1, 1), torch.tensor([label]), torch.tensor([1]),
                       torch.tensor([partner_label]), torch.tensor([2]), torch.tensor([lam]))
    loss = task.loss(Passthrough(), batch).item()

    def softmax(values: list[float]) -> list[float]:
        exps = [math.exp(v) for v in values]
        return [e / sum(exps) for e in exps]

    log_p = [math.log(p) for p in softmax(student[0])]
    mixed_labels = [lam * (c == label) + (1 - lam) * (c == partner_label) for c in range(3)]
    target = [smoothing / 3 + (1 - smoothing) * m for m in mixed_labels]
    ce_labels = -sum(t * lp for t, lp in zip(target, log_p))
    own, partner = (softmax([v / temperature for v in teacher_table[row].tolist()]) for row in (1, 2))
    mixed_teacher = [lam * a + (1 - lam) * b for a, b in zip(own, partner)]
    log_p_t = [math.log(p) for p in softmax([v / temperature for v in student[0]])]
    expected = ce_labels + temperature ** 2 * -sum(q * lp for q, lp in zip(mixed_teacher, log_p_t))
    assert loss == pytest.approx(expected, rel=1e-6)
    assert task.checkpoint_metadata()["finegrain.kd_teacher"] == "sha256:x"


def test_backbone_model_starts_from_random_init_with_recipe_sizes(tiny_root: Path) -> None:
    recipe = tiny_recipe(tiny_root)
    messages: list[str] = []
    model = build_backbone_model(recipe, 3, messages.append)
    assert messages == []  # no warm-start notice, no "random initialisation" warning: that is the point
    assert (model.preprocessing.train_size, model.preprocessing.resize, model.preprocessing.crop) == (64, 72, 64)
    last_bn = [m.bn3.weight for m in model.modules() if hasattr(m, "bn3")]
    assert last_bn and all(torch.count_nonzero(w) == 0 for w in last_bn)  # zero-gamma


def test_pretraining_can_continue_from_a_backbone_on_another_corpus(pretrained: Path, tiny_root: Path) -> None:
    """model.weights warm-starts pretraining (e.g. ImageNet weights, then a domain corpus)."""
    weights = pretrained / "best.safetensors"
    messages: list[str] = []
    model = build_backbone_model(tiny_recipe(tiny_root, f"model.weights={json.dumps(str(weights))}"), 5,
                                 messages.append)
    assert len(messages) == 1 and "warm start from" in messages[0]
    backbone = finegrain.load_model(weights).state_dict()
    stem = next(k for k in backbone if backbone[k].ndim == 4)
    assert torch.equal(model.state_dict()[stem], backbone[stem])
    assert model.state_dict()["fc.weight"].shape[0] == 5  # a fresh head for the new corpus's classes
