"""The core trainer: schedules, param groups, losses, metrics, checkpoints and exact resume."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

import finegrain
from finegrain.data import DEMO_ROOT, ImageDataset, load_splits
from finegrain.data.transforms import eval_transform, train_transform
from finegrain.errors import FinegrainError
from finegrain.eval.classification import predict_logits, topk_accuracy
from finegrain.models.metadata import TEACHER, CheckpointInfo
from finegrain.recipes import recipe_from_dict
from finegrain.train import resume
from finegrain.train.distill import distillation_loss, load_teacher_logits, save_teacher_logits
from finegrain.train.fgvc import ClassificationLoss, ClassificationTask, recipe_preprocessing
from finegrain.train.losses import smooth_targets, soft_cross_entropy
from finegrain.train.mixup import Mixup, mixed_one_hot, sample_lambdas
from finegrain.train.optim import (ParamGroupSpec, WarmupCosine, bn_momentum_rule, build_sgd, linear_schedule,
                                   param_groups, warmup_cosine_factor)
from finegrain.train.trainer import Trainer, resolve_amp

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny convolutions gain nothing from a second thread, and on a shared 2-core machine
    intra-op threads that wait for each other make a run 5-40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- schedules
def test_warmup_then_cosine_values() -> None:
    # 100 steps, 10 of warmup: lr/peak = step/10, then 0.5 (1 + cos(pi (step - 10) / 90)).
    assert [warmup_cosine_factor(s, 100, 10) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert warmup_cosine_factor(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine_factor(40, 100, 10) == pytest.approx(0.75)  # cos(pi/3) = 0.5
    assert warmup_cosine_factor(100, 100, 10) == pytest.approx(0.0)
    assert warmup_cosine_factor(55, 100, 10, final_factor=0.1) == pytest.approx(0.55)
    assert warmup_cosine_factor(0, 10, 0) == 1.0


def test_scheduler_drives_every_group_with_its_multiplier() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    head = nn.Linear(3, 2)
    optimizer = build_sgd(nn.ModuleList([model, head]), lr=0.4, momentum=0.9, weight_decay=1e-4,
                          extra=[ParamGroupSpec(list(head.parameters()), "head", lr_mult=10.0, weight_decay=0.0)])
    scheduler = WarmupCosine(optimizer, total_steps=20, warmup_steps=4)
    seen = []
    for _ in range(20):
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    for step in (0, 2, 4, 13, 19):
        expected = 0.4 * warmup_cosine_factor(step, 20, 4)
        assert seen[step]["decay"] == pytest.approx(expected) and seen[step]["no_decay"] == pytest.approx(expected)
        assert seen[step]["head"] == pytest.approx(10 * expected)


def test_bn_momentum_rule_converts_tf_momentum_to_pytorch() -> None:
    # TF momentum max(1 - 10/s, 0.9); PyTorch momentum is its complement.
    assert bn_momentum_rule(296) == pytest.approx(10 / 296)  # Food-101: TF 0.966
    assert bn_momentum_rule(1000) == pytest.approx(0.01)
    assert bn_momentum_rule(100) == pytest.approx(0.1) and bn_momentum_rule(8) == pytest.approx(0.1)
    with pytest.raises(FinegrainError):
        bn_momentum_rule(0)


def test_dropblock_keep_prob_decays_linearly_over_all_steps() -> None:
    values = [linear_schedule(s, 5, 0.9, 0.7) for s in range(5)]
    assert values == pytest.approx([0.9, 0.85, 0.8, 0.75, 0.7])


# ---------------------------------------------------------------------------- param groups
def test_weight_decay_on_every_weight_but_bn() -> None:
    conv, bn, fc = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(4, 2)
    model = nn.Sequential(conv, bn, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    groups = {g["name"]: g for g in param_groups(model, 1e-3)}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["decay"]["params"]) == ids([conv.weight, fc.weight, fc.bias])  # dense bias decayed (release)
    assert ids(groups["no_decay"]["params"]) == ids([bn.weight, bn.bias])
    assert (groups["decay"]["weight_decay"], groups["no_decay"]["weight_decay"]) == (1e-3, 0.0)
    extra = param_groups(model, 1e-3, [ParamGroupSpec([fc.bias], "p", lr_mult=10.0, weight_decay=0.0)])
    by_name = {g["name"]: g for g in extra}
    assert id(fc.bias) not in ids(by_name["decay"]["params"])
    assert (by_name["p"]["lr_mult"], by_name["p"]["weight_decay"]) == (10.0, 0.0)
    with pytest.raises(FinegrainError, match="two extra param groups"):
        param_groups(model, 1e-3, [ParamGroupSpec([fc.bias], "a"), ParamGroupSpec([fc.bias], "b")])


def test_assembled_network_groups_cover_every_parameter_once() -> None:
    model = finegrain.create_model("assemble_resnet50", num_classes=5, base_width=4)
    groups = {g["name"]: g["params"] for g in param_groups(model, 1e-4)}
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in groups["no_decay"]} == bn_params
    assert len(groups["decay"]) + len(groups["no_decay"]) == len(list(model.parameters()))


# ----------------------------------------------------------------------------------- losses
def test_label_smoothing_matches_hand_computation_and_torch() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    log_z = math.log(math.exp(2.0) + math.exp(0.0) + math.exp(-1.0))
    log_p = [2.0 - log_z, 0.0 - log_z, -1.0 - log_z]
    eps = 0.1
    expected = -((1 - eps + eps / 3) * log_p[0] + eps / 3 * log_p[1] + eps / 3 * log_p[2])
    ours = ClassificationLoss(3, label_smoothing=eps)(logits, torch.tensor([0]))
    assert ours.item() == pytest.approx(expected, rel=1e-6)
    torch_value = F.cross_entropy(logits, torch.tensor([0]), label_smoothing=eps).item()
    assert ours.item() == pytest.approx(torch_value, rel=1e-6)


def test_mixup_targets_mix_one_hots_per_sample() -> None:
    targets = mixed_one_hot(torch.tensor([0, 1]), 3, torch.tensor([2, 1]), torch.tensor([0.3, 0.8]))
    assert torch.allclose(targets, torch.tensor([[0.3, 0.0, 0.7], [0.0, 1.0, 0.0]]))
    smoothed = smooth_targets(targets, 0.3)
    assert torch.allclose(smoothed[0], torch.tensor([0.3 * 0.7 + 0.1, 0.1, 0.7 * 0.7 + 0.1]))
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.1, 0.2]])
    # soft-target CE is linear in the targets: lam * CE(a) + (1 - lam) * CE(b), per sample
    ce = lambda row, label: F.cross_entropy(logits[row:row + 1], torch.tensor([label]))  # noqa: E731
    per_sample = [0.3 * ce(0, 0) + 0.7 * ce(0, 2), ce(1, 1)]
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(sum(per_sample).item() / 2, rel=1e-6)


def test_lambdas_follow_beta_and_repeat_with_the_step() -> None:
    lam = sample_lambdas(4000, 0.2, np.random.default_rng(0))
    assert lam.shape == (4000,) and lam.dtype == torch.float32
    assert scipy.stats.kstest(lam.numpy(), scipy.stats.beta(0.2, 0.2).cdf).pvalue > 0.001
    assert scipy.stats.kstest(lam.numpy(), scipy.stats.beta(1.0, 1.0).cdf).pvalue < 1e-6
    with pytest.raises(FinegrainError, match="alpha must be > 0"):
        sample_lambdas(8, 0.0, np.random.default_rng(0))
    mixup = Mixup(2, 0.2, seed=5)
    images, labels, indices = torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6)
    first, again, other = mixup(images, labels, indices, 7), Mixup(2, 0.2, seed=5)(images, labels, indices, 7), \
        mixup(images, labels, indices, 8)
    assert torch.equal(first.lam, again.lam) and torch.equal(first.partner_indices, again.partner_indices)
    assert not torch.equal(first.lam, other.lam)
    assert not torch.equal(first.lam, Mixup(2, 0.2, seed=5, rank=1)(images, labels, indices, 7).lam)


@pytest.mark.parametrize("kind", [1, 2])
def test_mixup_mixes_each_image_with_its_partner(kind: int) -> None:
    images, labels, indices = torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 2, 2, 1, 0]), torch.arange(6) + 10
    batch = Mixup(kind, 0.2, seed=3)(images, labels, indices, step=0)
    size = 3 if kind == 1 else 6  # type 1: the loader sent 3 samples, then their 3 partners
    assert batch.images.shape == (size, 3, 4, 4) and batch.lam.shape == (size,)
    first = torch.arange(3) if kind == 1 else torch.tensor([0, 1, 2, 0, 1, 2])  # type 2: the release's halves
    assert torch.equal(batch.labels, labels[first]) and torch.equal(batch.indices, indices[first])
    partners = batch.partner_indices - 10
    assert partners.tolist() == ([3, 4, 5] if kind == 1 else [3, 4, 5, 5, 4, 3])
    assert torch.equal(batch.partner_labels, labels[partners])
    for i in range(size):
        lam = batch.lam[i]
        assert torch.allclose(batch.images[i], lam * images[first[i]] + (1 - lam) * images[partners[i]])
    assert Mixup(None, 0.2, seed=3)(images, labels, indices, step=0).lam is None


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_is_the_papers_formula_with_mixed_teacher(temperature: float) -> None:
    student, teacher, partner = [2.0, -1.0], [1.0, 0.0], [-0.5, 1.5]
    lam, label, partner_label = 0.25, 0, 1

    def softmax(values: list[float]) -> list[float]:
        exps = [math.exp(v) for v in values]
        return [e / sum(exps) for e in exps]

    log_student = [math.log(p) for p in softmax(student)]
    ce_labels = -(lam * log_student[label] + (1 - lam) * log_student[partner_label])
    teacher_p = [lam * a + (1 - lam) * b for a, b in zip(softmax([t / temperature for t in teacher]),
                                                          softmax([t / temperature for t in partner]))]
    log_student_t = [math.log(p) for p in softmax([s / temperature for s in student])]
    expected = ce_labels + temperature ** 2 * -sum(p * q for p, q in zip(teacher_p, log_student_t))
    loss = ClassificationLoss(2, temperature=temperature)(
        torch.tensor([student]), torch.tensor([label]), torch.tensor([partner_label]), torch.tensor([lam]),
        torch.tensor([teacher]), torch.tensor([partner]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    only_kd = distillation_loss(torch.tensor([student]), torch.tensor([teacher_p]), temperature)
    assert only_kd.item() == pytest.approx(expected - ce_labels, rel=1e-6)


# ---------------------------------------------------------------------------------- metrics
def test_topk_accuracy_by_hand() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0], [0.5, 0.2, 0.3, 0.0], [0.0, 0.1, 0.2, 0.7]])
    labels = torch.tensor([1, 2, 0])
    assert topk_accuracy(logits, labels, ks=(1, 2, 3, 10)) == pytest.approx(
        {"top1": 1 / 3, "top2": 2 / 3, "top3": 2 / 3, "top10": 1.0})
    with pytest.raises(FinegrainError, match="logits \\[N, C\\] and labels \\[N\\]"):
        topk_accuracy(logits, labels[:2])


def test_predict_logits_in_eval_mode_and_restores_training() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.BatchNorm1d(3)).train()
    images = torch.randn(5, 3, 2, 2)
    loader = [(images[:3], torch.tensor([0, 1, 2])), (images[3:], torch.tensor([1, 1]))]
    logits, labels = predict_logits(model, loader, CPU)
    assert model.training and labels.tolist() == [0, 1, 2, 1, 1]
    with torch.no_grad():
        assert torch.allclose(logits, model.eval()(images))


def test_amp_modes() -> None:
    assert resolve_amp("auto", CPU) == (None, False) and resolve_amp("fp32", CPU) == (None, False)
    assert resolve_amp("bf16", CPU) == (torch.bfloat16, False)
    with pytest.raises(FinegrainError, match="fp16 needs a CUDA GPU"):
        resolve_amp("fp16", CPU)


# ------------------------------------------------------------------------------ tiny runs
TINY = {"model": {"name": "assemble_resnet50", "overrides": {"base_width": 4}},
        "data": {"kind": "folder", "train_size": 32, "eval_resize": 32, "eval_crop": 32},
        "optim": {"lr": 0.05, "weight_decay": 1e-4}, "schedule": {"warmup_epochs": 0.5},
        "regularization": {"label_smoothing": 0.1, "mixup": {"type": 1, "alpha": 0.2},
                           "dropblock": {"start": 0.9, "end": 0.7}, "autoaugment": "cifar10"},
        "train": {"epochs": 2, "batch_size": 8, "workers": 0, "amp": "fp32", "channels_last": True,
                  "seed": 3, "bn_momentum_rule": True},
        "eval": {"select_on": "test"}}  # the whole split trains; test_selection.py holds out validation


def make_tiny_folder(root: Path, classes: int = 3, train: int = 8, test: int = 4, first_class: int = 0) -> Path:
    """A class-per-folder data set of demo photos: `classes` classes, train / test images each."""
    for split, count in (("train", train), ("test", test)):
        for name in sorted(p.name for p in (DEMO_ROOT / "train").iterdir())[first_class:first_class + classes]:
            (root / split / name).mkdir(parents=True)
            for path in sorted((DEMO_ROOT / split / name).iterdir())[:count]:
                shutil.copyfile(path, root / split / name / path.name)
    return root


@pytest.fixture(scope="module")
def tiny_splits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3 demo classes, 8 train / 4 test photos each."""
    return load_splits("folder", make_tiny_folder(tmp_path_factory.mktemp("tiny")))


