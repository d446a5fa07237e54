"""Retrieval training: pml loss wrappers, optimizer groups, the m-per-class batches, a short real
run on demo images, --eval-only, and the shipped recipes against the paper's Tables 17 / 18."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer
import yaml
from typer.testing import CliRunner

import finegrain
from finegrain.data import DEMO_ROOT, load_splits
from finegrain.errors import FinegrainError
from finegrain.recipes import RetrievalRecipe, load_recipe, recipe_from_dict
from finegrain.train.metric_losses import ARCFACE_MARGIN_RADIANS, arcface_arguments, create_metric_loss
from finegrain.train.optim import build_sgd
from finegrain.train.retrieval import MPerClassBatches, RetrievalTask, build_embedder



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread. On the shared 2-core machine two OpenMP threads wait on
    each other at every op's barrier (measured: 4 s vs 0.013 s per step of the mini run's model)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _normalised(rows: int, dims: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dims, generator=torch.Generator().manual_seed(seed)), dim=1)


# -------------------------------------------------------------------------------------- losses
def test_arcface_margin_radians_become_pml_degrees():
    assert arcface_arguments()["margin"] == pytest.approx(math.degrees(0.3))
    assert arcface_arguments()["margin"] == pytest.approx(17.1887, abs=1e-4)
    loss = create_metric_loss("arcface", num_classes=3, embedding_size=4)
    assert loss.loss.margin == pytest.approx(ARCFACE_MARGIN_RADIANS)  # pml converts back to radians
    assert loss.loss.scale == 64.0


def test_arcface_value_equals_hand_computation():
    embeddings, labels = _normalised(6, 4, 0), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = create_metric_loss("arcface", num_classes=3, embedding_size=4, args={"margin_radians": 0.3, "scale": 30})
    weights = loss.loss.W.detach()  # [E, C]
    cosine = embeddings @ F.normalize(weights, dim=0)  # [B, C]
    theta = torch.acos(cosine[torch.arange(6), labels])
    assert bool((theta + 0.3 < math.pi).all())  # the plain cos(theta + m) branch of ArcFace
    logits = cosine.clone()
    logits[torch.arange(6), labels] = torch.cos(theta + 0.3)
    expected = F.cross_entropy(30 * logits, labels)
    assert float(loss(embeddings, labels).detach()) == pytest.approx(float(expected), rel=1e-5)


def test_cosine_softmax_with_label_smoothing_equals_hand_computation():
    embeddings, labels = _normalised(5, 4, 1), torch.tensor([0, 1, 2, 3, 0])
    loss = create_metric_loss("softmax", num_classes=4, embedding_size=4, args={"temperature": 0.1},
                              label_smoothing=0.2)
    logits = embeddings @ F.normalize(loss.loss.W.detach(), dim=0) / 0.1
    targets = F.one_hot(labels, 4).float() * 0.8 + 0.2 / 4  # TF-style smoothing
    expected = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert float(loss(embeddings, labels).detach()) == pytest.approx(float(expected), rel=1e-5)
    unsmoothed = create_metric_loss("softmax", 4, 4, {"temperature": 0.1})
    unsmoothed.load_state_dict(loss.state_dict())
    plain = F.cross_entropy(logits, labels)
    assert float(unsmoothed(embeddings, labels).detach()) == pytest.approx(float(plain), rel=1e-5)


def test_any_pml_loss_by_name_with_its_arguments():
    from pytorch_metric_learning.losses import ProxyAnchorLoss, TripletMarginLoss

    triplet = create_metric_loss("TripletMarginLoss", num_classes=3, embedding_size=8, args={"margin": 0.1})
    assert isinstance(triplet.loss, TripletMarginLoss) and triplet.loss.margin == 0.1
    assert list(triplet.parameters()) == []
    proxies = create_metric_loss("proxyanchorloss", num_classes=3, embedding_size=8)  # any case
    assert isinstance(proxies.loss, ProxyAnchorLoss) and proxies.loss.proxies.shape == (3, 8)
    embeddings, labels = _normalised(6, 8, 2), torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.isfinite(triplet(embeddings, labels)) and torch.isfinite(proxies(embeddings, labels))


def test_unknown_loss_lists_the_available_ones():
    with pytest.raises(FinegrainError) as error:
        create_metric_loss("TripletLoss", num_classes=3, embedding_size=8)
    message = str(error.value)
    assert "TripletLoss" in message
    for name in ("arcface", "softmax", "TripletMarginLoss", "ArcFaceLoss", "MultiSimilarityLoss"):
        assert name in message


@pytest.mark.parametrize("name, args, needle", [
    ("arcface", {"margin": 17.19}, "margin_radians"),  # pml's degrees given to our radians alias
    ("TripletMarginLoss", {"margn": 0.1}, "triplets_per_anchor"),
    ("softmax", {"num_classes": 5}, "num_classes"),
])
def test_wrong_loss_arguments_are_named(name, args, needle):
    with pytest.raises(FinegrainError, match=needle):
        create_metric_loss(name, num_classes=3, embedding_size=8, args=args)


def test_label_smoothing_needs_a_softmax_loss():
    with pytest.raises(FinegrainError, match="label_smoothing"):
        create_metric_loss("TripletMarginLoss", 3, 8, label_smoothing=0.1)


def test_loss_runs_in_fp32_under_bf16_autocast():
    loss = create_metric_loss("arcface", num_classes=3, embedding_size=8)
    embeddings = _normalised(4, 8, 3).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(embeddings, torch.tensor([0, 1, 2, 0]))
    value.backward()
    assert value.dtype == torch.float32 and loss.loss.W.dtype == torch.float32  # pml would cast W to bf16


# ---------------------------------------------------------------------------- recipe, groups
def _recipe(**retrieval) -> RetrievalRecipe:
    return recipe_from_dict({"model": {"name": "r50d_sk", "overrides": {"base_width": 8}},
                             "optim": {"lr": 0.1, "weight_decay": 5e-4},
                             "retrieval": {"embedding_size": 16, **retrieval}}, RetrievalRecipe)


def test_param_groups_loss_weights_and_learnable_gem_p():
    recipe = _recipe(loss={"name": "softmax", "lr_mult": 7.0}, gem_learnable=True, gem_lr_mult=3.0)
    model = build_embedder(recipe, echo=lambda message: None, resuming=True)
    task = RetrievalTask(recipe, num_classes=5)
    optimizer = build_sgd(torch.nn.ModuleList([model, task.trainable]), 0.1, 0.9, 5e-4,
                          extra=task.param_groups(model))
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["loss"]["params"] == [task.criterion.loss.W]
    assert (groups["loss"]["lr"], groups["loss"]["weight_decay"]) == (pytest.approx(0.7), 5e-4)
    assert groups["gem_p"]["params"] == [model.global_pool.p]
    assert (groups["gem_p"]["lr"], groups["gem_p"]["weight_decay"]) == (pytest.approx(0.3), 0.0)
    others = [id(p) for name in ("decay", "no_decay") for p in groups[name]["params"]]
    assert id(model.global_pool.p) not in others and id(task.criterion.loss.W) not in others


def test_fixed_gem_p_and_pair_loss_add_no_groups():
    recipe = _recipe(loss={"name": "MultiSimilarityLoss"})
    model = build_embedder(recipe, echo=lambda message: None, resuming=True)
    assert RetrievalTask(recipe, num_classes=5).param_groups(model) == []


@pytest.mark.parametrize("section, problem", [
    ({"retrieval": {"m_per_class": 5}}, "m_per_class"),
    ({"regularization": {"mixup": {"type": 1}}}, "mixup"),
    ({"data": {"eval_resize": 256, "eval_crop": 224}}, "eval_crop"),
    ({"retrieval": {"recall_ks": []}}, "recall_ks"),
])
def test_recipe_rejects_what_retrieval_cannot_do(section, problem):
    with pytest.raises(FinegrainError, match=problem):
        recipe_from_dict({"train": {"batch_size": 32}, **section}, RetrievalRecipe)


def test_zero_shot_split_by_named_test_classes():
    """The demo's fine-grained split: unseen apple varieties are the test classes, their images
    pooled from train/ and test/; every other class trains."""
    unseen = ["Golden 2", "Braeburn", "Golden 2"]
    splits = load_splits("folder_zeroshot", DEMO_ROOT, test_classes=unseen)
    assert splits["test"].classes == ["Braeburn", "Golden 2"] and len(splits["test"]) == 2 * 34
    assert len(splits["train"].classes) == 14 and not set(splits["train"].classes) & {"Braeburn", "Golden 2"}
    for options, problem in [({"test_classes": ["Golden 9"]}, "'Golden 9'.*no class folder"),
                             ({"test_classes": "Braeburn"}, "non-empty list"),
                             ({"test_classes": []}, "non-empty list"),
                             ({"test_classes": ["Braeburn"], "test_fraction": 0.5}, "either test_classes or"),
                             ({"test_classes": splits["train"].classes + unseen}, "leaving none to train")]:
        with pytest.raises(FinegrainError, match=problem):
            load_splits("folder_zeroshot", DEMO_ROOT, **options)


def test_m_per_class_batches_are_class_balanced_and_resumable():
    split = load_splits("folder_zeroshot", DEMO_ROOT)["train"]
    batches = MPerClassBatches(split, m=4, batch_size=16, seed=3)
    assert batches.steps_per_epoch == len(split) // 16
    batches.set_epoch(2)
    epoch = list(batches)
    labels = [[split.samples[i].label for i in batch] for batch in epoch]
    assert all(sorted(labels_of.count(c) for c in set(labels_of)) == [4, 4, 4, 4] for labels_of in labels)
    batches.set_epoch(2, skip=3)
    assert list(batches) == epoch[3:] and len(batches) == len(epoch) - 3
    batches.set_epoch(1)
    assert list(batches) != epoch


@pytest.mark.parametrize("name, loss, lr, batch, epochs", [
    ("sop", "arcface", 0.008, 128, 60), ("cub200", "softmax", 0.001, 32, 100), ("cars196", "softmax", 0.01, 32, 100),
])
def test_paper_recipes_follow_tables_17_and_18(name, loss, lr, batch, epochs):
    recipe = load_recipe(name, group="retrieval", schema=RetrievalRecipe)
    assert recipe.name == f"retrieval/{name}"
    assert (recipe.retrieval.loss.name, recipe.optim.lr, recipe.train.batch_size, recipe.train.epochs) == \
        (loss, lr, batch, epochs)
    assert (recipe.optim.weight_decay, recipe.retrieval.embedding_size, recipe.train.bn_momentum_rule) == \
        (5e-4, 1536, True)
    assert recipe.model.name == "r50d_sk" and recipe.regularization.dropblock.end < 1.0
    cars = name == "cars196"
    assert (recipe.regularization.label_smoothing > 0, recipe.regularization.autoaugment is not None) == (cars, cars)
    if loss == "arcface":
        assert recipe.retrieval.loss.args["margin_radians"] == 0.3


def test_cars196_recipe_smooths_labels_and_autoaugments():
    from finegrain.data import decode_rgb
    from finegrain.data.autoaugment_release import ReleaseAutoAugment
    from finegrain.train.retrieval import retrieval_preprocessing, retrieval_transforms

    recipe = load_recipe("cars196", group="retrieval", schema=RetrievalRecipe)
    criterion = RetrievalTask(recipe, num_classes=98).criterion.loss
    assert criterion.cross_entropy.label_smoothing == 0.1
    pre = retrieval_preprocessing(recipe, finegrain.create_embedder("r50d_sk", 16, base_width=8).preprocessing)
    train, evaluate = retrieval_transforms(pre, recipe.regularization.autoaugment)
    assert isinstance(train.pixel_ops, ReleaseAutoAugment) and evaluate.pixel_ops is None
    image = decode_rgb(str(next((DEMO_ROOT / "train" / "Lemon").glob("*.jpg"))))
    assert train(image).shape == (3, 224, 224) and evaluate(image).shape == (3, 256, 256)


def test_cli_loss_switch_drops_the_other_loss_arguments():
    from finegrain.cli.retrieval import _load

    switched = _load("sop", [], "softmax")
    assert (switched.retrieval.loss.name, switched.retrieval.loss.args) == ("softmax", {})
    tuned = _load("sop", ["retrieval.loss.args={temperature: 0.1}"], "softmax")
    assert tuned.retrieval.loss.args == {"temperature": 0.1}
    assert _load("sop", [], "arcface").retrieval.loss.args == {"margin_radians": 0.3, "scale": 64.0}


# ---------------------------------------------------------------------------------- real runs
def _mini_data(root: Path, classes: int = 6, per_class: int = 8) -> Path:
    """A folder_zeroshot copy of a few demo classes: the first half train, the rest test."""
    for name in sorted(p.name for p in (DEMO_ROOT / "train").iterdir())[::2][:classes]:
        (root / name).mkdir(parents=True)
        for path in sorted((DEMO_ROOT / "train" / name).glob("*.jpg"))[:per_class]:
            shutil.copy(path, root / name / path.name)
    return root


def _mini_recipe(tmp_path: Path, **retrieval) -> Path:
    raw = {
        "name": "mini", "model": {"name": "r50d_sk", "overrides": {"base_width": 4, "layers": [1, 1, 1, 1]}},
        # 8 classes: 4 test; of the 4 training classes, 2 are the zero-shot validation part (eval.select_on val)
        "data": {"kind": "folder_zeroshot", "root": str(_mini_data(tmp_path / "data", classes=8)), "train_size": 32,
                 "eval_resize": 32},
        "optim": {"lr": 0.05, "weight_decay": 5e-4}, "schedule": {"warmup_epochs": 0},
        "regularization": {"dropblock": {"start": 0.9, "end": 0.8}},
        "retrieval": {"loss": {"name": "softmax", "lr_mult": 10.0}, "embedding_size": 16, "recall_ks": [1, 2, 4],
                      **retrieval},
        "train": {"epochs": 2, "batch_size": 8, "workers": 0, "amp": "fp32", "channels_last": False,
                  "bn_momentum_rule": True},
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli() -> typer.Typer:
    from finegrain.cli.retrieval import retrieval

    app = typer.Typer()
    app.command()(retrieval)
    return app


def test_short_run_logs_epoch_zero_and_keeps_a_loadable_best(tmp_path):
    from finegrain.train.retrieval import run_retrieval

    recipe = load_recipe(str(_mini_recipe(tmp_path, m_per_class=4)), schema=RetrievalRecipe)
    run = tmp_path / "run"
    summary = run_retrieval(recipe, run, progress=False, echo=lambda message: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    assert rows[0]["loss"] is None and all(row["loss"] > 0 for row in rows[1:])
    val_keys = ("val_recall@1", "val_recall@2", "val_recall@4", "val_map@r")
    for row in rows:
        assert set(val_keys) <= set(row)
        assert all(0.0 <= row[key] <= 1.0 for key in val_keys)
        assert row["val_recall@1"] <= row["val_recall@2"] <= row["val_recall@4"]
    assert summary["start"] == rows[0] and "test_map@r" in rows[0]  # where the run starts, on both splits
    best = max(reversed(rows[1:]), key=lambda row: row["val_recall@1"])  # a tie goes to the later epoch
    assert summary["best"] == {"metric": "val_recall@1", "value": best["val_recall@1"], "epoch": best["epoch"]}
    assert [row["epoch"] for row in rows[1:] if "test_map@r" in row] == sorted({best["epoch"], 2})  # evaluated once
    model = finegrain.load_model(run / "best.safetensors").eval()
    assert model.metadata["finegrain.task"] == "retrieval"
    assert float(model.metadata["finegrain.metric.val_recall@1"]) == best["val_recall@1"]
    with torch.no_grad():
        embeddings = model.forward_embedding(torch.randn(2, 3, 32, 32))
    assert embeddings.shape == (2, 16)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2), atol=1e-5)
    assert (model.preprocessing.resize, model.preprocessing.crop) == (32, 32)


def test_eval_only_reproduces_the_recorded_metrics(tmp_path):
    recipe_path = _mini_recipe(tmp_path)
    runner = CliRunner()
    trained = runner.invoke(_cli(), ["--recipe", str(recipe_path), "--out", str(tmp_path / "run"), "--quiet",
                                     "--set", "train.epochs=1"])
    assert trained.exit_code == 0, trained.output
    assert "epoch 0 (not fine-tuned)" in trained.stdout and "Recall@1" in trained.stdout
    best = tmp_path / "run" / "best.safetensors"
    result = runner.invoke(_cli(), ["--eval-only", "--weights", str(best)])  # recipe and data from the checkpoint
    assert result.exit_code == 0, result.output
    # The run evaluated its one epoch's weights on the test classes once, at the end.
    recorded = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    for key, label in (("recall@1", "Recall@1"), ("recall@4", "Recall@4"), ("map@r", "MAP@R")):
        line = next(line for line in result.stdout.splitlines() if label in line)
        assert f"{100 * recorded[f'test_{key}']:.2f}" in line


def test_cli_bad_input_is_a_clear_error(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(_cli(), ["--eval-only"])
    assert isinstance(missing.exception, FinegrainError) and "--weights" in str(missing.exception)
    unknown = runner.invoke(_cli(), ["--recipe", str(_mini_recipe(tmp_path)), "--loss", "NoSuchLoss",
                                     "--out", str(tmp_path / "run")])
    assert isinstance(unknown.exception, FinegrainError) and "TripletMarginLoss" in str(unknown.exception)
