"""finegrain's training step against one SGD step of the release's own TF graph.

The fixture (tests/fixtures/release/assemble_r50_w16/train_step/, its README says how it was
made) starts from the inference fixture's weights: training-mode BN, label smoothing on
Mixup-style soft targets, the release's weight-decay selection, Momentum, BN moving averages at
TF 0.997. Here finegrain's own pieces take that step: the converter, the classification loss,
the param groups and weight decay, the TF -> PyTorch BN momentum mapping and the optimizer.

This random network amplifies float32 rounding toward the stem in the backward pass, so each
stage is compared against the noise floor the fixture's README measured (PyTorch float32 vs the
reference, median over parameters of max |diff| / max |value|), with a factor of 3 for machines
that round differently. Loss terms, BN running statistics, the dense layer and stage 4 are well
conditioned and compared tightly.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from finegrain.convert.release import convert_release, release_mapping
from finegrain.models import set_drop_block_keep_prob
from finegrain.train.fgvc import ClassificationLoss
from finegrain.train.mixup import mixed_one_hot
from finegrain.train.optim import build_sgd, set_bn_momentum, torch_bn_momentum

FIXTURE = Path(__file__).parent / "fixtures" / "release" / "assemble_r50_w16"
STEP = FIXTURE / "train_step"
ARCH = "assemble_resnet50"
# PyTorch float32 vs the reference, from the fixture's README.
NOISE_FLOOR = {"dense": 7.3e-6, "stage4": 8.9e-5, "stage3": 2.8e-4, "stage2": 1.2e-3, "stage1": 5.8e-3,
               "stem": 2.2e-2}
MARGIN = 3.0


def stage_of(key: str) -> str:
    if key.startswith("fc."):
        return "dense"
    if key.startswith("layer"):
        return f"stage{key[len('layer')]}"
    return "stem"  # conv1, bn1 and the BigLittle stem's pool block


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).abs().max() / reference.double().abs().max())


@pytest.fixture(scope="module")
def step() -> dict:
    """One step on the converted weights, as the trainer's pieces take it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = json.loads((STEP / "step.json").read_text())
        model = convert_release(FIXTURE / "model.ckpt", ARCH).train()
        set_drop_block_keep_prob(model, spec["keep_prob"])
        set_bn_momentum(model, torch_bn_momentum(spec["bn_momentum_tf"]))
        optimizer = build_sgd(model, spec["lr"], spec["momentum"], spec["weight_decay"])
        criterion = ClassificationLoss(model.cfg.num_classes, spec["label_smoothing"])
        images = torch.from_numpy(np.load(STEP / "train_input.npy")).permute(0, 3, 1, 2).contiguous()
        labels, partners = torch.tensor(spec["labels_a"]), torch.tensor(spec["labels_b"])
        lam = torch.tensor(spec["lambda"], dtype=torch.float32)
        decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        names = {key: tf_name for key, (tf_name, _) in release_mapping(model).entries.items()}
        l2 = spec["weight_decay"] / 2 * sum(float(p.detach().double().square().sum())
                                            for p in model.parameters() if id(p) in decayed)
        all_l2 = spec["weight_decay"] / 2 * sum(float(p.detach().double().square().sum()) for p in model.parameters())
        decayed_names = {k for k, p in model.named_parameters() if id(p) in decayed}
        logits = model(images)
        loss = criterion(logits, labels, partners, lam)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"spec": spec, "model": model, "logits": logits.detach(), "cross_entropy": float(loss.detach()),
                "l2": l2, "all_l2": all_l2, "names": names, "decayed": decayed_names,
                "parameters": {k for k, _ in model.named_parameters()},
                "targets": mixed_one_hot(labels, model.cfg.num_classes, partners, lam),
                "reference": convert_release(STEP / "after" / "model.ckpt", ARCH).state_dict()}
    finally:
        torch.set_num_threads(threads)


def test_mixup_targets_and_training_mode_logits_match(step):
    """The fixture's targets are Mixup's soft labels; the loss smooths them (as TF's loss does)."""
    assert np.abs(step["targets"].numpy() - np.load(STEP / "train_targets.npy")).max() < 1e-6
    reference = np.load(STEP / "logits_train.npy")
    # README: a faithful float32 step gets within 1.6e-4 of max |logit|.
    assert np.abs(step["logits"].numpy() - reference).max() <= 5e-4 * np.abs(reference).max()


def test_loss_terms_match(step):
    spec = step["spec"]
    assert step["cross_entropy"] == pytest.approx(spec["cross_entropy"], abs=1e-4)
    assert step["l2"] == pytest.approx(spec["l2_term"], rel=1e-6)
    # Decaying everything (plain SGD over model.parameters()) would be far off.
    assert step["all_l2"] != pytest.approx(spec["l2_term"], rel=0.1)


def test_weight_decay_selection_is_the_releases(step):
    """The release decays every trainable variable whose name lacks `batch_normalization`."""
    for key in step["parameters"]:
        assert (key in step["decayed"]) == ("batch_normalization" not in step["names"][key]), key
    assert "fc.bias" in step["decayed"]


def test_every_bn_running_statistic_matches(step):
    ours, reference = step["model"].state_dict(), step["reference"]
    keys = [k for k in reference if k.endswith(("running_mean", "running_var"))]
    assert len(keys) == step["spec"]["moving_stats"]
    # README: within 1e-6 relative (seen: at most 5e-7); a wrong momentum moves them by ~1e-2.
    worst = max(keys, key=lambda k: relative_difference(ours[k], reference[k]))
    assert relative_difference(ours[worst], reference[worst]) <= 2e-6, worst


def test_parameters_match_stage_by_stage_within_the_noise_floor(step):
    ours, reference = dict(step["model"].named_parameters()), step["reference"]
    assert len(ours) == step["spec"]["variables"] - step["spec"]["moving_stats"]  # every trainable variable
    by_stage: dict[str, list[float]] = {}
    for key, value in ours.items():
        by_stage.setdefault(stage_of(key), []).append(relative_difference(value.detach(), reference[key]))
    assert set(by_stage) == set(NOISE_FLOOR)
    medians = {stage: statistics.median(diffs) for stage, diffs in by_stage.items()}
    for stage, median in medians.items():
        assert median <= MARGIN * NOISE_FLOOR[stage], (stage, medians)
    # The dense layer is well conditioned: every one of its tensors, not only the median.
    assert max(by_stage["dense"]) <= MARGIN * 1.4e-5