class InterruptAt(torch.utils.data.Dataset):
    """Raises `error` when item number `at` (counting every fetch) is requested: a kill or a
    Ctrl-C arriving while a run loads its data."""

    def __init__(self, dataset: ImageDataset, at: int, error: BaseException) -> None:
        self.dataset, self.at, self.error, self.calls = dataset, at, error, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):  # noqa: ANN204
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return self.dataset[index]


def make_trainer(splits: dict, run_dir: Path, interrupt: tuple[int, BaseException] | None = None,
                 extra: dict | None = None, echo: Callable[[str], None] = lambda message: None) -> Trainer:
    recipe = recipe_from_dict({**TINY, **(extra or {})})
    resume.seed_everything(recipe.train.seed)
    train, test = splits["train"], splits["test"]
    model = finegrain.create_model(recipe.model.name, num_classes=len(train.classes), **recipe.model.overrides)
    model.preprocessing = recipe_preprocessing(recipe, model.preprocessing)
    train_set = ImageDataset(train.samples, train_transform(model.preprocessing, recipe.regularization.autoaugment))
    if interrupt is not None:
        train_set = InterruptAt(train_set, *interrupt)
    task = ClassificationTask(train.classes, recipe.regularization.label_smoothing)
    return Trainer(recipe, model, task, train_set, ImageDataset(test.samples, eval_transform(model.preprocessing)),
                   run_dir, device=CPU, progress=False, echo=echo)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_fixed_tf_bn_momentum_reaches_every_bn_layer(tiny_splits: dict, tmp_path: Path) -> None:
    """train.bn_momentum is in TF terms: the release's 0.997 keeps 99.7% of the running average."""
    train = {**TINY["train"], "bn_momentum_rule": False, "bn_momentum": 0.997}
    trainer = make_trainer(tiny_splits, tmp_path, extra={"train": train})
    momenta = [m.momentum for m in trainer.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert momenta and all(m == pytest.approx(0.003) for m in momenta), set(momenta)
    with pytest.raises(FinegrainError, match="train.bn_momentum"):
        recipe_from_dict({**TINY, "train": {**train, "bn_momentum_rule": True}})


def test_run_directory_contract(tiny_splits: dict, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_splits, tmp_path)
    summary = trainer.fit()
    assert {"recipe.yaml", "metrics.jsonl", "curves.png", "last.safetensors", "best.safetensors",
            resume.RESUME_FILE} <= {p.name for p in tmp_path.iterdir()}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert {"epoch", "loss", "lr", "test_top1", "test_top5", "time", "images_per_s"} <= row.keys()
        assert 0.0 <= row["test_top1"] <= row["test_top5"] <= 1.0 and row["loss"] > 0 and row["images_per_s"] > 0
    assert rows[-1]["lr"] < rows[0]["lr"]  # cosine decay
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert recipe_from_dict(__import__("yaml").safe_load((tmp_path / "recipe.yaml").read_text())) == trainer.recipe
    last = finegrain.load_model(tmp_path / "last.safetensors")
    assert_same_weights(last.state_dict(), {k: v.contiguous() for k, v in trainer.model.state_dict().items()})
    assert json.loads(last.metadata["finegrain.classes"]) == tiny_splits["train"].classes
    assert (last.preprocessing.train_size, last.preprocessing.crop) == (32, 32)
    best = finegrain.load_model(tmp_path / "best.safetensors")
    assert int(best.metadata["finegrain.epoch"]) == summary["best"]["epoch"]
    value = max(r["test_top1"] for r in rows)  # a tie goes to the later epoch
    assert summary["best"] == {"metric": "test_top1", "value": value,
                               "epoch": max(r["epoch"] for r in rows if r["test_top1"] == value)}
    state = torch.load(tmp_path / resume.RESUME_FILE, weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 0, 2 * 24 // 8)
    # DropBlock's keep_prob reached the recipe's end value on the last step
    keep = {m.keep_prob for m in trainer.model.modules() if type(m).__name__ == "DropBlock2d"}
    assert keep == {0.7}
    # BN momentum rule: 3 steps per epoch -> TF max(1 - 10/3, 0.9) = 0.9 -> PyTorch 0.1
    momenta = {m.momentum for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(momenta) == 1 and momenta.pop() == pytest.approx(0.1)


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_after_kill_equals_uninterrupted_run(tiny_splits: dict, tmp_path: Path, workers: int) -> None:
    settings = {"train": {**TINY["train"], "workers": workers}}
    reference = make_trainer(tiny_splits, tmp_path / "a", extra=settings)
    reference.fit()
    # Killed at the end of epoch 2, before its resume state is written (a kill saves nothing):
    # the run directory holds epoch 1's state, and resuming must redo epoch 2 identically.

    def kill_at_epoch_2(message: str) -> None:
        if message.startswith("epoch 2,"):
            raise RuntimeError("killed")

    killed = make_trainer(tiny_splits, tmp_path / "b", extra=settings, echo=kill_at_epoch_2)
    with pytest.raises(RuntimeError, match="killed"):
        killed.fit()
    assert torch.load(tmp_path / "b" / resume.RESUME_FILE, weights_only=True)["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    resumed = make_trainer(tiny_splits, tmp_path / "b", extra=settings)
    resume.seed_everything(12345)  # a new process: its RNG state is whatever it is
    resumed.fit(resume=True)
    assert_same_weights(reference.model.state_dict(), resumed.model.state_dict())
    rows_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    rows_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    timing = ("time", "images_per_s")
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)


def test_ctrl_c_saves_a_resume_state_mid_epoch(tiny_splits: dict, tmp_path: Path) -> None:
    reference = make_trainer(tiny_splits, tmp_path / "a", extra={"train": {**TINY["train"], "epochs": 1}})
    reference.fit()
    # Ctrl-C while loading the third batch of epoch 1 (items 33..48).
    interrupted = make_trainer(tiny_splits, tmp_path / "b", interrupt=(33, KeyboardInterrupt()),
                               extra={"train": {**TINY["train"], "epochs": 1}})
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    state = torch.load(tmp_path / "b" / resume.RESUME_FILE, weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 2)
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
    resumed = make_trainer(tiny_splits, tmp_path / "b", extra={"train": {**TINY["train"], "epochs": 1}})
    resumed.fit(resume=True)
    assert_same_weights(reference.model.state_dict(), resumed.model.state_dict())


def test_ctrl_c_while_an_epoch_ends_resumes_exactly(tiny_splits: dict, tmp_path: Path) -> None:
    reference = make_trainer(tiny_splits, tmp_path / "a")
    reference.fit()

    def ctrl_c_at_epoch_1(message: str) -> None:  # while epoch 1's row is logged, after its evaluation
        if message.startswith("epoch 1,"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tiny_splits, tmp_path / "b", echo=ctrl_c_at_epoch_1).fit()
    state = torch.load(tmp_path / "b" / resume.RESUME_FILE, weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)  # trained, not yet closed
    resumed = make_trainer(tiny_splits, tmp_path / "b")
    resumed.fit(resume=True)
    assert_same_weights(reference.model.state_dict(), resumed.model.state_dict())
    timing = ("time", "images_per_s")
    assert [{k: v for k, v in row.items() if k not in timing} for row in resumed.rows] == \
        [{k: v for k, v in row.items() if k not in timing} for row in reference.rows]


def test_resume_refuses_a_missing_or_foreign_state(tiny_splits: dict, tmp_path: Path) -> None:
    with pytest.raises(FinegrainError, match="No resume state"):
        make_trainer(tiny_splits, tmp_path).fit(resume=True)
    torch.save({"weights": torch.zeros(1)}, tmp_path / resume.RESUME_FILE)
    with pytest.raises(FinegrainError, match="not a finegrain resume state"):
        make_trainer(tiny_splits, tmp_path).fit(resume=True)


def test_batch_larger_than_the_data_set_is_refused(tiny_splits: dict, tmp_path: Path) -> None:
    with pytest.raises(FinegrainError, match="batch size 64 exceeds the 24 training images"):
        make_trainer(tiny_splits, tmp_path, extra={"train": {**TINY["train"], "batch_size": 64}})


def test_teacher_logits_are_matched_by_path_and_checked(tiny_splits: dict, tmp_path: Path) -> None:
    paths = [s.path for s in tiny_splits["train"].samples]
    logits = torch.arange(len(paths) * 3, dtype=torch.float32).view(-1, 3)
    file = save_teacher_logits(tmp_path / "t.safetensors", paths[::-1], logits.flip(0), CheckpointInfo(extra={TEACHER: "test"}))
    assert torch.equal(load_teacher_logits(file, paths, 3), logits)
    with pytest.raises(FinegrainError, match="have 3 classes, the training data has 4"):
        load_teacher_logits(file, paths, 4)
    with pytest.raises(FinegrainError, match="hold 24 images, the training split has 23"):
        load_teacher_logits(file, paths[:-1], 3)
    with pytest.raises(FinegrainError, match="lack 1 training image"):
        load_teacher_logits(file, paths[:-1] + ["elsewhere.jpg"], 3)


def test_kd_run_uses_teacher_logits(tiny_splits: dict, tmp_path: Path) -> None:
    paths = [s.path for s in tiny_splits["train"].samples]
    teacher = F.one_hot(torch.tensor(tiny_splits["train"].labels), 3).float() * 5
    save_teacher_logits(tmp_path / "t.safetensors", paths, teacher, CheckpointInfo(extra={TEACHER: "oracle"}))
    trainer = make_trainer(tiny_splits, tmp_path / "run", extra={"train": {**TINY["train"], "epochs": 1}})
    trainer.task.teacher_logits = load_teacher_logits(tmp_path / "t.safetensors", paths, 3)
    with_kd = trainer.fit()["last"]["loss"]
    plain = make_trainer(tiny_splits, tmp_path / "plain", extra={"train": {**TINY["train"], "epochs": 1}}).fit()
    assert with_kd > plain["last"]["loss"]  # the KD term adds a positive T^2 CE to the same CE

